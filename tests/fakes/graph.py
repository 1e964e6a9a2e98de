"""A fake Microsoft Graph (the mail part relayd uses) on real HTTPS, for tests and bench/.

An aiohttp server on loopback with a trustme certificate. It behaves like Graph where
relayd depends on it:

* a bearer token is checked with ``grant(token) -> (user, resource, scopes)`` (the fake
  Entra ID's ``token_grant``): a token for another resource (an SMTP.Send token) gets
  ``401 InvalidAuthenticationToken``; one without the permission an endpoint needs
  (Mail.Send to send, Mail.ReadWrite for drafts and attachments) ``403
  ErrorAccessDenied``; a From: the signed-in mailbox may not use ``403
  ErrorSendAsDenied``; several mailboxes may sign in (``mailboxes=``, ``add_mailbox``),
  each with its own Send As rights and message rate (tests/fakes/mailboxes.py: over
  the rate a send is delayed, or refused ``429`` with ``mode="refuse"``);
* ``POST /me/sendMail`` (base64 MIME) → 202; ``POST /me/messages`` → 201 draft;
  ``POST …/attachments``, ``…/attachments/createUploadSession`` and ``PUT`` to the
  upload URL (in order, ≤ 4 MiB each, ``Content-Range``, and refused with 401 when it
  carries an ``Authorization`` header, as Outlook does); ``POST …/send`` → 202;
  ``DELETE`` a draft → 204;
* a request body over 4 MB gets ``413``; ``throttle_for(seconds)`` answers every
  request in that window ``429`` with ``Retry-After``; ``fail_next`` answers the next
  requests with any status and error code.

It records every message sent (the MIME as decoded, its recipients as Graph reads
them from the To, Cc and Bcc fields, its attachments, the mailbox that sent it), the
requests per path, and the peak number of requests in flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from tests.fakes.exchange import server_tls_context
from tests.fakes.mailboxes import Mailboxes

MAIL_SEND = "https://graph.microsoft.com/Mail.Send"
MAIL_READ_WRITE = "https://graph.microsoft.com/Mail.ReadWrite"
GRAPH_RESOURCE = "https://graph.microsoft.com"
REQUEST_LIMIT = 4_000_000  # bytes of request body ("4 MB")
CHUNK_LIMIT = 4 * 1024 * 1024  # one PUT to an upload URL
Grant = Callable[[str], "tuple[str, str, tuple[str, ...]] | None"]


@dataclass
class SentMessage:
    mime: bytes  # as decoded from the request (the draft's, for a draft)
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    attachments: tuple[tuple[str, str, bytes], ...] = ()  # (name, content type, bytes)
    via: str = "sendMail"  # or "draft"
    mailbox: str = ""  # the signed-in user that sent it

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.to + self.cc + self.bcc


@dataclass
class _Draft:
    mime: bytes
    mailbox: str
    attachments: list[tuple[str, str, bytes]] = field(default_factory=list)


@dataclass
class _Upload:
    draft: str
    name: str
    content_type: str
    size: int
    received: bytearray = field(default_factory=bytearray)


class FakeGraph:
    """Start with ``await start()``; ``graph_url`` is then the value for upstream.graph_url."""

    def __init__(
        self,
        ca: trustme.CA,
        *,
        grant: Grant,
        mailbox: str,
        send_as: tuple[str, ...] = (),
        mailboxes: tuple[str, ...] = (),
    ) -> None:
        self.grant = grant
        self.mailbox = mailbox
        self.mailboxes = Mailboxes(mailbox, send_as)
        for other in mailboxes:
            self.mailboxes.add(other)
        self.send_as = self.mailboxes.send_as(mailbox)  # the default mailbox's, live
        self.tls_context = server_tls_context(ca)
        self.port = 0
        self.messages: list[SentMessage] = []
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.requests_while_throttled = 0
        self.upload_puts: list[tuple[int, int, bool]] = []  # (start, length, had Authorization)
        self.deleted_drafts = 0
        self._throttled_until = 0.0
        self._failures: list[tuple[int, str, str, str]] = []  # (status, code, message, path)
        self._drafts: dict[str, _Draft] = {}
        self._uploads: dict[str, _Upload] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> FakeGraph:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def graph_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1.0"

    def relay_config(self, ca_file: Path, transport: str = "graph", **upstream: Any) -> dict:
        """The upstream section's Graph keys pointing at this fake."""
        return {
            "transport": transport,
            "graph_url": self.graph_url,
            "mailbox": self.mailbox,
            "ca_file": str(ca_file),
            **upstream,
        }

    # --- switches ----------------------------------------------------------------------

    def throttle_for(self, seconds: float) -> None:
        """Every request for ``seconds`` gets 429 with the Retry-After left."""
        self._throttled_until = time.monotonic() + seconds

    def fail_next(
        self, status: int, code: str, message: str = "", *, times: int = 1, path: str = ""
    ) -> None:
        """The next ``times`` requests (whose path ends with ``path``) get this answer."""
        self._failures.extend([(status, code, message or code, path)] * times)

    def add_mailbox(self, mailbox: str, *send_as: str) -> None:
        self.mailboxes.add(mailbox, *send_as)

    def grant_send_as(self, mailbox: str, *addresses: str) -> None:
        self.mailboxes.grant_send_as(mailbox, *addresses)

    # --- what happened -----------------------------------------------------------------

    def sent_through(self, mailbox: str) -> list[SentMessage]:
        return [m for m in self.messages if m.mailbox.lower() == mailbox.lower()]

    def received_by(self, address: str) -> list[SentMessage]:
        return [m for m in self.messages if address.lower() in map(str.lower, m.recipients)]

    # --- requests -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let concurrent requests overlap, as a network would
            response = await self._answer(request)
        finally:
            self.in_flight -= 1
        response.headers["request-id"] = secrets.token_hex(8)
        self.statuses[response.status] += 1
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        path = request.path
        self.requests[f"{request.method} {_route(path)}"] += 1
        body = await request.read()
        remaining = self._throttled_until - time.monotonic()
        if remaining > 0:
            self.requests_while_throttled += 1
            retry = {"Retry-After": str(math.ceil(remaining))}
            return _error(429, "ApplicationThrottled", "Too many requests", retry)
        if len(body) > REQUEST_LIMIT:
            return _error(413, "ErrorMessageSizeExceeded", "The request is too large")
        for index, (status, code, message, suffix) in enumerate(self._failures):
            if path.endswith(suffix):
                del self._failures[index]
                return _error(status, code, message)
        if path.startswith("/upload/"):
            return self._upload(request, path, body)
        if not path.startswith("/v1.0/me/"):
            return _error(404, "ResourceNotFound", f"no route {path}")
        user = self._check_token(request, path)
        if isinstance(user, web.Response):
            return user
        if request.method == "POST" and path.endswith(("/sendMail", "/send")):
            admitted = self.mailboxes.admit(user, time.monotonic())
            if isinstance(admitted, str):  # over the mailbox's rate, mode "refuse"
                retry = {"Retry-After": "1"}
                return _error(429, "ApplicationThrottled", "Too many requests", retry)
            await asyncio.sleep(admitted)  # (the message counts at its slot, roughly now)
        return self._route(request, path[len("/v1.0") :], body, user)

    def _check_token(self, request: web.Request, path: str) -> str | web.Response:
        """The signed-in user, or the refusal."""
        header = request.headers.get("Authorization", "")
        grant = self.grant(header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
        if grant is None or grant[1] != GRAPH_RESOURCE:
            return _error(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
            )
        user, _, scopes = grant
        needed = MAIL_SEND if path.endswith(("/sendMail", "/send")) else MAIL_READ_WRITE
        if not self.mailboxes.knows(user) or needed not in scopes:
            return _error(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        return user

    def _route(self, request: web.Request, path: str, body: bytes, user: str) -> web.Response:
        method = request.method
        if method == "POST" and path == "/me/sendMail":
            return self._send_mail(body, user)
        if method == "POST" and path == "/me/messages":
            return self._create_draft(body, user)
        match = re.fullmatch(r"/me/messages/([^/]+)(/.*)?", path)
        draft_id = match.group(1) if match else ""
        if draft_id not in self._drafts:
            return _error(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        rest = match.group(2) or ""
        if method == "DELETE" and not rest:
            del self._drafts[draft_id]
            self.deleted_drafts += 1
            return web.Response(status=204)
        if method == "POST" and rest == "/send":
            return self._send_draft(draft_id)
        if method == "POST" and rest == "/attachments":
            return self._add_attachment(draft_id, body)
        if method == "POST" and rest == "/attachments/createUploadSession":
            return self._create_upload_session(request, draft_id, body)
        return _error(405, "ErrorInvalidRequest", f"{method} {path}")

    def _send_mail(self, body: bytes, user: str) -> web.Response:
        mime = _mime(body)
        if mime is None:
            return _error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        refused = self._check_sender(mime, user)
        if refused is not None:
            return refused
        message = _message(mime, "sendMail", user)
        if not message.recipients:
            return _error(400, "ErrorInvalidRecipients", "At least one recipient is not valid.")
        self._sent(message)
        return web.Response(status=202)

    def _sent(self, message: SentMessage) -> None:
        self.messages.append(message)
        self.mailboxes.accepted(message.mailbox or self.mailbox, time.monotonic())

    def _create_draft(self, body: bytes, user: str) -> web.Response:
        mime = _mime(body)
        if mime is None:
            return _error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        draft_id = f"AAMkAD{next(self._ids):06d}{secrets.token_urlsafe(6)}="
        self._drafts[draft_id] = _Draft(mime, user)
        return web.json_response({"id": draft_id, "isDraft": True}, status=201)

    def _send_draft(self, draft_id: str) -> web.Response:
        draft = self._drafts.pop(draft_id)
        refused = self._check_sender(draft.mime, draft.mailbox)
        if refused is not None:
            return refused
        message = _message(draft.mime, "draft", draft.mailbox)
        message.attachments = tuple(draft.attachments)
        self._sent(message)
        return web.Response(status=202)

    def _add_attachment(self, draft_id: str, body: bytes) -> web.Response:
        item = json.loads(body)
        data = base64.b64decode(item["contentBytes"])
        self._drafts[draft_id].attachments.append((item["name"], item.get("contentType", ""), data))
        return web.json_response({"id": secrets.token_hex(6)}, status=201)

    def _create_upload_session(
        self, request: web.Request, draft_id: str, body: bytes
    ) -> web.Response:
        item = json.loads(body)["AttachmentItem"]
        session = secrets.token_hex(8)
        self._uploads[session] = _Upload(
            draft_id, item["name"], item.get("contentType", ""), item["size"]
        )
        url = (
            f"https://127.0.0.1:{self.port}/upload/{session}?authtoken={secrets.token_urlsafe(24)}"
        )
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 900))
        return web.json_response(
            {"uploadUrl": url, "expirationDateTime": expires, "nextExpectedRanges": ["0-"]},
            status=201,
        )

    def _upload(self, request: web.Request, path: str, body: bytes) -> web.Response:
        upload = self._uploads.get(path.removeprefix("/upload/"))
        authorized = "Authorization" in request.headers
        self.upload_puts.append((len(upload.received) if upload else -1, len(body), authorized))
        if upload is None or "authtoken" not in request.query:
            return _error(404, "ErrorItemNotFound", "No such upload session.")
        if authorized:  # the URL is pre-authenticated; Outlook refuses a second credential
            return _error(401, "InvalidAuthenticationToken", "Do not send an Authorization header.")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", request.headers.get("Content-Range", ""))
        if match is None or request.method != "PUT":
            return _error(400, "ErrorInvalidRequest", "A Content-Range header is required.")
        start, end, total = (int(group) for group in match.groups())
        if start != len(upload.received) or end - start + 1 != len(body) or total != upload.size:
            return _error(400, "ErrorInvalidRequest", "The range is not the next expected one.")
        if len(body) > CHUNK_LIMIT:
            return _error(413, "ErrorRequestEntityTooLarge", "A range must be at most 4 MB.")
        upload.received += body
        if len(upload.received) < upload.size:
            return web.json_response({"nextExpectedRanges": [str(len(upload.received))]})
        draft = self._drafts.get(upload.draft)
        if draft is None:
            return _error(404, "ErrorItemNotFound", "The draft is gone.")
        draft.attachments.append((upload.name, upload.content_type, bytes(upload.received)))
        return web.Response(
            status=201, headers={"Location": f"/attachments/{secrets.token_hex(6)}"}
        )

    def _check_sender(self, mime: bytes, user: str) -> web.Response | None:
        header = BytesHeaderParser().parsebytes(mime)
        senders = [address for _, address in getaddresses(header.get_all("From") or [])]
        denied = [s for s in senders if not self.mailboxes.may_send_as(user, s)]
        if denied:
            self.mailboxes.send_as_refused[user.lower()] += 1
            return _error(
                403,
                "ErrorSendAsDenied",
                f"The user account which was used to submit this request does not have the"
                f" right to send mail on behalf of the specified sending account {denied[0]}.",
            )
        return None


def _route(path: str) -> str:
    path = re.sub(r"/me/messages/[^/]+", "/me/messages/{id}", path)
    return "/upload/{session}" if path.startswith("/upload/") else path.removeprefix("/v1.0")


def _mime(body: bytes) -> bytes | None:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return None


def _message(mime: bytes, via: str, mailbox: str = "") -> SentMessage:
    header = BytesHeaderParser().parsebytes(mime)

    def field_addresses(name: str) -> tuple[str, ...]:
        return tuple(address for _, address in getaddresses(header.get_all(name) or []) if address)

    return SentMessage(
        mime,
        field_addresses("To"),
        field_addresses("Cc"),
        field_addresses("Bcc"),
        via=via,
        mailbox=mailbox,
    )


def _error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message}}
    return web.json_response(body, status=status, headers=headers)

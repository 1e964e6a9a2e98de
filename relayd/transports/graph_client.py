"""Microsoft Graph over HTTPS (aiohttp): the requests relayd makes, and what came back.

One ``aiohttp.ClientSession`` per transport, with the system CAs plus
``upstream.ca_file`` and a timeout per request. At most ``GRAPH_CONCURRENCY`` requests
are in flight at once, whatever path a message takes: Graph allows four concurrent
requests per mailbox and answers more with 429 ("Microsoft Graph throttling
guidance", Outlook service limits). The client judges nothing: it returns a
``GraphReply`` (status, Graph's error code and text, ``request-id``, ``Retry-After``)
and the transport decides. Nothing here ever shows a token or an upload URL (the URL
carries its own token: it is registered with the log redactor).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp

from relayd.config import Settings
from relayd.ops.logging import redactor

GRAPH_CONCURRENCY = 4  # Graph: 4 concurrent requests per app and mailbox
# Above this, base64 and JSON work goes to a thread rather than the event loop.
INLINE_ENCODE_LIMIT = 256 * 1024


@dataclass(frozen=True)
class GraphReply:
    """One HTTP answer: Graph's status, error code and message, and its request-id."""

    status: int
    code: str = ""  # Graph's error.code, e.g. ErrorAccessDenied
    message: str = ""
    request_id: str = ""
    retry_after: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def text(self) -> str:
        """``429 ApplicationThrottled: … (request-id …)``: one line for logs and DSNs."""
        words = f"{self.status} {self.code}: {self.message}" if self.code else str(self.status)
        if self.request_id:
            words += f" (request-id {self.request_id})"
        return " ".join(words.split())[:450]


@dataclass(frozen=True)
class Exchange:
    """One request and its answer, for `relayd send-test --direct` to print."""

    step: str  # "POST /me/sendMail", "PUT upload URL (bytes 0-4194303/6291456)"
    detail: str  # what was sent, in words
    reply: GraphReply | None  # None: no answer (error is then set)
    error: str = ""
    seconds: float = 0.0


class GraphUnreachable(Exception):
    """No HTTP answer: connection refused, TLS failure, timeout."""

    def __init__(self, detail: str, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


class GraphPaused(GraphUnreachable):
    """Not sent: the transport paused (429) while this request waited for a slot."""


class GraphClient:
    """The Graph requests relayd makes for one mailbox (``/me`` is the signed-in user)."""

    def __init__(
        self, settings: Settings, *, observer: Callable[[Exchange], None] | None = None
    ) -> None:
        self.settings = settings
        self.base = settings.upstream.graph_url.rstrip("/")
        self.observer = observer
        self.in_flight = 0
        # Asked once a request has its slot, just before it goes: a reason not to send
        # it now (the transport paused while the request queued behind four others).
        self.gate: Callable[[], str | None] = lambda: None
        self._slots = asyncio.Semaphore(GRAPH_CONCURRENCY)
        self._session: aiohttp.ClientSession | None = None

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings  # the timeout applies from the next request

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the requests ------------------------------------------------------------------

    async def send_mail(self, token: str, mime: bytes) -> GraphReply:
        """POST /me/sendMail with the MIME in base64 (Content-Type text/plain): 202."""
        body = await _encoded(mime)
        return await self._call("POST", "/me/sendMail", token, body, "text/plain")

    async def create_draft(self, token: str, mime: bytes) -> GraphReply:
        """POST /me/messages with the MIME: 201 and the draft (its ``id``)."""
        body = await _encoded(mime)
        return await self._call("POST", "/me/messages", token, body, "text/plain")

    async def add_attachment(self, token: str, draft: str, item: dict[str, Any]) -> GraphReply:
        """POST /me/messages/{id}/attachments: a file under 3 MB in one request."""
        body = await _json(item)
        return await self._call("POST", f"{_path(draft)}/attachments", token, body)

    async def create_upload_session(
        self, token: str, draft: str, item: dict[str, Any]
    ) -> GraphReply:
        """POST …/attachments/createUploadSession: 201 and the pre-authenticated URL."""
        body = json.dumps({"AttachmentItem": item}).encode()
        path = f"{_path(draft)}/attachments/createUploadSession"
        reply = await self._call("POST", path, token, body)
        url = reply.data.get("uploadUrl")
        if isinstance(url, str):
            redactor.register(url)  # it authenticates by itself: never print it
        return reply

    async def upload_chunk(self, url: str, chunk: bytes, start: int, total: int) -> GraphReply:
        """PUT bytes to the upload URL with Content-Range and *no* Authorization header:
        the URL carries its own token, and Outlook refuses a request with both."""
        end = start + len(chunk) - 1
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{end}/{total}",
        }
        step = f"PUT upload URL (bytes {start}-{end}/{total})"
        return await self._request("PUT", url, step, headers, chunk)

    async def send_draft(self, token: str, draft: str) -> GraphReply:
        """POST /me/messages/{id}/send: 202."""
        return await self._call("POST", f"{_path(draft)}/send", token, b"")

    async def delete_draft(self, token: str, draft: str) -> GraphReply:
        return await self._call("DELETE", _path(draft), token, None)

    # --- HTTP ------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        token: str,
        body: bytes | None,
        content_type: str = "application/json",
    ) -> GraphReply:
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = content_type
        step = f"{method} {_shown(path)}"
        return await self._request(method, self.base + path, step, headers, body)

    async def _request(
        self, method: str, url: str, step: str, headers: dict[str, str], body: bytes | None
    ) -> GraphReply:
        detail = f"{len(body)} bytes" if body else "no body"
        started = time.monotonic()
        async with self._slots:
            paused = self.gate()
            if paused:
                raise GraphPaused(paused)
            self.in_flight += 1
            try:
                reply = await self._exchange(method, url, headers, body)
            except GraphUnreachable as error:
                self._observe(Exchange(step, detail, None, str(error), time.monotonic() - started))
                raise
            finally:
                self.in_flight -= 1
        self._observe(Exchange(step, detail, reply, seconds=time.monotonic() - started))
        return reply

    async def _exchange(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> GraphReply:
        session = await self._client()
        timeout = aiohttp.ClientTimeout(total=self.settings.upstream.timeout)
        try:
            async with session.request(
                method, url, headers=headers, data=body, timeout=timeout
            ) as response:
                raw = await response.read()
                return _reply(response.status, response.headers, raw)
        except TimeoutError as error:
            raise GraphUnreachable(f"no answer within {self._timeout_text()}", True) from error
        except (aiohttp.ClientError, OSError, ssl.SSLError) as error:
            raise GraphUnreachable(_describe(error)) from error

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Loading the system CA store reads files: not on the event loop.
            context = await asyncio.to_thread(tls_context, self.settings.upstream.ca_file)
            connector = aiohttp.TCPConnector(ssl=context, limit=2 * GRAPH_CONCURRENCY)
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
        return self._session

    def _observe(self, exchange: Exchange) -> None:
        if self.observer is not None:
            self.observer(exchange)

    def _timeout_text(self) -> str:
        return f"{self.settings.upstream.timeout:g}s (upstream.timeout)"


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system CAs (and ``upstream.ca_file``: a TLS-inspecting proxy), TLS 1.2+."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def _reply(status: int, headers: Any, raw: bytes) -> GraphReply:
    data: dict[str, Any] = {}
    if raw:
        try:
            parsed = json.loads(raw)
            data = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            data = {}
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    return GraphReply(
        status=status,
        code=str(error.get("code") or ""),
        message=str(error.get("message") or ""),
        request_id=headers.get("request-id", "") or headers.get("client-request-id", ""),
        retry_after=retry_after(headers.get("Retry-After")),
        data=data,
    )


def retry_after(value: str | None) -> float | None:
    """RFC 9110 §10.2.3: seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _path(draft: str) -> str:
    return f"/me/messages/{urllib.parse.quote(draft, safe='')}"


def _shown(path: str) -> str:
    """The path as printed: a draft's long id shortened to {id}."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1:3] == ["me", "messages"]:
        parts[3] = "{id}"
    return "/".join(parts)


async def _encoded(mime: bytes) -> bytes:
    if len(mime) <= INLINE_ENCODE_LIMIT:
        return base64.b64encode(mime)
    return await asyncio.to_thread(base64.b64encode, mime)


async def _json(item: dict[str, Any]) -> bytes:
    if len(str(item.get("contentBytes", ""))) <= INLINE_ENCODE_LIMIT:
        return json.dumps(item).encode()
    return await asyncio.to_thread(lambda: json.dumps(item).encode())


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]

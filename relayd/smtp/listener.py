"""The SMTP listener: the fast path in front of aiosmtpd, on the daemon's loop, with the
relay's limits and replies.

A session starts on the fast path (relayd.smtp.fastpath), which answers the commands
of a plain message as they arrive; any other line hands the session to aiosmtpd's
protocol (``RelaySMTP``, relayd.smtp.protocol, with a few overrides where aiosmtpd's
own behaviour is not what a relay may do). relayd's rules live in ``RelayHandler``,
the same for both. Every reply code cites the RFC section that chose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from aiosmtpd.smtp import Envelope, Session

from relayd import headers
from relayd.config import ListenSettings, listen_hosts
from relayd.ops.logging import PerMessageLogger
from relayd.ops.metrics import Metrics
from relayd.queue.model import Envelope as SpoolEnvelope
from relayd.queue.model import SpoolError, SpoolFull, new_queue_id
from relayd.queue.spool import Spool
from relayd.smtp.addresses import bad_address_reply, valid_mailbox, valid_recipient
from relayd.smtp.fastpath import FastPath, FastPathSettings
from relayd.smtp.protocol import RelaySMTP

log = structlog.get_logger("relayd.listener")
per_message_log = PerMessageLogger("relayd.listener")


class ClientSession(Protocol):
    """What the hooks read of a session, on the fast path (FastPath) or in aiosmtpd
    (RelaySMTP)."""

    session: Session | None
    envelope: Envelope | None
    client_address: Any
    data_rest: tuple[bytes | memoryview, ...]
    transport: Any


class RelayHandler:
    """aiosmtpd hooks: limits, address checks, and the durable commit at end of DATA."""

    def __init__(
        self,
        settings: ListenSettings,
        spool: Spool,
        metrics: Metrics,
        *,
        hostname: str,
        on_queued: Callable[[str], None] = lambda queue_id: None,
        on_queued_from: Callable[[str, str], None] | None = None,
        content_policy: Callable[[SpoolEnvelope, bytes], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.hostname = hostname
        self.on_queued = on_queued
        # With the envelope sender too (routes: the sender chooses the mailbox).
        self.on_queued_from = on_queued_from
        self.content_policy = content_policy
        self.sessions: set[ClientSession] = set()
        self.closing = False  # set at shutdown: finish transactions, start no new ones

    # --- connection --------------------------------------------------------------

    def connection_refusal(self, protocol: ClientSession) -> str | None:
        address = protocol.client_address
        if address is None or not any(address in net for net in self.settings.allowed_clients):
            self.metrics.reject("access_denied")
            log.warning("connection refused", client=str(address), reason="not in allowed_clients")
            # RFC 5321 §3.1: a server may answer 554 instead of 220 and close.
            return f"554 5.7.1 Access denied: {address} may not relay through this host"
        if self.closing:
            # RFC 5321 §3.8: 421 when the service is shutting down.
            return "421 4.3.2 relayd is shutting down; try again later"
        if len(self.sessions) >= self.settings.max_connections:
            self.metrics.reject("too_many_connections")
            log.warning("connection refused", client=str(address), reason="too many connections")
            # RFC 5321 §3.8 / §4.2.2: 421 tells the client to come back later.
            return "421 4.7.0 Too many connections; try again later"
        return None

    def session_opened(self, protocol: ClientSession) -> None:
        self.sessions.add(protocol)
        self.metrics.smtp_sessions.set(len(self.sessions))

    def session_closed(self, protocol: ClientSession) -> None:
        self.sessions.discard(protocol)
        self.metrics.smtp_sessions.set(len(self.sessions))

    # --- hooks -------------------------------------------------------------------

    async def handle_MAIL(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        return self.mail_reply(envelope, address, options)

    async def handle_RCPT(
        self, server: RelaySMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        return self.rcpt_reply(envelope, address, options)

    def mail_reply(self, envelope: Envelope, address: str, options: list) -> str:
        """MAIL FROM's reply (the envelope takes the sender when it is 250); the same
        for aiosmtpd's hook and the fast path."""
        if self.closing:
            # RFC 5321 §3.8: a transaction under way may finish; a new one gets 421.
            return "421 4.3.2 relayd is shutting down; try again later"
        # The null reverse-path stays "<>" during the session (aiosmtpd tests the
        # sender for truth) and becomes "" in the spool.
        if address != "<>" and not valid_mailbox(address, options):
            self.metrics.reject("bad_address")
            return bad_address_reply(address, options, "5.1.7")
        declared = _declared_size(options)
        if not self.spool.has_room_for(declared):
            self.metrics.reject("disk")
            # RFC 5321 §4.5.3.1.10 / RFC 3463: 452 4.3.1 insufficient system storage.
            return "452 4.3.1 Insufficient system storage; try again later"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    def rcpt_reply(self, envelope: Envelope, address: str, options: list) -> str:
        """RCPT TO's reply (the envelope takes the recipient when it is 250)."""
        if not valid_recipient(address, envelope.mail_options):
            self.metrics.reject("bad_address")
            return bad_address_reply(address, envelope.mail_options, "5.1.3")
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            self.metrics.reject("too_many_recipients")
            # RFC 5321 §4.5.3.1.10: 452 for too many recipients; send the rest later.
            return f"452 4.5.3 Too many recipients (at most {self.settings.max_recipients})"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: ClientSession, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        content = envelope.original_content or b""
        summary = headers.summarize(content)
        if summary.received_count > self.settings.max_received_headers:
            self.metrics.reject("loop")
            return (
                f"554 5.4.6 Routing loop detected: more than {self.settings.max_received_headers}"
                " Received: headers (RFC 5321 6.3)"
            )
        if summary.from_count > 1:
            self.metrics.reject("sender_policy")
            # RFC 5322 §3.6: exactly one From:. Which one is the author cannot be told, and
            # Exchange would judge the message by a From: nobody chose. RFC 5321 §4.3.2
            # 554 at the end of DATA; RFC 3463 5.6.0, a problem with the content.
            return (
                f"554 5.6.0 Message refused: it has {summary.from_count} From: header"
                " fields; RFC 5322 3.6 allows exactly one"
            )
        queue_id = new_queue_id()
        spool_envelope = _spool_envelope(server, envelope)
        if self.content_policy is not None:
            refusal = self.content_policy(spool_envelope, content)
            if refusal:
                self.metrics.reject("sender_policy")
                return refusal
        stored, message_id = self._with_trace_fields(content, summary, queue_id, server, envelope)
        # A big message's other parts follow as they are (no copy of the whole message).
        parts = (stored, *server.data_rest)
        reply = await self._commit(queue_id, spool_envelope, parts)
        if reply.startswith("250"):
            self.metrics.accept_duration.observe(time.perf_counter() - started)
            size = sum(len(part) for part in parts)
            self._log_received(queue_id, spool_envelope, size, message_id)
            if self.on_queued_from is not None:
                self.on_queued_from(queue_id, spool_envelope.sender)
            else:
                self.on_queued(queue_id)
        return reply

    async def handle_exception(self, error: Exception) -> str:
        log.exception("unexpected error in SMTP session")
        # Never 250 for something that went wrong; 451 asks the client to retry.
        return "451 4.3.0 Internal error; please try again later"

    # --- helpers -----------------------------------------------------------------

    def refuse_data(self, problem: str) -> str:
        """The reply for a DATA that was read to its end but cannot be accepted."""
        replies = {
            "too_big": (
                "too_big",
                f"552 5.3.4 Message too big: relayd accepts at most"
                f" {accepted_size(self.settings)} bytes (listen.max_message_size less"
                f" {headers.ADDED_AT_MOST} kept for the header fields relayd adds)",
            ),
            "line_too_long": (
                "line_too_long",
                f"500 5.5.6 Line longer than {self.settings.max_line_length} octets"
                " (RFC 5321 4.5.3.1.6); use quoted-printable or base64",
            ),
            # RFC 5321 §2.3.8: only CRLF ends a line; bare CR/LF is how SMTP smuggling
            # hides a second message. Postfix answers the same with smtpd_forbid_bare_newline.
            "bare_line_ending": (
                "smuggling",
                "550 5.5.2 Message refused: bare <CR> or <LF> found; lines must end with"
                " <CR><LF> (RFC 5321 2.3.8)",
            ),
        }
        reason, reply = replies[problem]
        self.metrics.reject(reason)
        log.warning("message refused", reason=reason)
        return reply

    def _with_trace_fields(
        self,
        content: bytes,
        summary: headers.HeaderSummary,
        queue_id: str,
        server: ClientSession,
        envelope: Envelope,
    ) -> tuple[bytes, str]:
        now = time.time()
        session = server.session
        assert session is not None
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if envelope.smtp_utf8:
            protocol = "UTF8SMTP"
        received = headers.received_field(
            helo=session.host_name or "",
            client_ip=str(server.client_address or "unknown"),
            hostname=self.hostname,
            queue_id=queue_id,
            protocol=protocol,
            recipients=tuple(envelope.rcpt_tos),
            when=now,
        )
        added, message_id = headers.missing_fields(
            summary, queue_id=queue_id, hostname=self.hostname, when=now
        )
        return received + added + content, message_id

    async def _commit(
        self, queue_id: str, envelope: SpoolEnvelope, content: tuple[bytes | memoryview, ...]
    ) -> str:
        try:
            await self.spool.commit(queue_id, envelope, content)
        except SpoolFull:
            self.metrics.reject("disk")
            log.error("spool below min_free_space; refusing mail", queue_id=queue_id)
            return "452 4.3.1 Insufficient system storage; try again later"
        except (SpoolError, OSError) as error:
            self.metrics.reject("spool_error")
            log.error("cannot store message", queue_id=queue_id, error=str(error))
            # RFC 5321 §4.2.2: 451 local error in processing; the client keeps the mail.
            return "451 4.3.0 Temporary failure storing the message; please try again"
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _log_received(
        self, queue_id: str, envelope: SpoolEnvelope, size: int, message_id: str
    ) -> None:
        self.metrics.messages_received.inc()
        self.metrics.message_size.observe(size)
        per_message_log.info(
            "received",
            queue_id=queue_id,
            client=envelope.client,
            sender=envelope.sender or "<>",
            recipients=len(envelope.recipients),
            size=size,
            message_id=message_id,
        )


def _spool_envelope(server: ClientSession, envelope: Envelope) -> SpoolEnvelope:
    session = server.session
    assert session is not None
    return SpoolEnvelope(
        sender="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
        recipients=tuple(envelope.rcpt_tos),
        client=str(server.client_address or ""),
        helo=session.host_name or "",  # printable_name() made it storable
        received_at=time.time(),
        mail_options=tuple(
            option for option in envelope.mail_options if not option.startswith("SIZE=")
        ),
    )


def accepted_size(settings: ListenSettings) -> int:
    """The SIZE advertised and enforced (RFC 1870): listen.max_message_size less the room
    kept for what relayd adds, so that every message it accepts fits the upstream."""
    return settings.max_message_size - headers.ADDED_AT_MOST


def _declared_size(options: list) -> int:
    for option in options:
        if option.startswith("SIZE="):
            with contextlib.suppress(ValueError):
                return int(option[5:])
    return 0


class Listener:
    """Owns the listening socket and the open sessions; supports live reconfiguration."""

    def __init__(
        self,
        handler: RelayHandler,
        settings: ListenSettings,
        hostname: str,
        *,
        fast_path: bool = True,
    ) -> None:
        """``fast_path=False``: every session in aiosmtpd from its greeting (the tests
        compare the two)."""
        self.handler = handler
        self.settings = settings
        self.hostname = hostname
        self.fast_path = fast_path
        self._server: asyncio.base_events.Server | None = None
        self._template: RelaySMTP | None = None
        self._fast_settings: FastPathSettings | None = None

    def _protocol(self) -> FastPath | RelaySMTP:
        # One full aiosmtpd __init__ per setting change, a cheap copy per connection.
        if self._template is None:
            self._template = self._new_template()
            self._fast_settings = FastPathSettings.of(self._template, self._template.spawn)
        if self.fast_path and self._fast_settings is not None:
            return FastPath(self.handler, self._fast_settings)
        return self._template.spawn()

    def _new_template(self) -> RelaySMTP:
        return RelaySMTP(
            self.handler,
            data_size_limit=accepted_size(self.settings),
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.hostname,
            ident="relayd ESMTP",
            timeout=self.settings.idle_timeout,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            host=listen_hosts(self.settings.address),  # "localhost": 127.0.0.1 and ::1
            port=self.settings.port,
            reuse_address=True,
            backlog=512,
        )

    @property
    def bound_port(self) -> int:
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    def reconfigure(self, settings: ListenSettings) -> None:
        """Apply new limits and allowed clients to new sessions (SIGHUP)."""
        self.settings = settings
        self.handler.settings = settings
        self._template = None

    async def stop(self, grace: float) -> None:
        """Stop accepting, let sessions in a transaction finish, then close the rest."""
        self.handler.closing = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        # Polling: a session's transaction state (the fast path's or aiosmtpd's) has no
        # event to wait on.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            _in_transaction(session) for session in self.handler.sessions
        ):
            await asyncio.sleep(0.05)
        for session in list(self.handler.sessions):
            if session.transport is not None:
                with contextlib.suppress(Exception):
                    # RFC 5321 §3.8: 421 before closing a session the server ends.
                    session.transport.write(b"421 4.3.2 relayd is shutting down; try later\r\n")
                session.transport.close()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1)


def _in_transaction(session: ClientSession) -> bool:
    envelope = session.envelope
    return bool(envelope is not None and (envelope.mail_from is not None or envelope.rcpt_tos))

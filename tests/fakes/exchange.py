"""A fake Exchange Online SMTP submission server (smtp.office365.com:587) for tests.

A real aiosmtpd server on loopback: STARTTLS with a trustme certificate, AUTH
(XOAUTH2 only) offered after STARTTLS, the bearer token checked by a pluggable
``validator(user, token) -> bool``. It behaves like Exchange Online where relayd
depends on it:

* EHLO offers PIPELINING (RFC 2920), as Exchange Online's does; ``pipelining =
  False`` leaves it out, and a client must then send one command at a time;
* several mailboxes may sign in (``mailboxes=``, ``add_mailbox``), each with its own
  Send As rights, connection count and message rate (tests/fakes/mailboxes.py);
* a connection beyond ``max_connections`` (3) of one mailbox gets ``432 4.3.2`` at
  AUTH (Exchange counts per mailbox);
* a ``MAIL FROM`` or ``From:`` that is not the signed-in mailbox or an address it has
  Send As on gets ``554 5.2.252 SendAsDenied`` after DATA (``send_as_check = "mail"``:
  the older ``550 5.7.60`` at MAIL FROM instead);
* ``mailboxes.rate_limit(mailbox, n, per)``: Exchange's messages per minute, scaled,
  the excess delayed (or refused with ``mode="refuse"``);
* ``fail(stage, reply)`` answers a stage (connect, auth, mail, rcpt, data) with any
  reply (451, 421, 432 4.3.2, 535 5.7.3, 535 5.7.139, ...), ``refuse_recipient``
  answers one address with a 5xx, ``drop(stage)`` / ``drop_every`` close the
  connection without a reply, ``reply_delay`` slows every reply, ``go_down`` /
  ``come_up`` stop and restart the listener.

It records every accepted message (envelope, exact bytes, the mailbox that signed in
to send it, when), connection counts and the peak number of concurrent connections,
overall and per mailbox.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from tests.fakes.mailboxes import Mailboxes
from tests.fakes.wire import (
    from_addresses,
    parse_xoauth2,
    relay_config,
    server_tls_context,
)

HOSTNAME = "FAKE01.PROD.OUTLOOK.COM"
MAILBOX = "relay@contoso.example"  # not @example.com: serve refuses the example's placeholder
DROP = "<drop the connection>"
STAGES = ("connect", "auth", "mail", "rcpt", "data")

AUTH_OK = "235 2.7.0 Authentication successful"
BAD_TOKEN = f"535 5.7.3 Authentication unsuccessful [{HOSTNAME}]"
AUTH_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the"
    f" Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [{HOSTNAME}]"
)
TOO_MANY_CONNECTIONS = "432 4.3.2 Concurrent connections limit exceeded"
SERVICE_UNAVAILABLE = "421 4.3.2 Service not available, closing transmission channel"
TRY_LATER = "451 4.7.500 Server busy. Please try again later"
# Exchange's older (and on-premises) wording, at MAIL FROM.
SEND_AS_DENIED_AT_MAIL = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
RECIPIENT_NOT_FOUND = (
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
)

# aiosmtpd 1.4 sets its own deprecated Session.login_data after every successful AUTH
# and warns about it itself, once per connection: noise in every test and benchmark.
logging.getLogger("mail.log").addFilter(
    lambda record: "login_data is deprecated" not in record.getMessage()
)


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    recipients: tuple[str, ...]
    content: bytes
    connection: int
    mailbox: str = ""  # the XOAUTH2 user that delivered it
    at: float = 0.0  # time.monotonic() when it was accepted


@dataclass
class _Failure:
    reply: str
    times: int | None  # None: until cleared


@dataclass
class Stats:
    connections_total: int = 0
    connections_now: int = 0
    peak_connections: int = 0
    dropped: int = 0  # connections closed without a reply (drop, drop_every)
    auth_attempts: int = 0
    auth_failures: int = 0
    tokens_seen: list[str] = field(default_factory=list)


class FakeExchange:
    """Start with ``await start()``; ``port`` is then the listening port."""

    def __init__(
        self,
        ca: trustme.CA,
        *,
        validator: Any,
        mailbox: str = MAILBOX,
        send_as: tuple[str, ...] = (),
        mailboxes: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        max_connections: int = 3,
    ) -> None:
        """``mailbox`` (with Send As on ``send_as``) and ``mailboxes`` may sign in."""
        self.host = host
        self.port = 0
        self.mailbox = mailbox
        self.mailboxes = Mailboxes(mailbox, send_as)
        for other in mailboxes:
            self.mailboxes.add(other)
        self.send_as = self.mailboxes.send_as(mailbox)  # the default mailbox's, live
        self.send_as_check = "data"  # or "mail": refuse at MAIL FROM (550 5.7.60)
        self.pipelining = True
        self.validator = validator
        self.max_connections = max_connections
        self.tls_context = server_tls_context(ca)
        self.messages: list[ReceivedMessage] = []
        self.stats = Stats()
        self.refused_recipients: dict[str, str] = {}
        self.reply_delay = 0.0
        self.drop_every = 0  # drop every Nth connection at the end of DATA
        self._failures: dict[str, list[_Failure]] = {stage: [] for stage in STAGES}
        self._sessions: set[_ExchangeSMTP] = set()
        self._server: asyncio.base_events.Server | None = None
        self._ids = itertools.count(1)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> FakeExchange:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ExchangeSMTP(self), self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.go_down()

    async def go_down(self) -> None:
        """Stop listening and cut every open connection (an outage)."""
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def come_up(self) -> None:
        await self.start()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    # --- switches --------------------------------------------------------------------

    def fail(self, stage: str, reply: str, times: int | None = None) -> None:
        """Answer ``stage`` with ``reply`` (``times`` times, or until ``clear``)."""
        assert stage in STAGES, stage
        self._failures[stage].append(_Failure(reply, times))

    def drop(self, stage: str, times: int | None = None) -> None:
        """Close the connection at ``stage`` without answering."""
        self.fail(stage, DROP, times)

    def add_mailbox(self, mailbox: str, *send_as: str) -> None:
        """Another account that may sign in, with Send As on ``send_as`` (shared mailboxes)."""
        self.mailboxes.add(mailbox, *send_as)

    def grant_send_as(self, mailbox: str, *addresses: str) -> None:
        """Add-RecipientPermission -Identity ADDRESS -Trustee MAILBOX -AccessRights SendAs."""
        self.mailboxes.grant_send_as(mailbox, *addresses)

    def revoke_send_as(self, mailbox: str, *addresses: str) -> None:
        self.mailboxes.revoke_send_as(mailbox, *addresses)

    def disconnect(self, mailbox: str) -> int:
        """Close every connection signed in as ``mailbox`` (a session revoked, a server
        restarted): the next connection has to sign in again. Returns how many."""
        sessions = [s for s in self._sessions if s.mailbox.lower() == mailbox.lower()]
        for session in sessions:
            if session.transport is not None:
                session.transport.close()
        return len(sessions)

    def refuse_recipient(self, address: str, reply: str = RECIPIENT_NOT_FOUND) -> None:
        self.refused_recipients[address.lower()] = reply

    def clear(self) -> None:
        for failures in self._failures.values():
            failures.clear()
        self.refused_recipients.clear()
        self.reply_delay = 0.0
        self.drop_every = 0

    # --- what happened ---------------------------------------------------------------

    def relay_config(self, ca_file: Path, **upstream: Any) -> dict:
        """Config overrides that point relayd at this fake (oauth ids are placeholders)."""
        return relay_config(self.host, self.port, self.mailbox, ca_file, **upstream)

    def received_by(self, address: str) -> list[ReceivedMessage]:
        return [m for m in self.messages if address in m.recipients]

    def sent_through(self, mailbox: str) -> list[ReceivedMessage]:
        """The messages the signed-in ``mailbox`` delivered."""
        return [m for m in self.messages if m.mailbox.lower() == mailbox.lower()]

    def peak_connections_of(self, mailbox: str) -> int:
        """The most connections signed in as ``mailbox`` at once."""
        return self.mailboxes.peak[mailbox.lower()]

    # --- internals ---------------------------------------------------------------------

    def take(self, stage: str) -> str | None:
        failures = self._failures[stage]
        if not failures:
            return None
        failure = failures[0]
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                failures.pop(0)
        return failure.reply

    def opened(self, session: _ExchangeSMTP) -> None:
        self._sessions.add(session)
        self.stats.connections_total += 1
        self.stats.connections_now += 1
        self.stats.peak_connections = max(self.stats.peak_connections, self.stats.connections_now)

    def closed(self, session: _ExchangeSMTP) -> None:
        self._sessions.discard(session)
        self.stats.connections_now -= 1

    def permitted(self, address: str, mailbox: str | None = None) -> bool:
        return self.mailboxes.may_send_as(mailbox or self.mailbox, address)

    def send_as_denied(self, mailbox: str, sender: str) -> str:
        self.mailboxes.send_as_refused[mailbox.lower()] += 1
        if self.send_as_check == "mail":
            return SEND_AS_DENIED_AT_MAIL
        return (
            f"554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {sender};"
            " STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied;"
            f" Failed to process message due to a permanent exception [{HOSTNAME}]"
        )

    def record(
        self, envelope: Envelope, connection: int, mailbox: str = "", at: float | None = None
    ) -> str:
        """Keep an accepted message; ``at``: when it counts as submitted (its rate slot)."""
        at = time.monotonic() if at is None else at
        self.messages.append(
            ReceivedMessage(
                mail_from=envelope.mail_from,
                recipients=tuple(envelope.rcpt_tos),
                content=envelope.original_content,
                connection=connection,
                mailbox=mailbox,
                at=at,
            )
        )
        self.mailboxes.accepted(mailbox or self.mailbox, at)
        return f"250 2.0.0 OK <{next(self._ids)}@{HOSTNAME}> [Hostname={HOSTNAME}]"


class _Handler:
    """aiosmtpd hooks (and the XOAUTH2 mechanism) for the fake."""

    def __init__(self, fake: FakeExchange) -> None:
        self.fake = fake

    async def handle_EHLO(
        self,
        server: _ExchangeSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves it to a hook that answers EHLO
        if not self.fake.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def auth_XOAUTH2(self, server: _ExchangeSMTP, args: list[str]) -> AuthResult:
        fake = self.fake
        fake.stats.auth_attempts += 1
        if len(args) > 1:
            initial = args[1]
        else:
            # aiosmtpd's challenge_auth returns the decoded client response.
            initial = base64.b64encode(await server.challenge_auth("", encode_to_b64=False))
        user, token = parse_xoauth2(initial)
        if token:
            fake.stats.tokens_seen.append(token)
        override = fake.take("auth")
        if override == DROP:
            server.drop()
            return AuthResult(success=False, handled=True)
        if override:
            return self._refuse(override)
        if not fake.mailboxes.knows(user) or not fake.validator(user, token):
            return self._refuse(BAD_TOKEN)
        # Learn: "Up to three concurrent connections are allowed" per mailbox.
        if fake.mailboxes.open[user.lower()] + 1 > fake.max_connections:
            return self._refuse(TOO_MANY_CONNECTIONS)
        server.signed_in(user)
        return AuthResult(success=True, auth_data=user, message=AUTH_OK)

    def _refuse(self, reply: str) -> AuthResult:
        # A failed AuthResult needs handled=False and a message, or aiosmtpd says
        # nothing and the client hangs.
        self.fake.stats.auth_failures += 1
        return AuthResult(success=False, handled=False, message=reply)

    async def handle_MAIL(
        self, server: _ExchangeSMTP, session: Session, envelope: Envelope, address: str, options
    ) -> str:
        override = self.fake.take("mail")
        if override:
            return server.answer(override)
        user = server.mailbox or self.fake.mailbox
        if self.fake.send_as_check == "mail" and not self.fake.permitted(address, user):
            return self.fake.send_as_denied(user, address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: _ExchangeSMTP, session: Session, envelope: Envelope, address: str, options
    ) -> str:
        refusal = self.fake.refused_recipients.get(address.lower())
        override = refusal or self.fake.take("rcpt")
        if override:
            return server.answer(override)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        fake = self.fake
        override = fake.take("data")
        if fake.drop_every and server.number % fake.drop_every == 0:
            override = DROP
        if override:
            return server.answer(override)
        user = server.mailbox or fake.mailbox
        senders = [envelope.mail_from or "", *from_addresses(envelope.original_content or b"")]
        denied = [s for s in senders if not fake.permitted(s, user)]
        if denied:
            return fake.send_as_denied(user, denied[0])
        arrived = time.monotonic()
        admitted = fake.mailboxes.admit(user, arrived)
        if isinstance(admitted, str):
            return server.answer(admitted)
        if admitted:
            await asyncio.sleep(admitted)  # the excess is "carried over" (Learn)
        return fake.record(envelope, server.number, user, arrived + admitted)


class _ExchangeSMTP(SMTP):
    def __init__(self, fake: FakeExchange) -> None:
        super().__init__(
            _Handler(fake),
            hostname=HOSTNAME,
            ident="Microsoft ESMTP MAIL Service ready (fake)",
            tls_context=fake.tls_context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=36 * 1024 * 1024,
        )
        self.fake = fake
        self.number = 0
        self.mailbox = ""  # the XOAUTH2 user, once signed in
        self._counted = False
        self._dropped = False

    def signed_in(self, mailbox: str) -> None:
        if not self.mailbox:
            self.mailbox = mailbox
            self.fake.mailboxes.connected(mailbox)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._counted:  # called again after STARTTLS for the TLS transport
            self._counted = True
            self.fake.opened(self)
            self.number = self.fake.stats.connections_total

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._counted:
            self._counted = False
            self.fake.closed(self)
        if self.mailbox:
            self.fake.mailboxes.disconnected(self.mailbox)
            self.mailbox = ""

    async def _handle_client(self) -> None:
        override = self.fake.take("connect")
        if override:
            await self.push(self.answer(override))
            if self.transport is not None:
                self.transport.close()
            return
        try:
            await super()._handle_client()
        except asyncio.CancelledError:
            # A client hung up. aiosmtpd closes the connection only when that happens in
            # its command loop; during a (slowed) greeting it would stay open, half
            # closed, and count against max_connections until aiosmtpd's 5-minute timeout.
            if self.transport is not None:
                self.transport.close()
            raise

    def answer(self, reply: str) -> str:
        if reply == DROP:
            self.drop()
        return reply

    def drop(self) -> None:
        if not self._dropped:
            self.fake.stats.dropped += 1
        self._dropped = True
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: Any) -> None:
        if self._dropped:
            return
        if self.fake.reply_delay:
            await asyncio.sleep(self.fake.reply_delay)
        await super().push(status)
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        if text.startswith("421") and self.transport is not None:
            self.transport.close()  # RFC 5321 §3.8: 421 closes the channel

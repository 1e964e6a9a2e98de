"""aiosmtplib's client with a data phase that keeps RFC 5321's two waits apart.

aiosmtplib's ``data()`` sends DATA, waits for ``354``, writes the content and waits for
the reply to the final dot, all under one timeout (``upstream.timeout``, 60 s), and it
raises the same ``SMTPDataError`` whether the DATA command or the message was refused.
Neither is good enough for a relay:

* RFC 5321 §4.5.3.2.6 asks a client to wait 10 minutes for the reply to the final
  dot ("the server may be processing the message"); a client that gives up sooner
  sends the message again at every retry, and against a server that keeps answering
  slowly the copies pile up. The reply to DATA itself is a command reply
  (§4.5.3.2.4, 2 minutes): ``upstream.timeout`` stays right for it.
* A refusal of the DATA command leaves the transaction open (RSET is needed before the
  session carries another message), and nothing was sent: Exchange counted nothing.
  A refusal after the dot ends the transaction, and the message did reach Exchange.
* A connection lost or a reply timed out after the final dot is ambiguous: the server
  may have taken the message (Postfix: "may be sent more than once").

``RelaySMTP.data`` therefore waits for ``354`` within ``timeout`` and for the final
reply within ``reply_timeout``, and says which step failed by the exception it raises.
``RelaySMTP.pipeline`` sends MAIL, the RCPTs and DATA in one write when the server
offers PIPELINING (RFC 2920, relayd.transports.pipelining); ``mail``, ``rcpt`` and
``data`` then take their replies from that group and behave exactly as they do sent one
at a time, so the transaction's decisions are written once.

``relayd send-test --direct`` subclasses it (``relayd.tools.sendtrace.TracedSMTP``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import Literal

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import normalize_message_line_endings
from aiosmtplib.typing import Default

from relayd.transports.pipelining import (
    START_INPUT,
    GroupReplies,
    PipeliningProtocol,
    command_line,
)

DATA_LINE = b"DATA\r\n"
# aiosmtplib parses every address with email.utils.parseaddr at each MAIL and RCPT (a
# tenth of the SMTP client's CPU per message, bench/README.md "What profiling
# changed"); a relay sends the same few senders and recipients over and over. The
# result depends on the string alone; a refused address (ValueError) is not cached.
_quoted = functools.lru_cache(maxsize=4096)(quote_address)


class DataCommandRefused(aiosmtplib.SMTPDataError):
    """DATA was answered with something other than 354: nothing was sent, and the
    transaction is still open on the server (RSET before reusing the session)."""


class AmbiguousOutcome(aiosmtplib.SMTPException):
    """The whole message was written, then the reply to the final dot never came (the
    connection broke, the wait timed out, the reply was unreadable). The upstream may
    have accepted it. The session is closed."""

    def __init__(self, cause: BaseException) -> None:
        text = str(cause) or type(cause).__name__
        super().__init__(f"no reply to the final dot: {text}")
        self.timed_out = isinstance(cause, TimeoutError)


class RelaySMTP(aiosmtplib.SMTP):
    """aiosmtplib.SMTP whose ``data`` has separate waits for 354 and the final reply,
    and which can pipeline a transaction's commands (``pipeline``)."""

    _group: GroupReplies | None = None

    async def pipeline(
        self,
        sender: str,
        recipients: Iterable[str],
        /,
        *,
        options: Iterable[str],
        encoding: str,
        timeout: float | None,  # noqa: ASYNC109 (aiosmtplib's own call style)
    ) -> None:
        """MAIL FROM, RCPT TO for each recipient and DATA in one write, when the server
        offers PIPELINING (RFC 2920 §3.1). The next ``mail``, ``rcpt`` and ``data`` calls,
        for the same sender and recipients in that order, take their replies from the
        group. Nothing is sent when the server does not pipeline or an address cannot be
        written on a command line: the commands then go one at a time, and the address
        is refused there as always."""
        protocol = self.protocol
        if not isinstance(protocol, PipeliningProtocol) or not self.supports_extension(
            "pipelining"
        ):
            return
        try:
            lines = [command_line(*_address_words(b"MAIL FROM:", sender, options, encoding))]
            lines += [
                command_line(*_address_words(b"RCPT TO:", rcpt, (), encoding))
                for rcpt in recipients
            ]
        except ValueError:
            return
        lines.append(DATA_LINE)
        replies, error = await protocol.execute_group(b"".join(lines), len(lines), timeout)
        if error is not None or any(
            reply.code == aiosmtplib.SMTPStatus.domain_unavailable for reply in replies
        ):
            self.close()  # as aiosmtplib closes after a timeout, a hang-up or a 421
        self._group = GroupReplies(lines, replies, error)

    def close(self) -> None:
        self._group = None
        super().close()

    async def rset(
        self,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        """RSET, after what is left of a pipelined group is dropped. A server that took
        a DATA whose content will not come reads any next command as message text: that
        session is closed instead (never an empty message sent to end it)."""
        group, self._group = self._group, None
        if group is not None and group.awaits_content():
            self.close()
            raise aiosmtplib.SMTPServerDisconnected("closed: DATA accepted, no content to send")
        return await super().rset(timeout=timeout)

    async def _create_connection(
        self,
        timeout: float | None,  # noqa: ASYNC109 (aiosmtplib's own signature)
    ) -> aiosmtplib.SMTPResponse:
        """aiosmtplib's connection set-up, with ``PipeliningProtocol`` (host and port:
        what the transport configures; no socket or Unix path)."""
        if self.loop is None:
            raise RuntimeError("No event loop set")
        hostname, port = self.hostname or "localhost", self.port or self._get_default_port()
        protocol = PipeliningProtocol(
            loop=self.loop, connection_lost_callback=self._on_connection_lost
        )
        tls = await self._get_tls_context() if self.use_tls else None
        connecting = self.loop.create_connection(
            lambda: protocol,
            host=hostname,
            port=port,
            ssl=tls,
            ssl_handshake_timeout=timeout if tls else None,
            server_hostname=hostname if tls else None,
            local_addr=self.source_address,
        )
        try:
            transport, _ = await asyncio.wait_for(connecting, timeout=timeout)
        except TimeoutError as exc:
            raise aiosmtplib.SMTPConnectTimeoutError(
                f"Timed out connecting to {hostname} on port {port}"
            ) from exc
        except OSError as exc:
            raise aiosmtplib.SMTPConnectError(
                f"Error connecting to {hostname} on port {port}: {exc}"
            ) from exc
        self.protocol, self.transport = protocol, transport
        try:
            response = await protocol.read_response(timeout=timeout)
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise aiosmtplib.SMTPConnectError(
                f"Error connecting to {hostname} on port {port}: {exc}"
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise aiosmtplib.SMTPConnectTimeoutError(
                "Timed out waiting for server ready message"
            ) from exc
        if response.code != aiosmtplib.SMTPStatus.ready:
            raise aiosmtplib.SMTPConnectResponseError(response.code, response.message)
        return response

    async def mail(
        self,
        sender: str,
        /,
        *,
        options: Iterable[str] | None = None,
        encoding: str = "ascii",
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        """aiosmtplib's ``mail`` (the same command, checks and exceptions), with the
        sender's quoted form cached."""
        response = await self._address_command(b"MAIL FROM:", sender, options, encoding, timeout)
        if response.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
        return response

    async def rcpt(
        self,
        recipient: str,
        /,
        *,
        options: Iterable[str] | None = None,
        encoding: str = "ascii",
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        """aiosmtplib's ``rcpt`` (250 or 251, else SMTPRecipientRefused), with the
        recipient's quoted form cached."""
        response = await self._address_command(b"RCPT TO:", recipient, options, encoding, timeout)
        if response.code not in (
            aiosmtplib.SMTPStatus.completed,
            aiosmtplib.SMTPStatus.will_forward,
        ):
            raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
        return response

    async def _address_command(
        self,
        command: bytes,
        address: str,
        options: Iterable[str] | None,
        encoding: str,
        timeout: float | Literal[Default.token] | None,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        """MAIL FROM:<address> or RCPT TO:<address> with its options, sent alone or
        answered from the pipelined group."""
        words = _address_words(command, address, options, encoding)
        if self._group is not None:
            return self._take(command_line(*words))
        await self._ehlo_or_helo_if_needed()
        return await self.execute_command(*words, timeout=timeout)

    def _take(self, line: bytes) -> aiosmtplib.SMTPResponse:
        """The reply to ``line`` from the pipelined group (the group ends after DATA)."""
        group = self._group
        assert group is not None
        try:
            return group.take(line)
        finally:
            if group.finished:
                self._group = None

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (aiosmtplib's own call style)
        reply_timeout: float | None = None,
    ) -> aiosmtplib.SMTPResponse:
        """DATA, the content, the final dot; the final reply (250), or an exception:
        ``DataCommandRefused``, ``SMTPDataError`` (the message was refused after the
        dot), ``AmbiguousOutcome``, or aiosmtplib's own before anything was sent."""
        content = message.encode("ascii") if isinstance(message, str) else message
        # A timeout or a lost connection here closes the session (aiosmtplib).
        if self._group is not None:
            start = self._take(DATA_LINE)
        else:
            start = await self.execute_command(b"DATA", timeout=timeout)
        if start.code != START_INPUT:
            raise DataCommandRefused(start.code, start.message)
        protocol = self.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        try:
            protocol.write(_dot_stuffed(content))
            reply = await protocol.read_response(timeout=reply_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as error:
            self.close()
            raise AmbiguousOutcome(error) from error
        except aiosmtplib.SMTPResponseException as error:  # garbage, or a reply too long
            self.close()
            raise AmbiguousOutcome(error) from error
        if reply.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        return reply


def _address_words(
    command: bytes, address: str, options: Iterable[str] | None, encoding: str
) -> tuple[bytes, ...]:
    """The words of MAIL FROM:<address> or RCPT TO:<address> and its options, as
    aiosmtplib sends them (``b"MAIL FROM:"`` is the verb and its argument's start)."""
    verb, start = command.split(b" ")
    parameters = [option.encode("ascii") for option in options or ()]
    return (verb, start + _quoted(address).encode(encoding), *parameters)


def _dot_stuffed(content: bytes) -> bytes:
    """The content as it goes on the wire (RFC 5321 §4.5.2), with the final dot.

    Line endings are normalized exactly as aiosmtplib's own ``data()`` does it.
    """
    lines = _normalized(content)
    stuffed = lines.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def _normalized(content: bytes) -> bytes:
    """``normalize_message_line_endings``, skipped for content that already has CRLF
    line endings only and ends with one (what the spool keeps): three byte counts
    cost less than the regular expression's pass over the whole message."""
    crlf = content.count(b"\r\n")
    if crlf == content.count(b"\n") == content.count(b"\r") and content.endswith(b"\r\n"):
        return content
    return normalize_message_line_endings(content)

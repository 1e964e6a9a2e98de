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
``relayd send-test --direct`` subclasses it (``relayd.tools.sendtrace.TracedSMTP``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Literal

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import normalize_message_line_endings
from aiosmtplib.typing import Default

START_INPUT = 354
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
    """aiosmtplib.SMTP whose ``data`` has separate waits for 354 and the final reply."""

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
        """MAIL FROM:<address> or RCPT TO:<address> with its options, as aiosmtplib
        sends them (``b"MAIL FROM:"`` is the verb and its argument's start)."""
        await self._ehlo_or_helo_if_needed()
        verb, start = command.split(b" ")
        parameters = [option.encode("ascii") for option in options or ()]
        argument = start + _quoted(address).encode(encoding)
        return await self.execute_command(verb, argument, *parameters, timeout=timeout)

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

"""SMTP command pipelining (RFC 2920) for aiosmtplib's client.

A relay sends MAIL, one RCPT per recipient and DATA for every message; sent one at a
time, each waits a round trip for its reply, and each costs a TLS record and a wake-up
on both sides. RFC 2920 §3.1 lets a client that saw PIPELINING in the EHLO reply send
them in one write and read the replies in order (Postfix's smtp client does so by
default, ``smtp_pipelining``).

aiosmtplib reads one reply per command: bytes that arrive while a parsed reply waits
for its reader are dropped, so the replies of a group would be lost.
``PipeliningProtocol`` is aiosmtplib's protocol that, while a group is out, keeps every
byte and parses every reply of the group. ``GroupReplies`` hands them out, in the
order of the commands, to the code that would have sent each command alone.
"""

from __future__ import annotations

import asyncio
from collections import deque

import aiosmtplib
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol

START_INPUT = 354  # RFC 5321 §4.3.2: the server now takes the message content


def command_line(verb: bytes, *arguments: bytes) -> bytes:
    """One command line as aiosmtplib's ``execute_command`` writes it, and refused for
    the same bytes (a control character could inject a second command)."""
    for argument in arguments:
        if COMMAND_INJECTION_REGEX.search(argument):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join((verb, *arguments)) + b"\r\n"


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, able to collect the replies to commands written at once."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._group: list[aiosmtplib.SMTPResponse] | None = None
        self._group_size = 0
        self._group_done: asyncio.Future[None] | None = None

    async def execute_group(
        self,
        commands: bytes,
        count: int,
        timeout: float | None,  # noqa: ASYNC109 (aiosmtplib's own call style)
    ) -> tuple[list[aiosmtplib.SMTPResponse], aiosmtplib.SMTPException | None]:
        """Write ``commands`` (``count`` command lines) in one write; the replies that came,
        in order, and what ended the reading before all ``count`` came (else None)."""
        if self._command_lock is None:
            return [], aiosmtplib.SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            group: list[aiosmtplib.SMTPResponse] = []
            done = self._loop.create_future()
            self._group, self._group_size, self._group_done = group, count, done
            try:
                self.write(commands)
                self._collect()
                await asyncio.wait_for(done, timeout)
                error = None
            except TimeoutError:
                error = aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
            except aiosmtplib.SMTPException as failure:
                error = failure
            finally:
                self._group, self._group_done = None, None
                del self._buffer[:]  # replies to no command: dropped, as aiosmtplib drops them
        return group, error

    def data_received(self, data: bytes) -> None:
        if self._group is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        self._collect()

    def _collect(self) -> None:
        """Parse every complete reply of the group in the buffer; finish when all came."""
        group, done = self._group, self._group_done
        if group is None or done is None or done.done():
            return
        try:
            while len(group) < self._group_size:
                response = self._read_response_from_buffer()
                if response is None:
                    if len(self._buffer) > MAX_RESPONSE_LENGTH:  # aiosmtplib's bound
                        raise aiosmtplib.SMTPResponseException(
                            aiosmtplib.SMTPStatus.invalid_response.value, "Response too long"
                        )
                    return
                group.append(response)
        except aiosmtplib.SMTPException as error:
            self._end_group(error)
            return
        done.set_result(None)

    def _end_group(self, error: aiosmtplib.SMTPException) -> None:
        done = self._group_done
        if done is not None and not done.done():
            done.set_exception(error)
            done.exception()  # retrieved: nobody may await it after a timeout

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._end_group(lost)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        self._end_group(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()


class GroupReplies:
    """The replies to one pipelined group, taken in the order the commands were sent.

    Past the last reply that came, ``take`` raises what ended the reading, as the
    command would have raised sent alone."""

    def __init__(
        self,
        lines: list[bytes],
        replies: list[aiosmtplib.SMTPResponse],
        error: aiosmtplib.SMTPException | None,
    ) -> None:
        self._lines = deque(lines)
        self._replies = deque(replies)
        self._error = error or aiosmtplib.SMTPServerDisconnected("Connection lost")

    def take(self, line: bytes) -> aiosmtplib.SMTPResponse:
        expected = self._lines.popleft() if self._lines else None
        if line != expected:  # a bug: the caller's commands are not the group's
            raise RuntimeError(f"pipelined {expected!r} answered for {line!r}")
        if not self._replies:
            raise self._error
        return self._replies.popleft()

    @property
    def finished(self) -> bool:
        return not self._lines

    def awaits_content(self) -> bool:
        """The server accepted a DATA no one will follow with the content: the session
        then takes any next command as message text, so it cannot be reset, only closed."""
        return (
            bool(self._replies)
            and self._replies[-1].code == START_INPUT
            and (len(self._replies) == len(self._lines))
        )

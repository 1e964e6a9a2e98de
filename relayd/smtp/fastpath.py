"""The listener's fast path: the commands of a plain message answered as they arrive,
in front of aiosmtpd; anything else goes on in aiosmtpd, with the session's state.

aiosmtpd reads each command line through a StreamReader and a task step, and runs a
coroutine per command: with a new connection per message (the EAP's pattern: seven
commands and replies per message), that machinery was a third of the event loop's
time (bench/README.md). Here, ``data_received`` splits the lines itself and answers
HELO, EHLO, MAIL, RCPT, DATA, RSET, NOOP and QUIT when their outcome is the one
aiosmtpd and ``RelaySMTP`` would give: a well-formed line, in a state where the
relay's own rules (``RelayHandler``) decide the reply. Only the end of DATA, the
durable commit, runs in a task.

Every other line (another command, a syntax error, a command out of sequence, a
non-ASCII or over-long line, a MAIL parameter other than SIZE, BODY and SMTPUTF8)
hands the connection to aiosmtpd: a ``RelaySMTP`` takes the transport, the session
(HELO name, ESMTP or not) and the envelope so far, and reads that line and the rest
of the session itself. The fast path never guesses a reply; when in doubt it hands
over, so every reply is aiosmtpd's or the same as aiosmtpd's
(tests/integration/test_fastpath.py sends the same scripts both ways).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import Envelope, Session

from relayd.smtp.addresses import printable_name, split_command_path
from relayd.smtp.content import check_data
from relayd.smtp.idle import IdleSweep
from relayd.smtp.protocol import RelaySMTP, peer_address
from relayd.smtp.wording import safe_reply

if TYPE_CHECKING:
    from relayd.smtp.listener import RelayHandler

# RFC 5321 §4.5.3.1.4: 512 octets with the CRLF. aiosmtpd measures the line without
# it and allows a longer MAIL after EHLO (SIZE, SMTPUTF8); a line over this is handed
# over, and aiosmtpd applies its own limits.
_SMTP_LOG = logging.getLogger("mail.log")  # aiosmtpd's logger, for the same lines
_COMMAND_LINE = 512
_END_OF_DATA = b"\r\n.\r\n"
_DATA_TURN = 128 * 1024  # DATA read for one session in one turn of the event loop
_PENDING_PAUSE = 64 * 1024  # pipelined bytes held unanswered before reading pauses


@dataclass(frozen=True)
class FastPathSettings:
    """What every session of one listener configuration shares."""

    hostname: str
    data_size_limit: int
    idle: IdleSweep  # listen.idle_timeout, for every session of this listener
    greeting: bytes
    ehlo_reply: bytes
    hand_over: Callable[[], RelaySMTP]  # a fresh aiosmtpd protocol for this listener

    @classmethod
    def of(cls, template: RelaySMTP, hand_over: Callable[[], RelaySMTP]) -> FastPathSettings:
        """The replies aiosmtpd's ``template`` gives (smtp_EHLO's lines, in its order:
        SIZE, 8BITMIME without decode_data, SMTPUTF8; no STARTTLS or AUTH, which
        relayd's listener never offers)."""
        ehlo = ["250-" + template.hostname]
        if template.data_size_limit:
            ehlo.append(f"250-SIZE {template.data_size_limit}")
        ehlo += ["250-8BITMIME", "250-SMTPUTF8", "250 HELP"]
        return cls(
            hostname=template.hostname,
            data_size_limit=template.data_size_limit or 0,
            idle=IdleSweep(template._timeout_duration),
            greeting=_reply_bytes(f"220 {template.hostname} {template.__ident__}"),
            ehlo_reply=b"".join(_reply_bytes(line) for line in ehlo),
            hand_over=hand_over,
        )


class FastPath(asyncio.Protocol):
    """One SMTP session, on the fast path until a line needs aiosmtpd."""

    def __init__(self, handler: RelayHandler, settings: FastPathSettings) -> None:
        self.relay = handler
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None  # asyncio's or uvloop's stream transport
        self.session: Session | None = None
        self.envelope = Envelope()
        self.client_address: Any = None
        self.data_rest: tuple[bytes | memoryview, ...] = ()  # RelayHandler.handle_DATA reads it
        self._buffer = bytearray()  # command bytes not yet answered
        self._data: bytearray | None = None  # DATA being read
        self._data_dropped = False  # over the size limit: read to its end, not kept
        self._dots = 0  # line-start dots in DATA's first ``_counted`` bytes
        self._counted = 0
        self._reading_held = False  # paused: see _update_reading
        self._turn_bytes = 0  # DATA read in this turn of the event loop
        self._replies_held = False  # the transport's write buffer is over its high-water mark
        self._commit: asyncio.Task | None = None
        self._eof = False
        self.idle_deadline = 0.0  # the IdleSweep closes the session once past it

    # --- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] (a stream transport)
        self.session = Session(self.loop)
        self.session.peer = transport.get_extra_info("peername")
        self.client_address = peer_address(self.session.peer)
        refusal = self.relay.connection_refusal(self)
        if refusal:
            transport.write(_reply_bytes(refusal))
            transport.close()
            self.transport = None  # never a session: nothing to count at the close
            return
        self.relay.session_opened(self)
        transport.write(self.settings.greeting)
        self._reset_timeout()
        self.settings.idle.watch(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        # As aiosmtpd: a session whose client went away ends, its commit included
        # (the client has no 250, so it keeps the message and sends it again).
        if self._commit is not None:
            self._commit.cancel()
        self._close()

    def eof_received(self) -> bool:
        # The client will send nothing more. A commit under way still gets its reply,
        # and the commands after it theirs (aiosmtpd cancels the commit instead).
        self._eof = True
        if self._commit is None and self.transport is not None:
            self.transport.close()
        return True

    def _close(self) -> None:
        self.settings.idle.unwatch(self)
        if self.transport is not None:
            self.transport = None
            self.relay.session_closed(self)

    # --- idle timeout ----------------------------------------------------------------

    def _reset_timeout(self) -> None:
        """A command moves the deadline on; the listener's IdleSweep watches it."""
        self.idle_deadline = self.loop.time() + self.settings.idle.timeout

    def timed_out(self) -> None:
        if self.transport is not None:
            self.transport.close()  # as aiosmtpd's _timeout_cb: no reply, closed

    # --- bytes in --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._data is not None:
            self._data_received(data)
            return
        self._buffer += data
        if self._commit is None and not self._replies_held:
            self._answer_lines()
        else:
            self._update_reading()  # pipelined bytes wait for the commit or the client

    # A client that sends commands without reading the replies would make them pile
    # up in the transport: as aiosmtpd's drain() after each reply, reading stops while
    # the transport's buffer is over its high-water mark.
    def pause_writing(self) -> None:
        self._replies_held = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._replies_held = False
        if self._commit is None and self._data is None:
            self._answer_lines()

    def _update_reading(self) -> None:
        """Read from the client unless its replies wait unread, its pipelined commands
        wait for a commit, or its DATA had this turn's share of the event loop."""
        hold = (
            self._replies_held
            or self._turn_bytes >= _DATA_TURN
            or (self._commit is not None and len(self._buffer) > _PENDING_PAUSE)
        )
        self._hold_reading(hold)

    def _hold_reading(self, hold: bool) -> None:
        if hold != self._reading_held and self.transport is not None:
            self._reading_held = hold
            (self.transport.pause_reading if hold else self.transport.resume_reading)()

    def _next_turn(self) -> None:
        self._turn_bytes = 0
        self._update_reading()

    def _answer_lines(self) -> None:
        """Answer the complete lines in the buffer, up to a DATA, a commit, a full
        transport or a line for aiosmtpd; the buffer is cut once, not per line."""
        buffer = self._buffer
        start = 0
        hand_over = False
        while self._open() and self._data is None and self._commit is None:
            if self._replies_held:
                break  # resume_writing answers the rest
            end = buffer.find(b"\n", start)
            if end < 0:
                hand_over = len(buffer) - start > _COMMAND_LINE  # aiosmtpd's 500 for it
                break
            if not self._answer(bytes(buffer[start : end + 1])):
                hand_over = True
                break
            start = end + 1
        del buffer[:start]
        if hand_over:
            self._hand_over()
            return
        self._update_reading()
        if self._data is not None and buffer:
            data = bytes(buffer)
            buffer.clear()
            self._data_received(data)

    def _answer(self, line: bytes) -> bool:
        """Answer one command line as aiosmtpd would; False when it must answer."""
        if len(line) > _COMMAND_LINE or not line.endswith(b"\r\n") or not line.isascii():
            return False
        text = line[:-2].decode("ascii")
        if not text.isprintable():
            return False  # control characters (and CR, LF, TAB): aiosmtpd's reading
        if _SMTP_LOG.isEnabledFor(logging.INFO):  # relayd at debug level: aiosmtpd's lines
            _log_command(self.session, line)
        command, _, arg = text.partition(" ")
        answer = _COMMANDS.get(command.upper())
        if answer is None:
            return False
        self._reset_timeout()
        return answer(self, arg.strip() if arg else None)

    def _send(self, replies: bytes) -> None:
        self.transport.write(replies)
        if _SMTP_LOG.isEnabledFor(logging.DEBUG):
            peer = self.session and self.session.peer
            for reply in replies.splitlines():
                _SMTP_LOG.debug("%r << %r", peer, reply)

    def _open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def _write(self, reply: str) -> None:
        assert self.transport is not None
        self._send(_reply_bytes(reply))
        if reply.startswith("421"):
            # RFC 5321 §3.8: a server that answers 421 closes the channel.
            self.transport.close()

    # --- commands --------------------------------------------------------------------
    # Each mirrors aiosmtpd's smtp_<COMMAND> (with RelaySMTP's overrides) in the cases
    # it takes, and returns False for the others: aiosmtpd answers those.

    def _helo(self, arg: str | None) -> bool:
        if not arg:
            return False
        self._greeted(arg, extended=False)
        self._write("250 " + self.settings.hostname)
        return True

    def _ehlo(self, arg: str | None) -> bool:
        if not arg:
            return False
        self._greeted(arg, extended=True)
        self._send(self.settings.ehlo_reply)
        return True

    def _greeted(self, name: str, extended: bool) -> None:
        assert self.session is not None
        self.envelope = Envelope()
        self.session.extended_smtp = extended
        self.session.host_name = printable_name(name)

    def _mail(self, arg: str | None) -> bool:
        path = self._path(arg, "FROM:")
        if path is None or self.envelope.mail_from:
            return False
        address, params = path
        options = params.upper().split()
        smtp_utf8 = self._known_mail_options(options)
        if smtp_utf8 is None:
            return False
        self.envelope.smtp_utf8 = smtp_utf8
        self._write(self.relay.mail_reply(self.envelope, address, options))
        return True

    def _known_mail_options(self, options: list[str]) -> bool | None:
        """Whether SMTPUTF8 is among ``options`` when all are ones aiosmtpd accepts
        as given (BODY=7BIT or 8BITMIME, SMTPUTF8, SIZE within the limit); else None."""
        smtp_utf8 = False
        for option in options:
            if option == "SMTPUTF8":
                smtp_utf8 = True
            elif not self._known_option(*option.partition("=")[::2]):
                return None
        return smtp_utf8

    def _known_option(self, name: str, value: str) -> bool:
        if name == "BODY":
            return value in ("7BIT", "8BITMIME")
        return name == "SIZE" and value.isdigit() and int(value) <= self._size_limit()

    def _size_limit(self) -> int:
        return self.settings.data_size_limit or 1 << 63

    def _rcpt(self, arg: str | None) -> bool:
        if not self.envelope.mail_from:
            return False
        path = self._path(arg, "TO:")
        if path is None or path[1]:
            return False  # RCPT parameters: aiosmtpd knows none (555)
        self._write(self.relay.rcpt_reply(self.envelope, path[0], []))
        return True

    def _path(self, arg: str | None, keyword: str) -> tuple[str, str] | None:
        """The address and parameters of MAIL/RCPT, when aiosmtpd would take them to the
        relay's hook; None when aiosmtpd answers the line itself."""
        assert self.session is not None
        if not self.session.host_name or not arg or arg[: len(keyword)].upper() != keyword:
            return None
        address, params = split_command_path(arg[len(keyword) :].strip())
        if not address or (params and not self.session.extended_smtp):
            return None
        return address, params

    def _data_command(self, arg: str | None) -> bool:
        assert self.session is not None
        if not self.session.host_name or not self.envelope.rcpt_tos or arg:
            return False
        self._write("354 End data with <CR><LF>.<CR><LF>")
        self._data = bytearray()
        self._data_dropped = False
        self._dots = self._counted = 0
        return True

    def _rset(self, arg: str | None) -> bool:
        if arg:
            return False
        self.envelope = Envelope()
        self._write("250 OK")
        return True

    def _noop(self, arg: str | None) -> bool:
        self._write("250 OK")
        return True

    def _quit(self, arg: str | None) -> bool:
        if arg:
            return False
        self._write("221 Bye")
        assert self.transport is not None
        self.transport.close()
        return True

    # --- DATA ------------------------------------------------------------------------

    def _data_received(self, chunk: bytes) -> None:
        """Gather DATA up to the line "." (RFC 5321 §4.1.1.4), as read_data does: only
        CRLF "." CRLF ends it, the first CRLF may be the DATA command's, and past the
        size limit the bytes are read and dropped."""
        data = self._data
        assert data is not None
        self._reset_timeout()  # RFC 5321 §4.5.3.2.5: the timeout is per data block
        self._take_turn(len(chunk))
        start = max(len(data) - 4, 0)
        data += chunk
        if not self._data_dropped and start == 0 and data.startswith(b".\r\n"):
            self._end_of_data(0, 3)  # an empty message: the DATA line's CRLF began it
            return
        end = data.find(_END_OF_DATA, start)
        if end >= 0:
            self._end_of_data(end + 2, end + 5)
        elif not self._data_dropped and self._over_limit(data, len(data) - 2):
            # Too big, whatever follows (the message holds at least all but the last
            # two bytes): keep only what an end-of-data marker could begin in.
            self._data_dropped = True
            del data[:-4]

    def _take_turn(self, size: int) -> None:
        """A big message's bytes wait in the socket after _DATA_TURN in one turn of the
        event loop. uvloop reads a ready socket again and again while it has data
        (libuv: up to 32 reads), so two 30 MiB senders held the other sessions'
        replies (p99 72-97 ms against 36 with aiosmtpd, whose StreamReader stops
        reading at 128 KiB for its buffer; bench/README.md)."""
        if self._turn_bytes == 0:
            self.loop.call_soon(self._next_turn)
        self._turn_bytes += size
        if self._turn_bytes >= _DATA_TURN:
            self._update_reading()

    def _over_limit(self, data: bytearray, upto: int) -> bool:
        """Whether data[:upto], without its stuffing dots, is over the size limit
        (RFC 1870 §3 counts the message as stored). The dots are counted once, as
        far as a question needs them: none for a message under the limit. (At the
        end, ``upto`` is never short of what was counted: the marker search starts
        4 bytes before a chunk, the counting 2 before the end of the last one.)"""
        limit = self._size_limit()
        if upto <= limit:
            return False
        if upto > self._counted:
            self._dots += data.count(b"\r\n.", max(self._counted - 2, 0), upto)
            self._counted = upto
        return upto - self._dots - data.startswith(b".") > limit

    def _end_of_data(self, content_end: int, marker_end: int) -> None:
        data = self._data
        assert data is not None
        self._data = None
        self._buffer[:0] = data[marker_end:]  # pipelined commands after the "."
        too_big = self._data_dropped or self._over_limit(data, content_end)
        del data[content_end:]
        self._commit = self.loop.create_task(self._finish_data(None if too_big else data))

    async def _finish_data(self, data: bytearray | None) -> None:
        try:
            status = await self._data_reply(data)
        except Exception as error:  # as aiosmtpd's command loop: handle_exception
            status = await self.relay.handle_exception(error)
        self.envelope = Envelope()
        self._commit = None
        if self.transport is None:
            return
        self._write(status)
        self._answer_lines()
        if self._eof and self._commit is None and self.transport is not None:
            self.transport.close()  # the client's last commands are answered

    async def _data_reply(self, data: bytearray | None) -> str:
        """RelaySMTP.smtp_DATA's end: the checks, then the relay's DATA hook."""
        if data is None:
            return self.relay.refuse_data("too_big")
        settings = self.relay.settings
        result = await check_data(data, settings.bare_line_endings, settings.max_line_length)
        del data
        if result.size > self._size_limit():  # bare line ends made CRLF grew it
            return self.relay.refuse_data("too_big")
        if result.problem is not None:
            return self.relay.refuse_data(result.problem)
        self.envelope.content = self.envelope.original_content = result.content
        self.data_rest = result.rest
        try:
            return await self.relay.handle_DATA(self, self.session, self.envelope)  # type: ignore[arg-type]
        finally:
            self.data_rest = ()

    # --- handing over ----------------------------------------------------------------

    def _hand_over(self) -> None:
        """aiosmtpd takes the connection from here: the session and envelope so far,
        and the bytes not answered yet (the line that needs it first)."""
        transport = self.transport
        assert transport is not None and self.session is not None
        self._hold_reading(False)  # aiosmtpd's reader pauses and resumes on its own
        self.settings.idle.unwatch(self)  # aiosmtpd has a timer of its own
        self.transport = None
        self.relay.session_closed(self)
        smtp = self.settings.hand_over()
        smtp.take_over(transport, self.session, self.envelope)
        if self._buffer:
            smtp.data_received(bytes(self._buffer))
            self._buffer.clear()


def _log_command(session: Session | None, line: bytes) -> None:
    """The lines aiosmtpd's command loop logs for each command."""
    _SMTP_LOG.debug("_handle_client readline: %r", line)
    _SMTP_LOG.info("%r >> %r", session and session.peer, line[:-2])


def _reply_bytes(reply: str) -> bytes:
    return safe_reply(reply.encode("utf-8", "replace")) + b"\r\n"


_COMMANDS: dict[str, Callable[[FastPath, str | None], bool]] = {
    "HELO": FastPath._helo,
    "EHLO": FastPath._ehlo,
    "MAIL": FastPath._mail,
    "RCPT": FastPath._rcpt,
    "DATA": FastPath._data_command,
    "RSET": FastPath._rset,
    "NOOP": FastPath._noop,
    "QUIT": FastPath._quit,
}

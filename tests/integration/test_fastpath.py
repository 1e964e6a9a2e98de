"""The listener's fast path (relayd.smtp.fastpath) against aiosmtpd: the same replies
to the same bytes, and a session handed over mid-way keeps what it was told.

Two listeners share one handler and spool on an event loop in a thread: one with the
fast path, one with every session in aiosmtpd from the greeting (``fast_path=False``,
how relayd listened before). A client sends each script to both, cut into the same
pieces, and the replies must be the same, line for line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.ops.metrics import Metrics
from relayd.queue.spool import Spool
from relayd.smtp.listener import Listener, RelayHandler
from tests.helpers import load_settings, spooled_messages, without_trace_fields

MAX_SIZE = 16 * 1024  # the SIZE advertised is 4 KiB less (room for relayd's fields)


class TwoListeners:
    """A fast-path listener and an aiosmtpd-only one on a loop in a thread."""

    def __init__(self, tmp_path: Path, max_size: int = MAX_SIZE) -> None:
        self.settings = load_settings(
            tmp_path, {"listen": {"max_message_size": max_size, "max_connections": 50}}
        )
        self.spool = Spool(self.settings.spool.directory)
        self.spool.recover()
        self.handler = RelayHandler(
            self.settings.listen, self.spool, Metrics(process=False), hostname="relay.test"
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.fast = self.aiosmtpd = None

    def __enter__(self) -> TwoListeners:
        self.thread.start()
        self.fast, self.aiosmtpd = (self._run(self._start(fast)) for fast in (True, False))
        return self

    async def _start(self, fast: bool) -> Listener:
        listen = self.settings.listen
        listener = Listener(self.handler, listen, "relay.test", fast_path=fast)
        listener.settings = dataclasses.replace(listen, port=0)
        await listener.start()
        return listener

    def _run(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def __exit__(self, *exc: object) -> None:
        for listener in (self.fast, self.aiosmtpd):
            self._run(listener.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def listeners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoListeners]:
    with TwoListeners(tmp_path_factory.mktemp("fastpath")) as pair:
        yield pair


def converse(port: int, pieces: list[bytes], pause: float = 0.002) -> list[bytes]:
    """Send the pieces one by one, reading the replies between them until the server
    has been quiet for ``pause`` (so the server reads each piece on its own), then read
    every reply line until the server closes the connection.

    Reading as it goes matters: a server that closes with unread bytes resets the
    connection (RFC 1122 §4.2.2.13), and the replies still unread at the client can
    be lost with it, on one side of a comparison and not the other."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            if _read_until_quiet(sock, received, pause):
                break  # the server closed: nothing more to send
        else:
            _read_until_quiet(sock, received, 5.0)
    # A queue id is new in every message: compare the rest.
    return re.sub(rb"queued as [0-9A-F]+", b"queued as ID", bytes(received)).split(b"\r\n")


def _read_until_quiet(sock: socket.socket, received: bytearray, quiet: float) -> bool:
    """Add to ``received`` what the server sends until it sends nothing for ``quiet``
    seconds; whether it closed the connection."""
    while select.select([sock], [], [], quiet)[0]:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return True
        if not chunk:
            return True
        received += chunk
    return False


# --- scripts -------------------------------------------------------------------------

GREETINGS = [b"", b"HELO client.example", b"EHLO client.example", b"ehlo client.example", b"HELO"]
MAIL_LINES = [
    b"MAIL FROM:<app@example.com>",
    b"mail from: <app@example.com>",
    b"MAIL FROM:<app@example.com> SIZE=100",
    b"MAIL FROM:<app@example.com> SIZE=99999999",
    b"MAIL FROM:<app@example.com> SIZE=",
    b"MAIL FROM:<app@example.com> BODY=8BITMIME SMTPUTF8",
    b"MAIL FROM:<app@example.com> BODY=BINARYMIME",
    b"MAIL FROM:<app@example.com> SMTPUTF8=yes",
    b"MAIL FROM:<app@example.com> FOO=1",
    b"MAIL FROM:<>",
    b"MAIL FROM:app@example.com",
    b"MAIL FROM:<a b@example.com>",
    b"MAIL FROM:<@relay.example:app@example.com>",
    b"MAIL FROM:",
    b"MAIL FROM:<app@example.com",
    b"MAIL TO:<app@example.com>",
    b"MAIL FROM:<\xc3\xa9@example.com> SMTPUTF8",
    b"MAIL FROM:<app@example.com> SIZE=1" + b" " * 520,  # over 512, within 548
]
RCPT_LINES = [
    b"RCPT TO:<user@example.com>",
    b"rcpt to:<user@example.com>",
    b"RCPT TO:<postmaster>",
    b'RCPT TO:<"a>b"@example.com>',
    b"RCPT TO:<user@example.com> NOTIFY=NEVER",
    b"RCPT TO:<user@exa mple.com>",
    b"RCPT TO:",
    b"RCPT",
]
OTHER_LINES = [
    b"HELO client.example",
    b"EHLO client.example",
    b"EHLO ",
    b"DATA",
    b"DATA now",
    b"RSET",
    b"RSET all",
    b"RSET \x1c",  # str.strip() takes \x1c away, bytes.strip() (aiosmtpd's) does not
    b"NOOP",
    b"NOOP anything",
    b"NOOP\t",
    b"QUIT now",
    b"VRFY user",
    b"HELP",
    b"AUTH PLAIN AGEAYg==",
    b"STARTTLS",
    b"HELO \x01host",
    b"",
    b"NOOP " + b"z" * 600,
]
greetings, mail_lines, rcpt_lines, other_lines = map(
    st.sampled_from, (GREETINGS, MAIL_LINES, RCPT_LINES, OTHER_LINES)
)
garbage = st.binary(max_size=40).filter(lambda b: b"\n" not in b)
# Mostly CRLF: a line the fast path cannot take hands the rest of the session to
# aiosmtpd, so odd line ends and garbage are rare enough for scripts to stay on it.
line_ends = st.sampled_from([b"\r\n"] * 14 + [b"\n", b"\r\r\n"])

body_lines = st.one_of(
    st.sampled_from([b"Subject: fast", b"", b".", b"..", b".hidden", b"From: a@example.com"]),
    st.sampled_from([b"x\n.\nMAIL FROM:<evil@example.com>", b"bare\rcr", b"L" * 1000]),
    st.integers(0, MAX_SIZE).map(lambda n: b"y" * n),
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A DATA body as a client sends it: dot-stuffed, ended by the line "." (or, now
    and then, a body that is only that line: an empty message)."""
    content = b"".join(line + b"\r\n" for line in draw(st.lists(body_lines, max_size=6)))
    return re.sub(rb"(?:^|(?<=\r\n))\.", b"..", content) + b".\r\n"


@st.composite
def transactions(draw: st.DrawFn) -> list[bytes]:
    """MAIL, one to three RCPT, DATA and a body: each line right or wrong, and now and
    then another line in between."""
    steps = [draw(mail_lines), *draw(st.lists(rcpt_lines, min_size=1, max_size=3)), b"DATA"]
    if draw(st.integers(0, 3)) == 0:
        steps.insert(draw(st.integers(0, len(steps))), draw(st.one_of(other_lines, garbage)))
    return steps


@st.composite
def scripts(draw: st.DrawFn) -> bytes:
    script = b""
    steps = [greeting] if (greeting := draw(greetings)) else []
    for _ in range(draw(st.integers(1, 4))):
        steps += draw(st.one_of(transactions(), other_lines.map(lambda line: [line])))
    for line in steps:
        script += line + draw(line_ends)
        if line == b"DATA":
            script += draw(bodies())  # refused DATA: its lines are commands, for both
    return script + b"QUIT\r\n"


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` in the pieces a network might deliver: anywhere, even mid-marker."""
    points = sorted(set(draw(st.lists(st.integers(1, max(len(data) - 1, 1)), max_size=8))))
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds) if start < end]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_the_fast_path_answers_every_script_as_aiosmtpd_does(
    listeners: TwoListeners, data: st.DataObject
) -> None:
    script = data.draw(scripts())
    pieces = data.draw(cut(script))
    assert converse(listeners.fast.bound_port, pieces) == converse(
        listeners.aiosmtpd.bound_port, pieces
    )


def _matrix() -> Iterator[bytes]:
    """Every line of the lists in each state a session can be in when it comes."""
    valid_mail = b"MAIL FROM:<app@example.com>\r\n"
    for greeting in GREETINGS:
        head = greeting + b"\r\n" if greeting else b""
        for line in MAIL_LINES + OTHER_LINES:
            line += b"\r\n.\r\n" if line == b"DATA" else b"\r\n"  # an empty message
            yield head + line
            yield head + valid_mail + b"RCPT TO:<user@example.com>\r\n" + line
        for line in RCPT_LINES:
            yield head + valid_mail + line + b"\r\nDATA\r\n.\r\n"


def test_each_line_in_each_state_gets_aiosmtpds_reply(listeners: TwoListeners) -> None:
    """The property above draws few of these combinations; all of them, once each."""
    for script in _matrix():
        pieces = [script + b"QUIT\r\n"]
        fast = converse(listeners.fast.bound_port, pieces, pause=0)
        assert fast == converse(listeners.aiosmtpd.bound_port, pieces, pause=0), script


# --- a session handed over mid-way ---------------------------------------------------


def _stored_since(spool_dir: Path, before: set[str]) -> dict[str, bytes]:
    return {key: value for key, value in spooled_messages(spool_dir).items() if key not in before}


def test_a_session_handed_to_aiosmtpd_keeps_its_sender_and_recipients(
    listeners: TwoListeners,
) -> None:
    """MAIL and one RCPT on the fast path, then VRFY (aiosmtpd's), a second RCPT and
    DATA in aiosmtpd: the stored envelope has both recipients and the sender."""
    spool_dir = Path(listeners.settings.spool.directory)
    before = set(spooled_messages(spool_dir))
    script = (
        b"EHLO client.example\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<one@example.com>\r\n"
        b"VRFY one\r\nRCPT TO:<two@example.com>\r\nDATA\r\n"
        b"Subject: handed over\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    replies = converse(listeners.fast.bound_port, [line + b"\n" for line in script.split(b"\n")])
    assert replies[0].startswith(b"220 ") and sum(r.startswith(b"220") for r in replies) == 1
    assert b"250 2.0.0 Ok: queued as ID" in replies
    (queue_id,) = _stored_since(spool_dir, before)
    _, message = listeners.spool.find(queue_id)
    assert message.envelope.sender == "app@example.com"
    assert message.envelope.recipients == ("one@example.com", "two@example.com")
    assert message.envelope.helo == "client.example"


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "aiosmtpd"])
def test_one_sessions_ehlo_never_changes_anothers_line_limits(
    listeners: TwoListeners, fast: bool
) -> None:
    """After EHLO, MAIL may be 548 octets (SIZE and SMTPUTF8 parameters, aiosmtpd's
    smtp_EHLO); a session that connects meanwhile once reset that for everyone (the
    limits were a class attribute): the first session's long MAIL got 500."""
    port = (listeners.fast if fast else listeners.aiosmtpd).bound_port
    long_mail = b"MAIL FROM:<app@example.com> SIZE=100" + b" " * 480 + b"\r\n"  # 516 + CRLF
    with socket.create_connection(("127.0.0.1", port), timeout=5) as first:
        reader = first.makefile("rb")
        reader.readline()
        first.sendall(b"EHLO client.example\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        with socket.create_connection(("127.0.0.1", port), timeout=5) as second:
            assert second.recv(1024).startswith(b"220 ")
            first.sendall(long_mail)
            assert reader.readline().startswith(b"250 ")


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "aiosmtpd"])
def test_a_second_ehlo_does_not_raise_mails_line_limit_again(
    listeners: TwoListeners, fast: bool
) -> None:
    """RFC 1870 §3 and RFC 6531 §3.4 add 26 and 10 octets to MAIL's 512, once:
    aiosmtpd's smtp_EHLO added them at every EHLO, so after two a 568-octet MAIL got
    250 from aiosmtpd and 500 from a session the fast path had handed over (found by
    the property above)."""
    port = (listeners.fast if fast else listeners.aiosmtpd).bound_port
    long_mail = b"MAIL FROM:<app@example.com> SIZE=1" + b" " * 534  # 568 octets
    script = b"EHLO client.example\r\nEHLO client.example\r\n" + long_mail + b"\r\nQUIT\r\n"
    replies = converse(port, [script])
    assert replies[-3].startswith(b"500 ") and b"too long" in replies[-3], replies


def test_a_client_that_half_closes_after_quit_gets_every_reply(listeners: TwoListeners) -> None:
    """Message, QUIT, then shutdown(SHUT_WR): the commit is not cancelled by the end of
    the client's stream; the client reads 250 for its message and 221."""
    spool_dir = Path(listeners.settings.spool.directory)
    before = set(spooled_messages(spool_dir))
    content = b"Subject: half closed\r\n\r\nbody\r\n"
    with socket.create_connection(("127.0.0.1", listeners.fast.bound_port), timeout=5) as sock:
        sock.sendall(
            b"HELO client.example\r\nMAIL FROM:<app@example.com>\r\n"
            b"RCPT TO:<user@example.com>\r\nDATA\r\n" + content + b".\r\nQUIT\r\n"
        )
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert b"250 2.0.0 Ok: queued as " in received and received.endswith(b"221 Bye\r\n")
    (stored,) = _stored_since(spool_dir, before).values()
    assert without_trace_fields(stored).endswith(content)


def test_replies_a_client_does_not_read_stop_the_reading_not_pile_up(
    listeners: TwoListeners, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined NOOPs from a client that reads nothing: the replies wait in the
    sockets, the server stops reading and its write buffer stays near the high-water
    mark (aiosmtpd awaits drain() after each reply); every reply arrives once the
    client reads."""
    # aiosmtpd's lines for a million commands would take the time (an earlier test may
    # have left mail.log at debug level, and pytest formats every line it captures).
    caplog.set_level(logging.WARNING, logger="mail.log")
    commands = memoryview(b"NOOP\r\n" * 1_000_000 + b"QUIT\r\n")
    with socket.socket() as sock:
        # Small buffers on the client's side: the kernel holds far less than the replies.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.connect(("127.0.0.1", listeners.fast.bound_port))
        assert sock.recv(1024).startswith(b"220 ")
        (session,) = (s for s in list(listeners.handler.sessions) if s.transport is not None)
        sock.setblocking(False)  # select() says when; send() never waits
        sent = _send_until_blocked(sock, commands, quiet=1.0)
        assert sent < len(commands)  # the server stopped reading: the sockets are full
        held = session.transport.get_write_buffer_size()
        received = bytearray()
        deadline = time.monotonic() + 60
        while not received.endswith(b"221 Bye\r\n") and time.monotonic() < deadline:
            writers = [sock] if sent < len(commands) else []
            readable, writable, _ = select.select([sock], writers, [], 1)
            if readable:
                received += sock.recv(1 << 20)
            if writable:
                sent += sock.send(commands[sent : sent + 65536])
    assert held < 256 * 1024, held
    assert received.count(b"250 OK\r\n") == 1_000_000 and received.endswith(b"221 Bye\r\n")


def _send_until_blocked(sock: socket.socket, data: memoryview, quiet: float) -> int:
    """Send ``data`` without reading until the socket takes nothing for ``quiet``
    seconds (or all is sent); how much was sent."""
    sent = 0
    while sent < len(data):
        _, writable, _ = select.select([], [sock], [], quiet)
        if not writable:
            break
        sent += sock.send(data[sent : sent + 65536])
    return sent


def test_a_big_message_read_over_many_turns_is_stored_as_sent(tmp_path: Path) -> None:
    """3 MiB with stuffed dots, sent at once: the fast path reads it 128 KiB per turn
    of the event loop, checks it in slices (over 256 KiB), and stores what aiosmtpd
    stores from the same bytes."""
    line = b".a line that starts with a dot, stuffed on the wire" + b"x" * 900 + b"\r\n"
    content = b"Subject: big\r\n\r\n" + line * (3 * 1024 * 1024 // len(line))
    stuffed = re.sub(rb"(?:^|(?<=\r\n))\.", b"..", content)
    with TwoListeners(tmp_path, max_size=8 * 1024 * 1024) as pair:
        spool_dir = Path(pair.settings.spool.directory)
        stored = []
        for listener in (pair.fast, pair.aiosmtpd):
            before = set(spooled_messages(spool_dir))
            script = (
                b"EHLO client.example\r\nMAIL FROM:<app@example.com>\r\n"
                b"RCPT TO:<user@example.com>\r\nDATA\r\n" + stuffed + b".\r\nQUIT\r\n"
            )
            replies = converse(listener.bound_port, [script])
            assert b"250 2.0.0 Ok: queued as ID" in replies, replies
            (message,) = _stored_since(spool_dir, before).values()
            stored.append(without_trace_fields(message))
    # Date: and Message-ID: are added to both (the content has neither), with their own
    # values; the rest is the content as sent, unstuffed.
    assert all(message.endswith(b"\r\n" + content) for message in stored)
    assert len(stored[0]) == len(stored[1])


class _RecordingTransport:
    """Enough of a stream transport for one FastPath: it records whether reading is on."""

    def __init__(self) -> None:
        self.reading = True
        self.written = bytearray()
        self.closing = False

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def _reading_during_and_after_one_turn(listener: Listener) -> tuple[bool, bool]:
    """512 KiB of DATA arrive in one turn of the event loop; whether reading is on at
    the end of that turn, and after the next one."""
    protocol = listener._protocol()
    transport = _RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(
        b"HELO client.example\r\nMAIL FROM:<app@example.com>\r\n"
        b"RCPT TO:<user@example.com>\r\nDATA\r\n"
    )
    for _ in range(8):
        protocol.data_received(b"x" * 65536)
    during = transport.reading
    await asyncio.sleep(0)
    after = transport.reading
    protocol.connection_lost(None)
    return during, after


def test_one_sessions_data_takes_at_most_128_kib_of_a_turn(listeners: TwoListeners) -> None:
    """uvloop reads a ready socket again and again while it has data: without a pause, a
    30 MiB sender held the other sessions' replies for tens of milliseconds. Reading
    stops once a session's DATA had 128 KiB in this turn, and goes on in the next."""
    during, after = listeners._run(_reading_during_and_after_one_turn(listeners.fast))
    assert (during, after) == (False, True)

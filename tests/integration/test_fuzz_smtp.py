"""Property-based SMTP fuzzing of a live `relayd serve` (hypothesis).

Invariants, whatever a client sends (8-bit EHLO names, no or several From: fields,
quoted local parts with ">", <postmaster>, garbage):
- the daemon stays up and keeps answering;
- every reply line is a well-formed RFC 5321 §4.2 reply (at most 512 octets, UTF-8);
- every 250 after DATA names exactly one queued message holding exactly the bytes
  sent (after dot-unstuffing) and the envelope given, and every queued message was
  acknowledged that way;
- no other session is affected: a clean client committing at the same moment gets 250
  and its message stored intact;
- a smuggled second message (hidden behind <LF>.<LF> and its cousins) never appears.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.queue.model import STATES
from relayd.queue.spool import Spool
from tests.helpers import RelayProcess, spooled_messages, unreachable_upstream, write_config

MAX_SIZE = 16 * 1024
ACCEPTED_SIZE = MAX_SIZE - 4096  # the SIZE advertised: 4 KiB kept for relayd's fields
REPLY_LINE = re.compile(rb"^([2-5][0-5][0-9])([ -][\x20-\x7e\x80-\xff]*)?$")
SMUGGLING_SEQUENCES = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n..\n",
]
SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    b"X-Fuzz-Smuggled: yes\r\n\r\nwire the money\r\n"
)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> RelayProcess:
    base = tmp_path_factory.mktemp("fuzz")
    overrides = {
        **unreachable_upstream(base),
        "listen": {"max_message_size": MAX_SIZE, "max_connections": 50},
        "logging": {"level": "warning"},
    }
    process = RelayProcess(write_config(base, overrides)).start()
    process.spool_dir = base / "spool"
    yield process
    process.kill()


# --- strategies ----------------------------------------------------------------------

text_line = st.binary(max_size=120).filter(lambda b: b"\r" not in b and b"\n" not in b)
nasty_line = st.one_of(
    text_line,
    st.binary(max_size=200),  # NUL, invalid UTF-8, bare CR/LF, anything
    st.sampled_from(SMUGGLING_SEQUENCES).map(lambda s: b"x" + s + SMUGGLED),
    st.integers(990, 1100).map(lambda n: b"L" * n),  # around the line-length limit
    st.just(b"."),
    st.just(b".."),
    st.just(b"...dots"),
)


# From: fields as applications write them, right and wrong; the number of them matters.
from_fields = st.lists(
    st.sampled_from(
        [
            b"From: app@example.com",
            b"from: Billing <billing@apps.example.net>",
            b"FROM :relay@example.com",
            b"From: =?utf-8?q?J=C3=B6rg?=\r\n <joerg@apps.example.net>",
            b"From: \xc3\xa9t\xc3\xa9 <ete@example.com>",
            b"From: \xff\xfe broken <x@example.com>",
            b"From:",
        ]
    ),
    max_size=3,
)


@st.composite
def bodies(draw: st.DrawFn, number: int) -> bytes:
    """Message content (unstuffed): fixed headers so relayd adds none, 0-3 From: fields,
    then fuzz lines."""
    head = (
        f"X-Fuzz-Id: {number}\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <fuzz-{number}@relayd.test>\r\n"
    ).encode()
    head += b"".join(field + b"\r\n" for field in draw(from_fields)) + b"\r\n"
    lines = draw(st.lists(nasty_line, max_size=12))
    if draw(st.booleans()):
        lines.append(b"y" * draw(st.integers(0, MAX_SIZE + 100)))  # around the size limit
    return head + b"".join(line + b"\r\n" for line in lines)


# EHLO names: 8-bit, not UTF-8, controls; anything but a line end (or nothing at all).
ehlo_names = st.one_of(
    st.sampled_from([b"fuzz.example", b"h\xffst.example", "hôte.example".encode(), b"\xc3"]),
    st.binary(min_size=1, max_size=60).filter(
        # Not only blanks: aiosmtpd strips ASCII whitespace, and EHLO without a
        # name is a syntax error (501, RFC 5321 §4.1.1.1), not this property's case.
        lambda b: b"\r" not in b and b"\n" not in b and b.strip()
    ),
)
# Addresses that are right but odd (RFC 5321 §4.1.2 quoted strings, §4.5.1 postmaster).
odd_recipients = st.sampled_from(
    [
        "user@example.com",
        "postmaster",
        "PostMaster",
        '"a>b"@example.com',
        '"x\\"> y"@example.com',
        '"<>"@example.com',
    ]
)


commands = st.one_of(
    st.sampled_from([b"NOOP", b"RSET", b"HELP", b"VRFY x", b"EXPN x", b"EHLO", b"MAIL", b"RCPT"]),
    st.sampled_from([b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"]),
    st.sampled_from([b"MAIL FROM:<>", b"MAIL FROM:<a@example.com> SIZE=99999999"]),
    st.sampled_from([b"AUTH PLAIN AGEAYg==", b"EHLO \xff\xfe", b"HELO h\xc3", b"HELP DATA"]),
    st.sampled_from([b"RCPT TO:<postmaster>", b'RCPT TO:<"a>b"@example.com>', b"RCPT TO:<\xff>"]),
    st.binary(max_size=80).filter(lambda b: b"\n" not in b),  # garbage, NUL, bad UTF-8
    st.integers(500, 2000).map(lambda n: b"NOOP " + b"z" * n),  # overlong command line
)


# --- a client that knows what it sent ------------------------------------------------


@dataclass
class Session:
    sock: socket.socket
    buffer: bytes = b""
    replies: list[tuple[bytes, bytes]] = field(default_factory=list)

    def reply(self) -> tuple[bytes, bytes] | None:
        """One complete (possibly multi-line) reply: (code, last line); None if closed."""
        while True:
            while b"\r\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\r\n", 1)
                match = REPLY_LINE.match(line)
                assert match, f"malformed reply line {line!r}"
                assert len(line) + 2 <= 512, f"reply line over 512 octets: {line!r}"
                line.decode("utf-8")  # never a client's invalid byte echoed back
                if line[3:4] != b"-":
                    self.replies.append((match.group(1), line))
                    return match.group(1), line
            chunk = self.sock.recv(65536)
            if not chunk:
                assert self.buffer == b"", f"partial reply before close: {self.buffer!r}"
                return None
            self.buffer += chunk

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


def stuffed(content: bytes) -> bytes:
    """Dot-stuff CRLF lines as a client must (RFC 5321 §4.5.2)."""
    return re.sub(rb"(?:^|(?<=\r\n))\.", b"..", content)


def expected_code(content: bytes) -> bytes:
    """What relayd must answer to this DATA, by its documented rules."""
    if len(content) > ACCEPTED_SIZE:  # RFC 1870: the size without the stuffing dots
        return b"552"
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        return b"550"
    if any(len(line) > 998 for line in content.split(b"\r\n")):
        return b"500"
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    if len(re.findall(rb"^from[ \t]*:", head, re.IGNORECASE | re.MULTILINE)) > 1:
        return b"554"  # RFC 5322 §3.6: exactly one From:
    return b"250"


def connect(relay: RelayProcess) -> Session:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    session = Session(sock)
    code, _ = session.reply()
    assert code == b"220"
    return session


def queued(relay: RelayProcess) -> dict[str, bytes]:
    return spooled_messages(relay.spool_dir)


def envelope_of(relay: RelayProcess, queue_id: str):
    spool = Spool(relay.spool_dir)
    assert any(spool.path(state, queue_id).exists() for state in STATES)
    return spool.find(queue_id)[1].envelope


def printable(name: bytes) -> str:
    """The EHLO name as relayd keeps it (relayd.smtp.addresses.printable_name)."""
    text = name.strip().decode("utf-8", "surrogateescape")
    return "".join(char if char.isprintable() else "?" for char in text)


class Bystander:
    """A clean client whose message is committed at the same moment as the fuzzed one."""

    CONTENT = b"Subject: bystander\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nclean\r\n"

    def __init__(self, relay: RelayProcess) -> None:
        self.session = connect(relay)
        self.session.send(b"EHLO clean.example\r\nMAIL FROM:<app@example.com>\r\n")
        self.session.send(b"RCPT TO:<user@example.com>\r\nDATA\r\n")
        for code in (b"250", b"250", b"250", b"354"):
            assert self.session.reply()[0] == code

    def send(self) -> None:
        self.session.send(self.CONTENT + b".\r\n")

    def check(self, relay: RelayProcess) -> None:
        code, line = self.session.reply()
        assert code == b"250", line
        queue_id = line.rsplit(b" ", 1)[1].decode()
        stored = strip_received(queued(relay)[queue_id])
        assert stored.endswith(self.CONTENT) and stored.startswith(b"Message-ID: <")
        self.session.sock.close()


INTERLUDE = b"Subject: interlude\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nx\r\n"


def end_drawn_message(session: Session) -> str:
    """Give the message the drawn commands began a clean content; its queue id."""
    session.send(INTERLUDE + b".\r\n")
    reply = session.reply()
    assert reply is not None and reply[0] == b"250", reply
    return reply[1].rsplit(b" ", 1)[1].decode()


def unstuffed(wire: bytes) -> bytes:
    return re.sub(rb"(?:^|(?<=\r\n))\.", b"", wire)


def without_added_fields(content: bytes) -> bytes:
    """Drop the Date:/Message-ID: fields relayd adds to a message that lacks them."""
    for prefix in (rb"Date: [^\r\n]*\r\n", rb"Message-ID: <[0-9A-F]{19}\.[0-9a-f]{8}@[^>]*>\r\n"):
        content = re.sub(b"^" + prefix, b"", content)
    return content


def strip_received(stored: bytes) -> bytes:
    lines = stored.split(b"\r\n")
    assert lines[0].startswith(b"Received: ")
    index = 1
    while lines[index].startswith(b"\t"):
        index += 1
    return b"\r\n".join(lines[index:])


# --- properties ----------------------------------------------------------------------

# RELAYD_FUZZ_EXAMPLES=2000 for a long run; CI uses the default.
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@FUZZ_SETTINGS
@given(data=st.data())
def test_lockstep_transactions_get_exactly_the_documented_reply(
    relay: RelayProcess, data: st.DataObject
) -> None:
    before = queued(relay)
    session = connect(relay)
    ehlo = data.draw(ehlo_names)
    acknowledged: dict[str, tuple[bytes, str, str]] = {}
    interludes: set[str] = set()  # queue ids of messages the drawn commands began
    with session.sock:
        assert session.send(b"EHLO " + ehlo + b"\r\n")
        assert session.reply()[0] == b"250"
        for number in range(data.draw(st.integers(1, 3))):
            for command in data.draw(st.lists(commands, max_size=3)):
                if not session.send(command + b"\r\n") or (reply := session.reply()) is None:
                    return  # the server may end a bad session (e.g. 502 after bogus commands)
                verb, _, argument = command.partition(b" ")
                if verb.upper() in (b"EHLO", b"HELO") and reply[0] == b"250":
                    ehlo = argument  # the session's name from now on
                if reply[0] == b"354":  # MAIL, RCPT and DATA drawn in a row: a message
                    interludes.add(end_drawn_message(session))
            session.send(b"RSET\r\n")
            session.reply()
            content = data.draw(bodies(number))
            recipient = data.draw(odd_recipients)
            session.send(b"MAIL FROM:<app@example.com>\r\n")
            assert session.reply()[0] == b"250"
            session.send(f"RCPT TO:<{recipient}>\r\n".encode())
            assert session.reply()[0] == b"250", recipient
            session.send(b"DATA\r\n")
            assert session.reply()[0] == b"354"
            bystander = Bystander(relay)
            session.send(stuffed(content) + b".\r\n")
            bystander.send()
            code, line = session.reply()
            bystander.check(relay)
            assert code == expected_code(content), line
            if code == b"250":
                queue_id = line.rsplit(b" ", 1)[1].decode()
                acknowledged[queue_id] = (content, recipient, printable(ehlo))
        session.send(b"QUIT\r\n")
        session.reply()
    after = queued(relay)
    new = {
        qid: body
        for qid, body in after.items()
        if qid not in before and b"Subject: bystander" not in body
    }
    assert new.keys() == acknowledged.keys() | interludes
    for queue_id in interludes:
        assert strip_received(new[queue_id]).endswith(INTERLUDE)
    for queue_id, (content, recipient, helo) in acknowledged.items():
        assert strip_received(new[queue_id]) == content
        envelope = envelope_of(relay, queue_id)
        assert (envelope.recipients, envelope.helo) == ((recipient,), helo)


@FUZZ_SETTINGS
@given(
    burst=st.lists(
        st.one_of(commands, st.sampled_from(SMUGGLING_SEQUENCES).map(lambda s: b"DATA" + s)),
        max_size=20,
    ),
    body=st.integers(0, 10**6).flatmap(bodies),
)
def test_pipelined_bursts_never_queue_anything_unacknowledged(
    relay: RelayProcess, burst: list[bytes], body: bytes
) -> None:
    before = queued(relay)
    session = connect(relay)
    payload = b"EHLO fuzz\r\n" + b"\r\n".join(burst) + b"\r\n"
    payload += b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
    payload += stuffed(body) + b".\r\nQUIT\r\n"
    with session.sock:
        session.send(payload)
        while session.reply() not in (None,) and session.replies[-1][0] != b"221":
            pass
    acknowledged = {
        line.rsplit(b" ", 1)[1].decode()
        for code, line in session.replies
        if code == b"250" and b"queued as" in line
    }
    new = {
        qid: c
        for qid, c in queued(relay).items()
        if qid not in before and b"Subject: bystander" not in c
    }
    assert new.keys() == acknowledged
    sent = unstuffed(payload)
    for content in new.values():
        original = without_added_fields(strip_received(content))
        # A burst may legitimately hold a whole transaction of its own (commands end
        # at <LF> too), so a message is any run of the bytes sent, but never one that
        # starts with the smuggled header hidden behind a fake end of data.
        assert original in sent
        assert not original.startswith(b"X-Fuzz-Smuggled")
    # When nothing in the burst could open a DATA of its own and the session was not
    # ended early (aiosmtpd closes after too many unknown commands), the final
    # transaction must have delivered exactly the body.
    opened_data = any(command.lstrip()[:4].upper() == b"DATA" for command in burst)
    completed = bool(session.replies) and session.replies[-1][0] == b"221"
    if expected_code(body) == b"250" and completed and not opened_data:
        final = [c for c in new.values() if b"X-Fuzz-Id: " in c]
        assert [without_added_fields(strip_received(c)) for c in final] == [body]


def test_daemon_is_still_healthy_after_fuzzing(relay: RelayProcess) -> None:
    assert relay.process.poll() is None
    session = connect(relay)
    with session.sock:
        for command in (b"EHLO x", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>"):
            session.send(command + b"\r\n")
            assert session.reply()[0] == b"250"

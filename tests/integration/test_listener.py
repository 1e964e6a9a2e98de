"""The listener, driven by a real SMTP client (smtplib) over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relayd import config
from relayd.app import Relay
from relayd.ops.metrics import Metrics
from relayd.queue.spool import Spool
from tests.helpers import base_config, deep_merge, unreachable_upstream

MESSAGE = (
    b"From: App <app@example.com>\r\n"
    b"To: user@example.com\r\n"
    b"Subject: Approval needed\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <approval-1@app.example.com>\r\n"
    b"\r\n"
    b"Please approve request 42.\r\n"
)


class RunningRelay:
    """A Relay on its own event loop in a thread, so blocking smtplib can talk to it."""

    def __init__(self, settings: config.Settings) -> None:
        self.registry = CollectorRegistry()
        self.relay = Relay(settings, metrics=Metrics(self.registry, process=False))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RunningRelay:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.shutdown(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def port(self) -> int:
        return self.relay.listener.bound_port

    @property
    def spool(self) -> Spool:
        return self.relay.spool

    def client(self, source: str | None = None) -> smtplib.SMTP:
        source_address = (source, 0) if source else None
        return smtplib.SMTP("127.0.0.1", self.port, source_address=source_address, timeout=10)

    def queued(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted(self.spool.path("incoming").iterdir())]

    def rejected(self, reason: str) -> float:
        return self.registry.get_sample_value("relayd_messages_rejected_total", {"reason": reason})


@contextlib.contextmanager
def relay(tmp_path: Path, **overrides: object) -> Iterator[RunningRelay]:
    # Nobody to deliver to: what the listener stored stays in incoming/ to be checked.
    document = deep_merge(
        deep_merge(base_config(tmp_path), unreachable_upstream(tmp_path)), overrides
    )
    document["listen"]["port"] = 0  # the OS picks; no race with other tests
    with RunningRelay(config.from_mapping(document, "test.yaml", environ={})) as running:
        yield running


def content_of(queue_file: bytes) -> bytes:
    return queue_file.split(b"\n", 1)[1]


def raw_session(port: int, payload: bytes, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes (pipelined, ending with QUIT) and return everything answered.

    The write side stays open until the server closes: aiosmtpd stops reading
    pipelined commands once it sees end-of-file.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(payload)
        chunks: list[bytes] = []
        while not b"".join(chunks).endswith(b"221 Bye\r\n") and (chunk := s.recv(65536)):
            chunks.append(chunk)
    return b"".join(chunks)


def greeting_then(port: int, commands: bytes, source: str = "127.0.0.2") -> tuple[bytes, bytes]:
    """Read the greeting, send commands, and return (greeting, whatever came after)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        greeting = s.recv(65536)
        after = b""
        with contextlib.suppress(ConnectionError):
            s.sendall(commands)
            after = s.recv(65536)
    return greeting, after


def test_accepts_queues_exact_bytes_and_adds_only_trace_headers(tmp_path: Path) -> None:
    with relay(tmp_path) as running, running.client() as client:
        code, reply = client.ehlo("eap.example.com")
        assert code == 250 and b"SIZE 36700160" in reply and b"8BITMIME" in reply
        client.sendmail("app@example.com", ["user@example.com"], MESSAGE)
        [stored] = running.queued()
    content = content_of(stored)
    trace, rest = content.split(b"\r\n", 3)[:3], content.split(b"\r\n", 3)[3]
    assert trace[0].startswith(b"Received: from eap.example.com ([127.0.0.1])")
    assert b"(relayd) with ESMTP id " in trace[1]
    assert trace[2].startswith(b"\tfor <user@example.com>; ")
    assert rest == MESSAGE  # nothing else changed
    assert running.registry.get_sample_value("relayd_messages_received_total") == 1


def test_reply_names_the_queue_id(tmp_path: Path) -> None:
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        code, reply = client.data(MESSAGE)
        [name] = [p.name for p in running.spool.path("incoming").iterdir()]
    assert code == 250
    assert reply.decode() == f"2.0.0 Ok: queued as {name}"


def test_adds_message_id_and_date_only_when_missing(tmp_path: Path) -> None:
    bare = b"Subject: no id\r\n\r\nhello\r\n"
    with relay(tmp_path) as running, running.client() as client:
        client.sendmail("app@example.com", ["user@example.com"], bare)
        [stored] = running.queued()
    content = content_of(stored)
    assert b"\r\nDate: " in content
    assert b"\r\nMessage-ID: <" in content
    assert content.endswith(bare)


def test_null_sender_is_accepted(tmp_path: Path) -> None:
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        assert client.docmd("MAIL FROM:<>")[0] == 250
        assert client.docmd("RCPT TO:<user@example.com>")[0] == 250
        assert client.data(MESSAGE)[0] == 250
        [stored] = running.queued()
    assert b'"sender":""' in stored.split(b"\n", 1)[0]


def test_open_relay_attempt_never_gets_past_the_greeting(tmp_path: Path) -> None:
    with relay(tmp_path, listen={"allowed_clients": ["127.0.0.1/32"]}) as running:
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            running.client(source="127.0.0.2")
        greeting, after = greeting_then(running.port, b"EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        assert running.rejected("access_denied") == 2
        assert running.queued() == []
    assert caught.value.smtp_code == 554
    assert b"5.7.1" in caught.value.smtp_error
    assert greeting.startswith(b"554 5.7.1 ") and greeting.endswith(b"\r\n")
    assert after == b""  # closed: no command was ever answered


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("MAIL FROM:<not an address>", (501, b"5.1.7")),
        ("MAIL FROM:<user@>", (501, b"5.1.7")),
        ("MAIL FROM:<unclosed@example.com", (501, b"5.1.7")),
        ("MAIL FROM:<us\xe9r@example.com>", (553, b"5.6.7")),  # no SMTPUTF8
    ],
)
def test_malformed_sender(tmp_path: Path, command: str, expected: tuple) -> None:
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.command_encoding = "utf-8"
        code, reply = client.docmd(command)
        assert running.rejected("bad_address") == 1
    assert (code, reply[:5]) == expected


@pytest.mark.parametrize("recipient", ["<bob>", "<bob@>", "<@example.com>", "<a b@example.com>"])
def test_malformed_recipient_gets_501(tmp_path: Path, recipient: str) -> None:
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.mail("app@example.com")
        code, reply = client.docmd(f"RCPT TO:{recipient}")
    assert code == 501
    assert reply.startswith(b"5.1.3")


def test_smtputf8_and_8bitmime_pass_through(tmp_path: Path) -> None:
    body = "Subject: café\r\n\r\nnaïve ünïcödé\r\n".encode()
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.sendmail(
            "app@example.com",
            ["jürgen@exämple.de"],
            body,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
        [stored] = running.queued()
    header, content = stored.split(b"\n", 1)
    assert "jürgen@exämple.de" in header.decode()
    assert b"SMTPUTF8" in header and b"BODY=8BITMIME" in header
    assert content.endswith(body)
    assert b"with UTF8SMTP id" in content


def test_too_many_recipients_gets_452(tmp_path: Path) -> None:
    with relay(tmp_path, listen={"max_recipients": 3}) as running, running.client() as client:
        client.ehlo("x")
        client.mail("app@example.com")
        codes = [client.rcpt(f"user{i}@example.com") for i in range(4)]
        assert client.data(MESSAGE)[0] == 250  # the first three still go
        [stored] = running.queued()
    assert [code for code, _ in codes] == [250, 250, 250, 452]
    assert codes[3][1].startswith(b"4.5.3")
    assert len(json.loads(stored.split(b"\n", 1)[0])["recipients"]) == 3


def test_declared_size_over_the_limit_gets_552_at_mail(tmp_path: Path) -> None:
    with relay(tmp_path, listen={"max_message_size": "1KiB"}) as running, running.client() as c:
        c.ehlo("x")
        code, reply = c.docmd("MAIL FROM:<app@example.com> SIZE=5000")
    assert code == 552
    assert reply.startswith(b"5.3.4")


def test_oversized_data_gets_552_and_nothing_is_queued(tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    with relay(tmp_path, listen={"max_message_size": "1KiB"}) as running, running.client() as c:
        c.ehlo("x")
        c.mail("app@example.com")
        c.rcpt("user@example.com")
        code, reply = c.data(big * 30)
        assert c.noop()[0] == 250  # the session goes on
        assert running.queued() == []
        assert running.rejected("too_big") == 1
    assert code == 552
    assert reply.startswith(b"5.3.4")


def test_low_disk_gets_452_431(tmp_path: Path) -> None:
    with relay(tmp_path, spool={"min_free_space": "1000000GiB"}) as running, running.client() as c:
        c.ehlo("x")
        code, reply = c.docmd("MAIL FROM:<app@example.com>")
        assert running.rejected("disk") == 1
    assert code == 452
    assert reply.startswith(b"4.3.1")


def test_mail_loop_gets_554_546(tmp_path: Path) -> None:
    looping = b"Received: from a by b; Sun, 29 Nov 2026 10:00:00 +0000\r\n" * 51 + MESSAGE
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        code, reply = client.data(looping)
        assert running.queued() == []
    assert code == 554
    assert reply.startswith(b"5.4.6")


def test_fifty_received_headers_are_not_a_loop(tmp_path: Path) -> None:
    fifty = b"Received: from a by b; Sun, 29 Nov 2026 10:00:00 +0000\r\n" * 50 + MESSAGE
    with relay(tmp_path) as running, running.client() as client:
        client.sendmail("app@example.com", ["user@example.com"], fifty)
        assert len(running.queued()) == 1


def test_line_longer_than_the_rfc_limit_gets_500_556(tmp_path: Path) -> None:
    long_line = b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n"
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        client.putcmd("DATA")
        assert client.getreply()[0] == 354
        client.send(long_line)
        code, reply = client.getreply()
        assert running.queued() == []
    assert code == 500
    assert reply.startswith(b"5.5.6")


ENVELOPE_COMMANDS = (
    b"EHLO x\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
)
SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nwire the money\r\n.\r\n"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n..\n"],
    ids=repr,
)
def test_smtp_smuggling_never_ends_data(tmp_path: Path, fake_end: bytes) -> None:
    payload = (
        ENVELOPE_COMMANDS
        + b"Subject: hello\r\n\r\nfirst message"
        + fake_end
        + SMUGGLED
        + b"tail\r\n.\r\nQUIT\r\n"
    )
    with relay(tmp_path) as running:
        answer = raw_session(running.port, payload)
        queued = running.queued()
    replies = [line[:3] for line in answer.split(b"\r\n") if line[:3].isdigit()]
    # One DATA, one final reply: the smuggled MAIL/RCPT/DATA were message content.
    assert replies.count(b"354") == 1
    assert b"550 5.5.2" in answer
    assert queued == []


def test_normalize_mode_turns_bare_newlines_into_crlf(tmp_path: Path) -> None:
    payload = ENVELOPE_COMMANDS + b"Subject: x\n\nline one\nline two\r\n.\r\nQUIT\r\n"
    with relay(tmp_path, listen={"bare_line_endings": "normalize"}) as running:
        answer = raw_session(running.port, payload)
        [stored] = running.queued()
    assert b"250 2.0.0 Ok: queued as" in answer
    assert content_of(stored).endswith(b"Subject: x\r\n\r\nline one\r\nline two\r\n")


def test_dot_stuffing_is_undone(tmp_path: Path) -> None:
    payload = ENVELOPE_COMMANDS + b"Subject: x\r\n\r\n..leading dot\r\n...\r\n.\r\nQUIT\r\n"
    with relay(tmp_path) as running:
        raw_session(running.port, payload)
        [stored] = running.queued()
    assert content_of(stored).endswith(b"\r\n\r\n.leading dot\r\n..\r\n")


def test_spool_failure_answers_451_never_250(tmp_path: Path) -> None:
    with relay(tmp_path) as running, running.client() as client:
        tmp_dir = running.spool.path("tmp")
        shutil.rmtree(tmp_dir)
        tmp_dir.write_bytes(b"")  # writes now fail even for root (ENOTDIR)
        client.ehlo("x")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        code, reply = client.data(MESSAGE)
        assert running.rejected("spool_error") == 1
        tmp_dir.unlink()
        tmp_dir.mkdir()
        assert running.queued() == []
    assert code == 451
    assert reply.startswith(b"4.3.0")


def test_connection_limit_answers_421(tmp_path: Path) -> None:
    with relay(tmp_path, listen={"max_connections": 2}) as running:
        first, second = running.client(), running.client()
        with pytest.raises(smtplib.SMTPConnectError) as caught:
            running.client()
        first.quit()
        second.quit()
    assert caught.value.smtp_code == 421


def test_protocol_errors_have_enhanced_codes(tmp_path: Path) -> None:
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        assert client.docmd("RCPT TO:<user@example.com>")[1].startswith(b"5.5.1")
        assert client.docmd("DATA")[1].startswith(b"5.5.1")
        assert client.docmd("BOGUS")[1].startswith(b"5.5.1")
        assert client.docmd("MAIL FROM:")[0] == 501
        client.mail("app@example.com")
        assert client.docmd("MAIL FROM:<app@example.com>")[1].startswith(b"5.5.1")


def test_idle_timeout_closes_a_silent_session_but_not_a_busy_one(tmp_path: Path) -> None:
    # Every command moves the deadline on; only a session silent for idle_timeout ends.
    with relay(tmp_path, listen={"idle_timeout": 0.6}) as running:
        with running.client() as busy:
            for _ in range(8):  # 8 x 0.2 s: well past one idle_timeout in all
                threading.Event().wait(0.2)
                assert busy.noop()[0] == 250
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as silent:
            assert silent.recv(1024).startswith(b"220")
            assert silent.recv(1024) == b""  # closed by the server, not by our timeout

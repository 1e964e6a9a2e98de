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
from relayd.queue.model import Envelope as SpoolEnvelope
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
        # 35 MiB less the 4 KiB relayd keeps for what it adds (headers.ADDED_AT_MOST).
        assert code == 250 and b"SIZE 36696064" in reply and b"8BITMIME" in reply
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
    with relay(tmp_path, listen={"max_message_size": "16KiB"}) as running, running.client() as c:
        c.ehlo("x")
        code, reply = c.docmd("MAIL FROM:<app@example.com> SIZE=20000")
    assert code == 552
    assert reply.startswith(b"5.3.4")


def test_oversized_data_gets_552_and_nothing_is_queued(tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    with relay(tmp_path, listen={"max_message_size": "16KiB"}) as running, running.client() as c:
        c.ehlo("x")
        c.mail("app@example.com")
        c.rcpt("user@example.com")
        code, reply = c.data(big * 200)
        assert c.noop()[0] == 250  # the session goes on
        assert running.queued() == []
        assert running.rejected("too_big") == 1
    assert code == 552
    assert reply.startswith(b"5.3.4")
    assert b"listen.max_message_size" in reply


# --- size as RFC 1870 counts it, with room for what relayd adds (issue 12, item 12) ---

LIMIT = 16 * 1024


def message_of(size: int, line: bytes = b"x" * 70 + b"\r\n") -> bytes:
    """A message of exactly ``size`` octets, with no Date:/Message-ID: (relayd adds them)
    and a From: the sender policy rewrites on the way out."""
    head = b"From: Billing <billing@apps.example.net>\r\nSubject: size\r\n\r\n"
    body = line * ((size - len(head)) // len(line))
    return head + body + b"y" * (size - len(head) - len(body) - 2) + b"\r\n"


def advertised_size(client: smtplib.SMTP) -> int:
    client.ehlo("x")
    return int(client.esmtp_features["size"])


def test_a_message_of_the_advertised_size_fits_max_message_size_on_the_way_out(
    tmp_path: Path,
) -> None:
    # Before: SIZE was max_message_size itself; a message of that size got 250 and then
    # grew past it with Received:, Date:, Message-ID: and the rewritten From:.
    with relay(tmp_path, listen={"max_message_size": LIMIT}) as running, running.client() as c:
        size = advertised_size(c)
        assert size < LIMIT
        c.sendmail("app@example.com", ["user@example.com"], message_of(size))
        [stored] = running.queued()
        policy = running.relay.scheduler.policy
    content = content_of(stored)
    envelope = SpoolEnvelope(sender="app@example.com", recipients=("user@example.com",))
    _, outgoing = policy.prepare(envelope, content)
    assert outgoing != content and b"\r\nReply-To: Billing" in outgoing  # it was rewritten
    assert len(outgoing) <= LIMIT


def test_one_octet_over_the_advertised_size_gets_552(tmp_path: Path) -> None:
    with relay(tmp_path, listen={"max_message_size": LIMIT}) as running, running.client() as c:
        size = advertised_size(c)
        assert c.docmd(f"MAIL FROM:<app@example.com> SIZE={size + 1}")[0] == 552
        c.mail("app@example.com")  # no SIZE declared: the DATA is measured
        c.rcpt("user@example.com")
        code, _ = c.data(message_of(size + 1))
        assert running.queued() == []
    assert code == 552


def test_dot_stuffing_does_not_count_against_the_size(tmp_path: Path) -> None:
    # RFC 1870 §3: the size excludes the dots added for transparency. Before, a message
    # under the limit with many lines starting with "." was refused with 552.
    with relay(tmp_path, listen={"max_message_size": LIMIT}) as running, running.client() as c:
        size = advertised_size(c)
        content = message_of(size, line=b"." * 8 + b"\r\n")
        assert len(content.replace(b"\r\n.", b"\r\n..")) > size + 1000  # as sent
        c.sendmail("app@example.com", ["user@example.com"], content)
        [stored] = running.queued()
    assert content_of(stored).endswith(content)


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


# --- a client's bytes stay its own (issue 12, item 11) --------------------------------

EIGHT_BIT_EHLO = b"EHLO h\xffst.\xc3example\r\n"  # not UTF-8: aiosmtpd keeps surrogates


def test_8bit_ehlo_name_is_accepted_and_stored_printable(tmp_path: Path) -> None:
    # Before: the name reached the spool header as lone surrogates, the JSON encoding
    # raised inside the group commit, and the message got 451.
    payload = EIGHT_BIT_EHLO + ENVELOPE_COMMANDS.split(b"\r\n", 1)[1] + MESSAGE + b".\r\nQUIT\r\n"
    with relay(tmp_path) as running:
        answer = raw_session(running.port, payload)
        [stored] = running.queued()
        assert list(running.spool.path("tmp").iterdir()) == []
    assert b"250 2.0.0 Ok: queued as" in answer
    header, content = stored.split(b"\n", 1)
    assert json.loads(header)["helo"] == "h?st.?example"
    assert content.startswith(b"Received: from h?st.?example ([127.0.0.1])\r\n")
    assert content.endswith(MESSAGE)


def test_a_utf8_ehlo_name_is_kept_in_the_envelope(tmp_path: Path) -> None:
    payload = "EHLO hôte.example\r\n".encode() + ENVELOPE_COMMANDS.split(b"\r\n", 1)[1]
    with relay(tmp_path) as running:
        raw_session(running.port, payload + MESSAGE + b".\r\nQUIT\r\n")
        [stored] = running.queued()
    assert json.loads(stored.split(b"\n", 1)[0])["helo"] == "hôte.example"
    assert content_of(stored).startswith(b"Received: from h?te.example ")


async def _send_codes(port: int, ehlo: bytes, count: int) -> list[bytes]:
    """``count`` messages on one session; the code of each end-of-DATA reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while (line := await reader.readline())[3:4] == b"-":
            pass
        return line[:3]

    await reply()
    writer.write(ehlo)
    await reply()
    codes = []
    for _ in range(count):
        writer.write(ENVELOPE_COMMANDS.split(b"\r\n", 1)[1])
        for _ in range(3):
            await reply()
        writer.write(MESSAGE + b".\r\n")
        codes.append(await reply())
    writer.close()
    return codes


def test_clean_clients_next_to_an_8bit_ehlo_client_get_250(tmp_path: Path) -> None:
    # The end-to-end property: one session's bytes never fail another's. Before, the
    # clean messages committed in the same batch as an 8-bit one got 451 with it
    # (bench/eightbit_helo.py prints the figures).
    async def load(port: int) -> tuple[list[bytes], list[bytes]]:
        clean = [_send_codes(port, b"EHLO clean.example\r\n", 5) for _ in range(10)]
        eight_bit = [_send_codes(port, EIGHT_BIT_EHLO, 10) for _ in range(2)]
        results = await asyncio.gather(*clean, *eight_bit)
        codes = [code for result in results[:10] for code in result]
        return codes, [code for result in results[10:] for code in result]

    with relay(tmp_path) as running:
        clean, eight_bit = asyncio.run(load(running.port))
        assert clean == [b"250"] * 50
        assert eight_bit == [b"250"] * 20
        assert len(running.queued()) == 70
        assert list(running.spool.path("tmp").iterdir()) == []


# --- From: fields at the end of DATA (issue 12, item 13) -------------------------------


def test_a_second_from_field_is_refused_with_554_560(tmp_path: Path) -> None:
    two = b"From: app@example.com\r\nFrom: ceo@example.com\r\n" + MESSAGE.split(b"\r\n", 1)[1]
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        code, reply = client.data(two)
        assert running.queued() == []
        assert running.rejected("sender_policy") == 1
    assert code == 554
    assert reply.startswith(b"5.6.0 ") and b"2 From:" in reply and b"RFC 5322" in reply


def test_a_message_without_from_is_accepted_and_stored_unchanged(tmp_path: Path) -> None:
    # The From: is added on the way out (relayd.delivery.policy); the spool keeps the
    # message as the client sent it.
    without = MESSAGE.split(b"\r\n", 1)[1]
    with relay(tmp_path) as running, running.client() as client:
        client.sendmail("app@example.com", ["user@example.com"], without)
        [stored] = running.queued()
    assert content_of(stored).endswith(b"\r\n" + without)
    assert b"\r\nFrom:" not in content_of(stored)


# --- RFC 5321 points (issue 12, item 14) -------------------------------------------


@pytest.mark.parametrize("recipient", ["postmaster", "Postmaster", "POSTMASTER"])
def test_rcpt_to_postmaster_without_a_domain_is_accepted(tmp_path: Path, recipient: str) -> None:
    # RFC 5321 §4.5.1; on the way out it goes to the mailbox (SenderPolicy).
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        client.mail("app@example.com")
        assert client.docmd(f"RCPT TO:<{recipient}>") == (250, b"2.1.5 Recipient ok")
        assert client.data(MESSAGE)[0] == 250
        [stored] = running.queued()
    assert json.loads(stored.split(b"\n", 1)[0])["recipients"] == [recipient]


def test_quoted_local_part_with_a_closing_bracket_is_one_address(tmp_path: Path) -> None:
    # RFC 5321 §4.1.2 Quoted-string: the ">" inside the quotes does not end the path.
    commands = (
        b'EHLO x\r\nMAIL FROM:<"a>b"@example.com> BODY=8BITMIME\r\n'
        b'RCPT TO:<"c>d \\"e\\""@example.org>\r\nDATA\r\n'
    )
    with relay(tmp_path) as running:
        answer = raw_session(running.port, commands + MESSAGE + b".\r\nQUIT\r\n")
        [stored] = running.queued()
    header = json.loads(stored.split(b"\n", 1)[0])
    assert b"250 2.0.0 Ok: queued as" in answer
    assert header["sender"] == '"a>b"@example.com'
    assert header["recipients"] == ['"c>d \\"e\\""@example.org']
    assert header["mail_options"] == ["BODY=8BITMIME"]


def test_auth_on_a_listener_without_auth_gets_502_551(tmp_path: Path) -> None:
    # Before: 538 5.7.11 "Encryption required", as if TLS would make AUTH work.
    with relay(tmp_path) as running, running.client() as client:
        client.ehlo("x")
        assert "auth" not in client.esmtp_features
        code, reply = client.docmd("AUTH PLAIN AHVzZXIAcGFzcw==")
        assert client.noop()[0] == 250  # the session goes on
    assert code == 502
    assert reply.startswith(b"5.5.1 ") and b"allowed_clients" in reply


def test_the_connection_is_closed_after_421_at_shutdown(tmp_path: Path) -> None:
    # RFC 5321 §3.8. Before, the session stayed open and the next command got 250.
    with (
        relay(tmp_path) as running,
        socket.create_connection(("127.0.0.1", running.port), timeout=10) as s,
    ):
        replies = s.makefile("rb")
        assert replies.readline().startswith(b"220")
        s.sendall(b"HELO x\r\n")
        assert replies.readline().startswith(b"250")
        handler = running.relay.listener.handler
        running.loop.call_soon_threadsafe(setattr, handler, "closing", True)
        s.sendall(b"MAIL FROM:<app@example.com>\r\n")
        assert replies.readline().startswith(b"421 4.3.2 ")
        after = b""
        with contextlib.suppress(ConnectionError):  # closed: the NOOP may reset it
            s.sendall(b"NOOP\r\n")
            after = replies.readline()
        assert after == b""

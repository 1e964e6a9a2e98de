"""`relayd serve` as a subprocess with the maildir transport: listener → spool →
scheduler → Maildir, including a SIGKILL in the middle of delivery."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiosmtplib
import pytest

from tests.helpers import RelayProcess, eventually, make_message, send_messages, write_config

MESSAGE_ID = re.compile(rb"^Message-ID: (\S+)\r\n", re.MULTILINE | re.IGNORECASE)
MAILBOX = "relay@example.com"


def maildir_files(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "maildir" / "new"
    return [path.read_bytes() for path in new.iterdir()] if new.is_dir() else []


def message_ids(files: list[bytes]) -> list[bytes]:
    return [MESSAGE_ID.search(content).group(1) for content in files]


def batch(count: int, size: int = 2048) -> list[tuple[str, list[str], bytes]]:
    return [
        (
            MAILBOX,
            [f"user{n % 5}@example.org"],
            make_message(f"message {n}", body_size=size, sender=MAILBOX),
        )
        for n in range(count)
    ]


async def test_messages_flow_into_the_maildir_exactly_once(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    messages = batch(150)
    with RelayProcess(config) as relay:
        replies = await send_messages(relay.port, messages, connections=3)
        assert all(reply.startswith("2.0.0 Ok: queued as") for reply in replies)
        await eventually(lambda: len(maildir_files(tmp_path)) >= 150, 30)
        await asyncio.sleep(0.3)
        assert relay.stop() == 0
    files = maildir_files(tmp_path)
    assert len(files) == 150
    by_id = {MESSAGE_ID.search(content).group(1): content for content in files}
    for sender, recipients, original in messages:
        stored = by_id[MESSAGE_ID.search(original).group(1)]
        assert stored.endswith(original)
        head = stored[: len(stored) - len(original)]
        assert head.startswith(
            f"Return-Path: <{sender}>\r\nEnvelope-To: <{recipients[0]}>\r\n".encode()
        )
        assert re.fullmatch(
            rb"Return-Path: [^\r\n]*\r\nEnvelope-To: [^\r\n]*\r\n"
            rb"Received: [^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n",
            head,
        )
    assert not list((tmp_path / "spool" / "incoming").iterdir())
    assert '"event": "delivered"' in relay.output()


async def test_sigkill_during_delivery_loses_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    messages = batch(200, size=512)
    relay = RelayProcess(config).start()
    try:
        await send_messages(relay.port, messages, connections=4)
        relay.kill()  # SIGKILL: no shutdown, whatever was in flight stays in active/
    finally:
        relay.kill()
    with RelayProcess(config) as restarted:
        await eventually(lambda: len(set(message_ids(maildir_files(tmp_path)))) == 200, 30)
        restarted.stop()
    expected = {MESSAGE_ID.search(content).group(1) for _, _, content in messages}
    assert set(message_ids(maildir_files(tmp_path))) == expected  # at worst duplicates


async def test_sigterm_finishes_or_returns_what_is_in_flight(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    messages = batch(100, size=512)
    with RelayProcess(config) as relay:
        await send_messages(relay.port, messages, connections=2)
        relay.signal(signal.SIGTERM)
        assert relay.process.wait(20) == 0
    spool = tmp_path / "spool"
    assert not list((spool / "active").iterdir())  # nothing left claimed
    with RelayProcess(config) as restarted:
        await eventually(lambda: len(set(message_ids(maildir_files(tmp_path)))) == 100, 30)
        restarted.stop()


@pytest.mark.parametrize("rewrite", [True, False])
async def test_sender_policy_applies_in_the_sandbox_too(tmp_path: Path, rewrite: bool) -> None:
    config = write_config(tmp_path, {"upstream": {"mailbox": MAILBOX, "from_rewrite": rewrite}})
    content = make_message(sender="billing@apps.example.net")
    with RelayProcess(config) as relay:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port) as client:
            if not rewrite:
                with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                    await client.sendmail("billing@apps.example.net", ["u@example.org"], content)
                assert refused.value.code == 550
                return
            await client.sendmail("billing@apps.example.net", ["u@example.org"], content)
        await eventually(lambda: len(maildir_files(tmp_path)) == 1, 10)
    (stored,) = maildir_files(tmp_path)
    assert stored.startswith(f"Return-Path: <{MAILBOX}>\r\n".encode())
    assert f"From: {MAILBOX}\r\n".encode() in stored
    assert b"Reply-To: <billing@apps.example.net>\r\n" in stored

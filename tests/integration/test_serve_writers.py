"""`relayd serve` and its spool writer processes (relayd.queue.writer): they are
children of the daemon that end with it, a writer killed under load costs no message
and doubles none, and a SIGTERM sent to the whole process group (systemd's
KillMode=control-group, Ctrl-C in a terminal) does not cut the commits of the shutdown's
grace period short."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiosmtplib

from tests.helpers import RelayProcess, eventually, send_messages, write_config
from tests.integration.test_serve_maildir import batch, maildir_files, message_ids

WRITER = "relayd.queue.writer"


def writer_pids(relay: RelayProcess) -> list[int]:
    """The daemon's live writer processes (children of any of its threads)."""
    assert relay.process is not None
    pids = []
    for task in Path(f"/proc/{relay.process.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if WRITER.encode() in command:
                pids.append(int(child))
    return sorted(pids)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


async def test_writers_killed_under_load_cost_no_message_and_double_none(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    messages = batch(400, size=1024)
    with RelayProcess(config) as relay:
        await eventually(lambda: len(writer_pids(relay)) == 2, 10, "two writers")
        first = writer_pids(relay)
        sending = asyncio.ensure_future(send_messages(relay.port, messages, connections=8))
        await eventually(lambda: len(maildir_files(tmp_path)) >= 40, 20, "deliveries")
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        replies = await asyncio.wait_for(sending, 60)
        assert all(reply.startswith("2.0.0 Ok: queued as") for reply in replies)
        await eventually(lambda: len(maildir_files(tmp_path)) >= 400, 30, "all delivered")
        relay.wait_for_log("spool writer failed; writing in the daemon's process")
        assert relay.stop() == 0
    ids = message_ids(maildir_files(tmp_path))
    assert len(ids) == 400 and len(set(ids)) == 400  # each once
    assert not any(alive(pid) for pid in first)


async def test_the_writers_end_with_the_daemon(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with RelayProcess(config) as relay:
        await eventually(lambda: len(writer_pids(relay)) == 2, 10, "two writers")
        pids = writer_pids(relay)
        assert relay.stop() == 0
    await eventually(lambda: not any(alive(pid) for pid in pids), 10, "writers gone")
    with RelayProcess(config) as relay:
        await eventually(lambda: len(writer_pids(relay)) == 2, 10, "two writers")
        pids = writer_pids(relay)
        relay.kill()  # SIGKILL: the writers read the end of their sockets and exit
    await eventually(lambda: not any(alive(pid) for pid in pids), 10, "writers gone")


async def send_one_per_connection(
    port: int, messages: list[tuple[str, list[str], bytes]], clients: int
) -> list[bytes]:
    """Each message on a connection of its own (as the EAP's mail client does), from
    ``clients`` senders until the messages run out or the daemon stops taking them; the
    contents that got a 250."""
    queue, accepted = list(messages), []

    async def client() -> None:
        while queue:
            sender, recipients, content = queue.pop(0)
            try:
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as session:
                    await session.sendmail(sender, recipients, content)
            except (aiosmtplib.SMTPException, OSError):
                return  # the daemon is stopping: this one was not taken
            accepted.append(content)

    await asyncio.gather(*(client() for _ in range(clients)))
    return accepted


async def test_a_sigterm_to_every_process_lets_the_last_commits_finish(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    messages = batch(2000, size=512)
    with RelayProcess(config) as relay:
        await eventually(lambda: len(writer_pids(relay)) == 2, 10, "two writers")
        sending = asyncio.ensure_future(send_one_per_connection(relay.port, messages, 6))
        await eventually(lambda: len(maildir_files(tmp_path)) >= 20, 20, "deliveries")
        # What systemd's KillMode=control-group does: SIGTERM to every process at once.
        assert relay.process is not None
        for pid in [relay.process.pid, *writer_pids(relay)]:
            os.kill(pid, signal.SIGTERM)
        accepted = await asyncio.wait_for(sending, 30)
        assert relay.process.wait(20) == 0
    assert 20 <= len(accepted) < len(messages)  # the stop came in the middle
    # The writers lived as long as the daemon needed them: no commit fell back.
    assert "spool writer failed" not in relay.output()
    with RelayProcess(config) as restarted:
        await eventually(lambda: len(maildir_files(tmp_path)) >= len(accepted), 30)
        restarted.stop()
    delivered = set(message_ids(maildir_files(tmp_path)))
    assert set(message_ids(accepted)) <= delivered

"""Fault matrix, spool side, through a real `relayd serve` process (the Maildir transport
stands in for the upstream): low disk, a spool directory it cannot write, corrupt queue
files. The same replies in-process: test_listener.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest

from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.auth_helpers import wait_until
from tests.helpers import (
    RelayProcess,
    json_lines,
    make_message,
    running_relay,
    scrape,
    send_message,
    send_messages,
    wait_for_port,
    write_config,
)

CAP_DAC_OVERRIDE = 1  # linux/capability.h
# Root writes into a directory whatever its mode says (CAP_DAC_OVERRIDE); without that
# capability, root is held to the mode bits like anybody else.
WITHOUT_DAC_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def maildir_count(tmp_path: Path) -> int:
    new = tmp_path / "maildir" / "new"
    return len(os.listdir(new)) if new.is_dir() else 0


def spool_files(tmp_path: Path, state: str) -> list[str]:
    return sorted(os.listdir(tmp_path / "spool" / state))


def test_free_space_below_min_free_space_gets_452_and_nothing_is_queued(
    tmp_path: Path,
) -> None:
    too_much = shutil.disk_usage(tmp_path).free + 1024**3  # more than the disk has free
    config = write_config(tmp_path, {"spool": {"min_free_space": too_much}})
    with running_relay(config) as relay, smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("app.example.com")
        first = client.mail("app@example.com")
        second = client.mail("app@example.com", options=["SIZE=1000"])
        assert client.noop()[0] == 250  # the session and the daemon go on
        metrics = scrape(relay.metrics_port)
    for code, reply in (first, second):
        assert code == 452  # RFC 5321 §4.5.3.1.10, RFC 3463 4.3.1
        assert reply.startswith(b"4.3.1 Insufficient system storage")
    assert metrics.value("relayd_messages_rejected_total", reason="disk") == 2
    assert metrics.value("relayd_messages_received_total") == 0
    assert spool_files(tmp_path, "incoming") == spool_files(tmp_path, "tmp") == []


def capabilities(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("CapEff:")[1].split()[0], 16)


@pytest.mark.parametrize("directory", ["tmp", "incoming"])
def test_spool_directory_not_writable_gets_451_never_250(tmp_path: Path, directory: str) -> None:
    config = write_config(tmp_path)
    as_root = os.geteuid() == 0
    with RelayProcess(config, prefix=WITHOUT_DAC_OVERRIDE if as_root else ()) as relay:
        assert not capabilities(relay.process.pid) & 1 << CAP_DAC_OVERRIDE
        unwritable = tmp_path / "spool" / directory
        unwritable.chmod(0o500)
        try:
            refusals = []
            for number in range(3):
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    send_message(relay.port, make_message(f"refused {number}"))
                refusals.append((refused.value.smtp_code, refused.value.smtp_error))
            assert spool_files(tmp_path, "incoming") == []
        finally:
            unwritable.chmod(0o700)
        # Writable again: mail is taken (and delivered) without a restart.
        send_message(relay.port, make_message("accepted"))
        wait_until(lambda: maildir_count(tmp_path) == 1, what="delivery")
        metrics = scrape(relay.metrics_port)
        left_in_tmp = spool_files(tmp_path, "tmp")
    for code, reply in refusals:
        assert code == 451  # RFC 5321 §4.2.2: the client keeps the message and retries
        assert reply.startswith(b"4.3.0 ")
    assert metrics.value("relayd_messages_rejected_total", reason="spool_error") == 3
    assert metrics.value("relayd_messages_received_total") == 1
    assert maildir_count(tmp_path) == 1
    assert left_in_tmp == []  # a refused message leaves nothing behind


def damaged_queue_file(scratch: Path) -> tuple[str, bytes]:
    """A real queue file (written by the spool) whose content was cut short."""
    spool = Spool(scratch)
    spool.recover()
    queue_id = new_queue_id()
    envelope = Envelope("app@example.com", ("user@example.org",), received_at=time.time())
    asyncio.run(spool.commit(queue_id, envelope, make_message("damaged", body_size=2000)))
    stored = spool.path("incoming", queue_id).read_bytes()
    return queue_id, stored[: len(stored) // 2]


def test_corrupt_queue_files_are_set_aside_and_everything_else_flows(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    garbage_id = new_queue_id()
    damaged_id, damaged = damaged_queue_file(tmp_path / "scratch")
    batch = [("app@example.com", ["user@example.org"], make_message(f"m{n}")) for n in range(20)]
    with running_relay(config) as relay:
        asyncio.run(send_messages(relay.port, batch[:10]))
        incoming = tmp_path / "spool" / "incoming"
        (incoming / garbage_id).write_bytes(b"\x00\xffnot a queue file\n")
        (incoming / damaged_id).write_bytes(damaged)
        # What `relayd queue` does after a change; the periodic rescan would find them too.
        relay.signal(signal.SIGUSR1)
        asyncio.run(send_messages(relay.port, batch[10:]))
        wait_until(lambda: maildir_count(tmp_path) == 20, what="20 messages delivered")
        wait_until(lambda: len(spool_files(tmp_path, "corrupt")) == 2, what="both set aside")
        wait_for_port("127.0.0.1", relay.port)  # still serving
        # A message is in the Maildir a moment before its spool file is removed.
        wait_until(lambda: spool_files(tmp_path, "active") == [], what="active/ empty")
        records = json_lines(relay.output())
    assert spool_files(tmp_path, "corrupt") == sorted([garbage_id, damaged_id])
    assert (tmp_path / "spool" / "corrupt" / damaged_id).read_bytes() == damaged  # kept as found
    assert spool_files(tmp_path, "incoming") == spool_files(tmp_path, "active") == []
    set_aside = [r for r in records if r["event"] == "queue file is corrupt; set aside"]
    assert sorted(r["queue_id"] for r in set_aside) == sorted([garbage_id, damaged_id])
    assert all(r["level"] == "error" for r in set_aside)


def test_a_fifo_under_a_queue_id_never_stops_the_daemon(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: done on the event loop, it took
    the listener and /healthz with it (issue 12, item 4)."""
    config = write_config(tmp_path)
    fifo_id = new_queue_id()
    fifo = tmp_path / "spool" / "incoming" / fifo_id
    with running_relay(config) as relay:
        try:
            os.mkfifo(fifo)
            relay.signal(signal.SIGUSR1)  # as `relayd queue` does after a change
            wait_until(lambda: spool_files(tmp_path, "corrupt") == [fifo_id], what="set aside")
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=5) as client:
                assert client.noop()[0] == 250
            with urllib.request.urlopen(
                f"http://127.0.0.1:{relay.metrics_port}/healthz", timeout=5
            ) as answer:
                assert answer.status == 200
            send_message(relay.port, make_message("after the fifo"))
            wait_until(lambda: maildir_count(tmp_path) == 1, what="delivery")
        finally:
            for path in (tmp_path / "spool").rglob(fifo_id):  # free a reader that blocked
                if path.is_fifo():
                    with contextlib.suppress(OSError):
                        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert (tmp_path / "spool" / "corrupt" / fifo_id).is_fifo()  # kept as found


def test_a_spool_directory_others_may_write_refuses_the_start_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o777)
    relay = RelayProcess(config).start(wait=False)
    try:
        status = relay.process.wait(30)
    finally:
        relay.kill()
    errors = [line for line in relay.output().splitlines() if not line.startswith("{")]
    assert status == 2
    assert errors == [
        f"relayd: configuration error in {config}: spool.directory: {spool} is writable "
        f"by others (mode 0777); run: chmod 700 {spool}"
    ]

"""`relayd queue …` against a spool filled by a real `relayd serve`, while it runs."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.queue.model import DeliveryState
from relayd.queue.spool import Spool
from tests.helpers import (
    REPO,
    RelayProcess,
    make_message,
    run_relayd,
    running_relay,
    transact,
    unreachable_upstream,
    write_config,
)

RECIPIENTS = ("one@example.com", "two@example.com")
RESCANNED = '"spool rescanned on request"'


def last_rescan(relay: RelayProcess) -> dict:
    """The daemon's census as its last rescan logged it."""
    lines = [line for line in relay.output().splitlines() if RESCANNED in line]
    return json.loads(lines[-1])


def queue(config: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_relayd("queue", *args, "-c", str(config), **kwargs)


def listed(config: Path) -> dict[str, dict]:
    result = queue(config, "list", "--json")
    assert result.returncode == 0, result.stderr
    return {item["id"]: item for item in json.loads(result.stdout)}


def fill(relay: RelayProcess, count: int) -> list[str]:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        return [
            transact(client, make_message(f"message {n}"), recipients=RECIPIENTS)
            for n in range(count)
        ]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[RelayProcess, Path, Spool]]:
    config = write_config(tmp_path, unreachable_upstream(tmp_path))
    with running_relay(config) as relay:
        yield relay, config, Spool(tmp_path / "spool")


def test_list_and_show(daemon) -> None:
    relay, config, spool = daemon
    ids = fill(relay, 3)
    items = listed(config)
    assert sorted(items) == sorted(ids)
    first = items[ids[0]]
    assert first["state"] == "incoming"
    assert first["sender"] == "app@example.com"
    assert first["recipient_count"] == 2
    assert first["size"] == spool.path("incoming", ids[0]).stat().st_size
    assert first["attempts"] == 0 and first["last_error"] is None
    assert 0 <= first["age"] < 600

    text = queue(config, "list")
    assert text.returncode == 0
    assert all(queue_id in text.stdout for queue_id in ids)
    assert "-- 3 message(s)" in text.stdout

    shown = queue(config, "show", ids[1])
    assert shown.returncode == 0, shown.stderr
    assert "<app@example.com>" in shown.stdout
    assert "one@example.com  pending" in shown.stdout
    assert "Subject: message 1" in shown.stdout
    assert f"with ESMTP id {ids[1]}" in shown.stdout  # the Received: field relayd added

    missing = queue(config, "show", "0" * 19)
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_hold_release_delete_while_the_daemon_runs(daemon) -> None:
    relay, config, _ = daemon
    ids = fill(relay, 3)

    held = queue(config, "hold", ids[0])
    assert held.returncode == 0, held.stderr
    assert f"relayd (pid {relay.process.pid}) told to rescan" in held.stdout
    relay.wait_for_output(RESCANNED)  # SIGUSR1: the daemon recounted the spool
    assert last_rescan(relay)["hold"] == 1
    assert listed(config)[ids[0]]["state"] == "hold"

    assert queue(config, "release", ids[0]).returncode == 0
    assert listed(config)[ids[0]]["state"] == "incoming"  # never tried: first attempt

    refused = queue(config, "delete", ids[1])  # no terminal and no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert ids[1] in listed(config)

    deleted = queue(config, "delete", ids[1], "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert ids[1] not in listed(config)
    relay.wait_for_output(RESCANNED, count=3)  # after hold, release and delete
    assert last_rescan(relay)["hold"] == 0
    assert last_rescan(relay)["incoming"] == 2

    bad = queue(config, "hold", "../../etc/passwd")
    assert bad.returncode == 1 and "not a queue id" in bad.stderr


def test_retry_deferred_and_failed(daemon) -> None:
    relay, config, spool = daemon
    deferred_id, failed_id = fill(relay, 2)
    later = time.time() + 3600
    message = spool.claim(deferred_id)
    spool.defer(message, DeliveryState(attempts=2, last_error="451 4.3.0 try later"), later)
    message = spool.claim(failed_id)
    spool.fail(
        message,
        DeliveryState(
            attempts=1,
            last_error="550 5.1.1 unknown",
            done_recipients=(RECIPIENTS[0],),
            failed_recipients=((RECIPIENTS[1], "550 5.1.1 unknown"),),
        ),
    )
    items = listed(config)
    assert items[deferred_id]["attempts"] == 2
    assert items[deferred_id]["last_error"] == "451 4.3.0 try later"
    assert items[failed_id]["state"] == "failed"
    assert "last error: 451 4.3.0 try later" in queue(config, "list").stdout

    before = time.time()
    assert queue(config, "retry", deferred_id).returncode == 0
    assert spool.path("deferred", deferred_id).stat().st_mtime <= time.time()
    assert spool.path("deferred", deferred_id).stat().st_mtime >= before - 1

    assert queue(config, "retry", failed_id).returncode == 0
    state, message = spool.find(failed_id)
    assert state == "deferred"
    assert message.state.done_recipients == (RECIPIENTS[0],)  # not sent twice
    assert message.state.failed_recipients == ()  # tried again
    assert message.pending_recipients == (RECIPIENTS[1],)


def test_retry_all_and_purge_failed(daemon) -> None:
    relay, config, spool = daemon
    ids = fill(relay, 4)
    for queue_id in ids[:2]:
        spool.defer(spool.claim(queue_id), DeliveryState(attempts=1), time.time() + 3600)
    for queue_id in ids[2:]:
        spool.fail(spool.claim(queue_id), DeliveryState(attempts=1, last_error="550"))

    result = queue(config, "retry", "--all")
    assert result.returncode == 0 and "2 message(s) due now" in result.stdout
    assert all(spool.path("deferred", i).stat().st_mtime <= time.time() for i in ids[:2])

    assert queue(config, "purge-failed").returncode == 2  # no terminal, no --yes
    purged = queue(config, "purge-failed", "--yes")
    assert purged.returncode == 0 and "2 failed message(s) deleted" in purged.stdout
    assert sorted(listed(config)) == sorted(ids[:2])
    assert not any(spool.path("meta", f"{queue_id}.json").exists() for queue_id in ids[2:])


def test_a_message_being_delivered_cannot_be_deleted_or_held(daemon) -> None:
    relay, config, spool = daemon
    (queue_id,) = fill(relay, 1)
    message = spool.claim(queue_id)  # as a delivery worker does: incoming → active
    assert message is not None
    try:
        for action in (("delete", queue_id, "--yes"), ("hold", queue_id)):
            result = queue(config, *action)
            assert result.returncode == 1
            assert "being delivered right now (active/)" in result.stderr
            assert spool.path("active", queue_id).exists()
        assert listed(config)[queue_id]["state"] == "active"
    finally:
        spool.release_claim(message)
    assert queue(config, "delete", queue_id, "--yes").returncode == 0


def test_delete_asks_on_a_terminal(daemon) -> None:
    relay, config, _ = daemon
    kept, deleted = fill(relay, 2)
    assert "[y/N]" in answer_on_terminal(config, kept, "n")
    assert kept in listed(config)
    assert "deleted (was in incoming/)" in answer_on_terminal(config, deleted, "y")
    assert deleted not in listed(config)


def answer_on_terminal(config: Path, queue_id: str, answer: str) -> str:
    """Run `relayd queue delete ID` with a pseudo-terminal as stdin; type ``answer``."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "relayd", "queue", "delete", queue_id, "-c", str(config)],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    os.close(terminal)
    try:
        os.write(controller, f"{answer}\n".encode())
        output, _ = process.communicate(timeout=30)
    finally:
        os.close(controller)
    return output.decode()


def test_a_stale_pid_file_never_signals_another_process(tmp_path: Path) -> None:
    config = write_config(tmp_path, unreachable_upstream(tmp_path))
    with running_relay(config) as relay:
        (queue_id,) = fill(relay, 1)
    bystander = subprocess.Popen(["sleep", "60"])  # SIGUSR1 would kill it
    pid_file = tmp_path / "spool" / "relayd.pid"
    try:
        pid_file.write_text(f"{bystander.pid}\n")  # stale: nobody holds its lock
        assert "relayd is not running" in queue(config, "hold", queue_id).stdout
        with open(pid_file) as held:  # locked, but the pid is not `relayd serve`
            fcntl.flock(held, fcntl.LOCK_EX)
            assert "relayd is not running" in queue(config, "release", queue_id).stdout
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing to the spool owner needs root")
def test_root_acts_as_the_spool_owner(tmp_path: Path) -> None:
    # A spool owned by `nobody`, in a directory that user can reach (tmp_path is 0700).
    base = Path(tempfile.mkdtemp(prefix="relayd-owner-"))
    try:
        base.chmod(0o755)
        config = write_config(base, unreachable_upstream(base))
        with running_relay(config) as relay:
            (queue_id,) = fill(relay, 1)
        spool = Spool(base / "spool")
        spool.fail(spool.claim(queue_id), DeliveryState(attempts=1, last_error="550"))
        nobody = 65534
        for path in [base / "spool", *(base / "spool").rglob("*")]:
            os.chown(path, nobody, nobody)

        result = queue(config, "retry", queue_id)
        assert result.returncode == 0, result.stderr
        meta = base / "spool" / "meta" / f"{queue_id}.json"
        assert meta.stat().st_uid == nobody  # the daemon's user can still read it
    finally:
        shutil.rmtree(base)

"""The spool at the edges (issue 12): short writes, the order and durability of every
move after commit, files that are not ours under a queue id's name, planted symlinks,
and one bad job in a group commit. The exhaustive version, every call failed and
crashed in turn: tests/integration/test_fault_injection.py."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from relayd.queue.model import CorruptMessage, DeliveryState, Envelope, SpoolError, new_queue_id
from relayd.queue.spool import Spool
from tests.small_disk import SmallDisk

ENVELOPE = Envelope("app@example.com", ("a@example.com", "b@example.com"), "127.0.0.1", "app")
CONTENT = b"Subject: durable\r\n\r\n" + b"x" * 2000 + b"\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    return spool


async def commit(spool: Spool, envelope: Envelope = ENVELOPE, content: bytes = CONTENT) -> str:
    queue_id = new_queue_id()
    await spool.commit(queue_id, envelope, content)
    return queue_id


def names(spool: Spool, state: str) -> list[str]:
    return sorted(os.listdir(spool.path(state)))


class OneShortWrite:
    """The first writev to a file under ``directory`` writes only half (a signal, a
    quota reached and then raised): the rest has to be written by a second call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory, self.cut = str(directory), False
        self._writev = os.writev
        monkeypatch.setattr(os, "writev", self.writev)

    def writev(self, fd: int, buffers) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if self.cut or not target.startswith(self.directory):
            return self._writev(fd, buffers)
        self.cut = True
        data = b"".join(buffers)
        return os.write(fd, data[: len(data) // 2])


# --- 1. short writes ------------------------------------------------------------------


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
async def test_a_disk_that_fills_mid_message_gets_an_error_never_a_queued_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    SmallDisk(monkeypatch, spool.directory, room=500, error=error)
    with pytest.raises(SpoolError):
        await commit(spool)  # the listener answers 451, never 250
    assert names(spool, "incoming") == names(spool, "tmp") == []


async def test_a_write_cut_short_is_finished_and_the_message_stored_whole(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    OneShortWrite(monkeypatch, spool.directory)
    queue_id = await commit(spool)
    monkeypatch.undo()
    message = spool.claim(queue_id)  # not set aside as truncated
    assert message is not None and message.read_content() == CONTENT


# --- 2. order and durability of the moves after commit ----------------------------------


class FileCalls:
    """Records unlink, rename, replace and fsync (with the directory an fd is for)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, spool: Spool) -> None:
        self.spool, self.calls = spool, []
        for name in ("unlink", "rename", "replace", "fsync"):
            monkeypatch.setattr(os, name, self._recording(name, getattr(os, name)))

    def _recording(self, name: str, real):
        def call(*args):
            if name == "fsync":
                where = os.readlink(f"/proc/self/fd/{args[0]}")
            else:
                where = " -> ".join(str(a) for a in args)
            self.calls.append((name, where.replace(str(self.spool.directory) + "/", "")))
            return real(*args)

        return call

    def index(self, name: str, where: str) -> int:
        return next(i for i, call in enumerate(self.calls) if call == (name, where))


async def tried_before(spool: Spool) -> tuple[str, object]:
    """A message delivered to a in an earlier attempt, b still to do; claimed again."""
    queue_id = await commit(spool)
    message = spool.claim(queue_id)
    spool.defer(message, DeliveryState(attempts=1, done_recipients=("a@example.com",)), 0)
    return queue_id, spool.claim(queue_id)


async def test_delivered_removes_the_message_durably_before_its_delivery_state(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the state gone first, a crash between the two would leave the message in
    active/ with nobody done: a@example.com would get it again."""
    queue_id, message = await tried_before(spool)
    calls = FileCalls(monkeypatch, spool)
    spool.delivered(message)
    removed = calls.index("unlink", f"active/{queue_id}")
    synced = calls.index("fsync", "active")
    forgotten = calls.index("unlink", f"meta/{queue_id}.json")
    assert removed < synced < forgotten


@pytest.mark.parametrize("outcome", ["deferred", "failed"])
async def test_the_new_delivery_state_is_durable_before_the_message_moves(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    queue_id, message = await tried_before(spool)
    state = DeliveryState(attempts=2, done_recipients=("a@example.com", "b@example.com"))
    calls = FileCalls(monkeypatch, spool)
    if outcome == "deferred":
        spool.defer(message, state, time.time() + 60)
    else:
        spool.fail(message, state)
    stored = calls.index("replace", f"tmp/{queue_id}.meta -> meta/{queue_id}.json")
    state_synced = calls.index("fsync", "meta")
    moved = calls.index("rename", f"active/{queue_id} -> {outcome}/{queue_id}")
    move_synced = calls.index("fsync", outcome)
    assert stored < state_synced < moved < move_synced


# --- 4. files that are not ours under a queue id's name ----------------------------------


def claim_within(spool: Spool, queue_id: str, seconds: float = 5.0) -> object:
    """spool.claim in a thread: the result, or the exception; fails if it blocks."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(spool.claim(queue_id))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in spool.directory.rglob("*"):  # let the blocked open go
            if fifo.is_fifo():
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"claiming {queue_id} blocked for {seconds}s")
    return outcome[0]


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "symlink to a fifo"])
async def test_a_non_regular_file_under_a_queue_id_is_set_aside_at_once(
    spool: Spool, tmp_path: Path, kind: str
) -> None:
    queue_id = new_queue_id()
    path = spool.path("incoming", queue_id)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":  # to a well-formed queue file outside the spool
        elsewhere = Spool(tmp_path / "elsewhere")
        elsewhere.recover()
        await elsewhere.commit(queue_id, ENVELOPE, CONTENT)
        path.symlink_to(elsewhere.path("incoming", queue_id))
    else:
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    assert isinstance(claim_within(spool, queue_id), CorruptMessage)
    assert names(spool, "corrupt") == [queue_id]
    assert names(spool, "active") == names(spool, "incoming") == []


async def test_a_fifo_as_a_delivery_state_does_not_block_the_claim(spool: Spool) -> None:
    queue_id = await commit(spool)
    os.mkfifo(spool.path("meta", f"{queue_id}.json"))
    message = claim_within(spool, queue_id)
    assert message is not None and not isinstance(message, Exception)
    assert message.state == DeliveryState()
    assert names(spool, "corrupt") == [f"{queue_id}.json"]


# --- 5. planted symlinks ------------------------------------------------------------------


async def test_a_symlink_planted_at_the_delivery_state_temp_file_is_not_followed(
    spool: Spool, tmp_path: Path
) -> None:
    queue_id = await commit(spool)
    message = spool.claim(queue_id)
    precious = tmp_path / "precious"
    precious.write_text("not relayd's to overwrite")
    spool.path("tmp", f"{queue_id}.meta").symlink_to(precious)
    spool.defer(message, DeliveryState(attempts=1, done_recipients=("a@example.com",)), 0)
    assert precious.read_text() == "not relayd's to overwrite"
    again = spool.claim(queue_id)
    assert again is not None and again.state.done_recipients == ("a@example.com",)
    assert names(spool, "tmp") == []


# --- 11. one job's exception stays with that job ---------------------------------------


async def test_a_job_that_cannot_be_stored_fails_alone_in_its_group_commit(spool: Spool) -> None:
    """aiosmtpd keeps a non-UTF-8 HELO as a lone surrogate, which UTF-8 cannot encode."""
    bad = Envelope("app@example.com", ("a@example.com",), "127.0.0.1", "host\udcff.example")
    envelopes = [ENVELOPE, ENVELOPE, bad, ENVELOPE, ENVELOPE]
    ids = [new_queue_id() for _ in envelopes]
    results = await asyncio.gather(
        *(spool.commit(q, e, CONTENT) for q, e in zip(ids, envelopes, strict=True)),
        return_exceptions=True,
    )
    assert isinstance(results[2], SpoolError)
    assert [r for i, r in enumerate(results) if i != 2] == [None] * 4
    assert names(spool, "incoming") == sorted(ids[:2] + ids[3:])
    assert names(spool, "tmp") == []


async def test_the_directory_syncs_of_an_outcome_batch_are_shared(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five deferrals and five deliveries recorded together: meta/, active/ and
    deferred/ are each synced once, not once per message."""
    from relayd.queue.moves import Move

    messages = [spool.claim(await commit(spool)) for _ in range(10)]
    state = DeliveryState(attempts=1, done_recipients=("a@example.com",))
    moves = [Move(m, "deferred", state, time.time() + 60) for m in messages[:5]]
    moves += [Move(m, "delivered") for m in messages[5:]]
    calls = FileCalls(monkeypatch, spool)
    assert spool.apply(moves) == [None] * 10
    synced = sorted(where for name, where in calls.calls if name == "fsync")
    assert synced == ["active", "deferred", "meta"]
    assert len(names(spool, "deferred")) == 5 and names(spool, "active") == []


def test_recovery_sets_aside_what_it_cannot_remove_from_tmp(tmp_path: Path) -> None:
    """A directory in tmp/ used to stop the start (unlink: EISDIR)."""
    spool = Spool(tmp_path / "spool")
    spool.recover()
    (spool.path("tmp") / "planted").mkdir()
    os.mkfifo(spool.path("tmp", new_queue_id()))
    report = Spool(tmp_path / "spool").recover()
    assert report["removed_partial"] == 1  # the FIFO: a name, removed like any other
    assert names(spool, "tmp") == [] and names(spool, "corrupt") == ["planted"]


def test_symlinks_planted_at_the_pid_and_status_files_are_never_written_through(
    spool: Spool, tmp_path: Path
) -> None:
    from relayd.ops.daemon_status import STATUS_FILE_NAME, read_status, write_status
    from relayd.ops.pidfile import PidFile

    precious = tmp_path / "precious"
    precious.write_text("untouched")
    pid_path = spool.directory / "relayd.pid"
    pid_path.symlink_to(precious)
    with pytest.raises(OSError):
        PidFile(pid_path).acquire()
    temporary = spool.directory / f".{STATUS_FILE_NAME}.{os.getpid()}"
    temporary.symlink_to(precious)
    write_status(spool.directory, {"deliveries": "running"})
    assert precious.read_text() == "untouched"
    assert read_status(spool.directory) == {"deliveries": "running"}

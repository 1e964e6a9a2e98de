"""The spool: durable commit, states on disk, recovery and the corrupt-file rule."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from relayd.queue.model import (
    CorruptMessage,
    DeliveryState,
    Envelope,
    NotFound,
    SpoolFull,
    is_queue_id,
    new_queue_id,
    received_at_from_id,
)
from relayd.queue.spool import Spool

ENVELOPE = Envelope(
    sender="app@example.com",
    recipients=("a@example.com", "b@example.com"),
    client="127.0.0.1",
    helo="app.local",
    received_at=1.0,
    mail_options=("BODY=8BITMIME",),
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    return spool


async def commit(spool: Spool, content: bytes = b"Subject: x\r\n\r\nbody\r\n") -> str:
    queue_id = new_queue_id()
    await spool.commit(queue_id, ENVELOPE, content)
    return queue_id


def test_queue_ids_sort_by_arrival_and_carry_their_time() -> None:
    earlier, later = new_queue_id(1_700_000_000.0), new_queue_id(1_700_000_000.5)
    assert earlier < later
    assert is_queue_id(earlier)
    assert abs(received_at_from_id(later) - 1_700_000_000.5) < 1e-6
    assert not is_queue_id("../etc/passwd")


async def test_commit_stores_exact_bytes_and_envelope(spool: Spool) -> None:
    content = b"Subject: \xc3\xa9t\xc3\xa9\r\n\r\n\x00binary\xff\r\n"
    queue_id = await commit(spool, content)
    assert (spool.path("incoming", queue_id)).stat().st_mode & 0o777 == 0o600
    assert list(spool.path("tmp").iterdir()) == []
    message = spool.claim(queue_id)
    assert message is not None
    assert message.read_content() == content
    assert message.envelope == ENVELOPE
    assert message.pending_recipients == ENVELOPE.recipients


async def test_concurrent_commits_are_grouped_and_all_durable(spool: Spool) -> None:
    ids = await asyncio.gather(*(commit(spool, f"n: {i}\r\n".encode()) for i in range(200)))
    assert len(set(ids)) == 200
    assert sorted(p.name for p in spool.path("incoming").iterdir()) == sorted(ids)
    assert spool.census().messages["incoming"] == 200


async def test_commit_syncs_the_file_then_renames_then_syncs_the_directory(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order that makes a 250 safe: content on disk, then the name, then the name
    on disk. The file is synced by O_DSYNC on its write or by an fsync of it."""
    calls: list[tuple] = []
    real = {name: getattr(os, name) for name in ("open", "writev", "fsync", "close", "rename")}

    def recording(name: str):
        def call(*args, **kwargs):
            result = real[name](*args, **kwargs)
            calls.append((name, *args[:2], result))
            return result

        return call

    for name in real:
        monkeypatch.setattr(os, name, recording(name))
    queue_id = await commit(spool, b"Subject: order\r\n\r\nbody\r\n")
    monkeypatch.undo()

    tmp_file, queued = str(spool.path("tmp", queue_id)), str(spool.path("incoming", queue_id))
    opened = next(call for call in calls if call[:2] == ("open", tmp_file))
    file_fd, dsync = opened[3], opened[2] & getattr(os, "O_DSYNC", 0)
    written = calls.index(next(call for call in calls if call[:2] == ("writev", file_fd)))
    closed = calls.index(next(c for c in calls[written:] if c[:2] == ("close", file_fd)))
    synced = dsync or ("fsync", file_fd, None) in calls[written:closed]
    renamed = calls.index(("rename", tmp_file, queued, None))
    directory_fds = {
        call[3] for call in calls if call[0] == "open" and call[1] == str(spool.path("incoming"))
    }
    assert synced
    assert closed < renamed
    assert any(call[0] == "fsync" and call[1] in directory_fds for call in calls[renamed:])


async def test_commit_refuses_when_free_space_is_below_the_minimum(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_space=10**18)
    spool.recover()
    with pytest.raises(SpoolFull):
        await commit(spool)
    assert list(spool.path("incoming").iterdir()) == []


async def test_lifecycle_defer_then_deliver(spool: Spool) -> None:
    queue_id = await commit(spool)
    message = spool.claim(queue_id)
    assert spool.claim(queue_id) is None  # already taken: nobody else gets it
    state = DeliveryState(
        attempts=1, last_error="451 4.7.0 try later", done_recipients=("a@example.com",)
    )
    spool.defer(message, state, next_attempt=time.time() + 3600)
    assert spool.path("deferred", queue_id).exists()
    assert spool.due(time.time(), 10) == []  # not due yet
    assert spool.due(time.time() + 7200, 10) == [queue_id]
    again = spool.claim(queue_id)
    assert again.state.attempts == 1
    assert again.pending_recipients == ("b@example.com",)
    spool.delivered(again)
    assert not any(spool.path(s, queue_id).exists() for s in ("incoming", "active", "deferred"))
    assert spool.census().messages == {s: 0 for s in spool.census().messages}


async def test_fail_keeps_the_message_for_the_operator(spool: Spool) -> None:
    queue_id = await commit(spool)
    message = spool.claim(queue_id)
    spool.fail(message, DeliveryState(attempts=1, last_error="550 5.1.1 unknown"))
    state, found = spool.find(queue_id)
    assert state == "failed"
    assert found.state.last_error == "550 5.1.1 unknown"


async def test_due_returns_oldest_incoming_first(spool: Spool) -> None:
    ids = [await commit(spool) for _ in range(5)]
    assert spool.due(time.time(), 3) == ids[:3]
    assert spool.due(time.time(), 10, exclude={ids[0]}) == ids[1:]


async def test_recover_requeues_active_and_drops_partial_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    queue_id = await commit(spool)
    assert spool.claim(queue_id) is not None  # "crash" while it is being delivered
    partial = spool.path("tmp", new_queue_id())
    partial.write_bytes(b'{"v":1,"id":')  # a half-written file that never got a 250
    stray = spool.path("incoming", "not-a-queue-id")
    stray.write_bytes(b"junk")
    # A crash between the two removals of a delivered message leaves its state behind.
    orphan = spool.path("meta", f"{new_queue_id()}.json")
    orphan.write_text('{"attempts": 1}')
    kept = spool.path("meta", f"{queue_id}.json")
    kept.write_text('{"attempts": 1}')

    report = Spool(tmp_path / "spool").recover()

    assert report == {"removed_partial": 1, "requeued": 1, "set_aside": 1, "orphan_meta": 1}
    assert not orphan.exists()
    assert kept.exists()
    assert spool.path("deferred", queue_id).exists()  # tried before: its state is kept
    assert not partial.exists()
    assert (spool.path("corrupt") / "not-a-queue-id").read_bytes() == b"junk"


async def test_a_damaged_file_is_set_aside_never_deleted(spool: Spool) -> None:
    good = await commit(spool)
    damaged = await commit(spool)
    path = spool.path("incoming", damaged)
    path.write_bytes(path.read_bytes()[:-3])  # truncated content
    with pytest.raises(CorruptMessage):
        spool.claim(damaged)
    assert (spool.path("corrupt") / damaged).exists()
    assert spool.claim(good) is not None


async def test_garbage_with_a_queue_id_name_is_set_aside(spool: Spool) -> None:
    queue_id = new_queue_id()
    spool.path("incoming", queue_id).write_bytes(b"\x00\x01 not json at all")
    with pytest.raises(CorruptMessage):
        spool.claim(queue_id)
    assert (spool.path("corrupt") / queue_id).exists()


async def test_operator_cannot_delete_a_message_in_delivery(spool: Spool) -> None:
    queue_id = await commit(spool)
    spool.claim(queue_id)
    with pytest.raises(NotFound):
        spool.delete(queue_id)
    assert spool.path("active", queue_id).exists()


async def test_meta_file_is_atomic_json(spool: Spool) -> None:
    queue_id = await commit(spool)
    message = spool.claim(queue_id)
    spool.defer(message, DeliveryState(attempts=2, last_error="x"), time.time())
    meta = json.loads((spool.path("meta") / f"{queue_id}.json").read_text())
    assert meta["attempts"] == 2
    assert not [p for p in os.listdir(spool.path("tmp"))]


async def test_census_counts_bytes_and_oldest(spool: Spool) -> None:
    first = await commit(spool, b"a" * 100)
    await commit(spool, b"b" * 50)
    census = spool.take_census()
    assert census.messages["incoming"] == 2
    assert census.bytes["incoming"] > 150
    assert census.oldest_received_at == pytest.approx(received_at_from_id(first))
    assert spool.census() == census

"""Operator actions on the spool (`relayd queue`): moves, due times, refusals."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relayd.queue.model import DeliveryState, Envelope, InDelivery, NotFound, new_queue_id
from relayd.queue.spool import Spool


async def queued(spool: Spool) -> str:
    queue_id = new_queue_id()
    envelope = Envelope("app@example.com", ("user@example.com",), received_at=time.time())
    await spool.commit(queue_id, envelope, b"Subject: x\r\n\r\nbody\r\n")
    return queue_id


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    return spool


async def test_hold_keeps_the_due_time_and_release_makes_it_due_now(spool: Spool) -> None:
    queue_id = await queued(spool)
    later = time.time() + 3600
    spool.defer(spool.claim(queue_id), DeliveryState(attempts=1), later)

    assert spool.hold(queue_id) == "deferred"
    assert spool.path("hold", queue_id).stat().st_mtime == pytest.approx(later)
    assert spool.hold(queue_id) == "hold"  # already held: nothing to do

    assert spool.release(queue_id) == "deferred"  # it has delivery state
    assert spool.path("deferred", queue_id).stat().st_mtime <= time.time()
    assert spool.due(time.time(), 10) == [queue_id]


async def test_release_of_a_never_tried_message_goes_to_incoming(spool: Spool) -> None:
    queue_id = await queued(spool)
    spool.hold(queue_id)
    assert spool.due(time.time(), 10) == []  # hold is never attempted
    assert spool.release(queue_id) == "incoming"
    assert spool.due(time.time(), 10) == [queue_id]


async def test_refusals_say_why(spool: Spool) -> None:
    queue_id = await queued(spool)
    spool.hold(queue_id)
    with pytest.raises(NotFound, match="release it"):
        spool.retry(queue_id)
    spool.release(queue_id)
    with pytest.raises(NotFound, match="not on hold"):
        spool.release(queue_id)
    message = spool.claim(queue_id)
    for action in (spool.hold, spool.delete, spool.retry, spool.release):
        with pytest.raises(InDelivery, match="being delivered"):
            action(queue_id)
    spool.release_claim(message)
    with pytest.raises(NotFound, match="not a queue id"):
        spool.delete("../meta")
    assert spool.delete(queue_id) == "incoming"
    with pytest.raises(NotFound, match="no message"):
        spool.delete(queue_id)


async def test_census_follows_operator_moves(spool: Spool) -> None:
    ids = [await queued(spool) for _ in range(3)]
    spool.hold(ids[0])
    spool.fail(spool.claim(ids[1]), DeliveryState(attempts=1, last_error="550"))
    assert spool.take_census().messages == {
        "incoming": 1,
        "active": 0,
        "deferred": 0,
        "hold": 1,
        "failed": 1,
    }
    assert spool.purge_failed() == 1
    assert spool.census().messages["failed"] == 0

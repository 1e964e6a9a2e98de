"""The spool's census, as the queue gauges and /readyz read it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.helpers import make_message

ENVELOPE = Envelope(sender="app@example.com", recipients=("user@example.com",))


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    return spool


async def commit(spool: Spool, received_at: float, body_size: int = 100) -> str:
    queue_id = new_queue_id(received_at)
    envelope = Envelope(ENVELOPE.sender, ENVELOPE.recipients, received_at=received_at)
    await spool.commit(queue_id, envelope, make_message(body_size=body_size))
    return queue_id


async def test_bytes_counted_at_commit_match_a_recount_from_disk(spool: Spool) -> None:
    for size in (100, 5000):
        await commit(spool, time.time(), size)
    counted = spool.census()

    recounted = spool.take_census()

    on_disk = sum(path.stat().st_size for path in spool.path("incoming").iterdir())
    assert counted.bytes["incoming"] == recounted.bytes["incoming"] == on_disk
    assert counted.pending == recounted.pending == 2


async def test_held_messages_do_not_age_the_queue(spool: Spool) -> None:
    now = time.time()
    held = await commit(spool, now - 3600)
    await commit(spool, now - 60)
    spool.move(held, "incoming", "hold")

    # The running counters learn a new oldest message at once but only forget one at
    # the periodic recount (app.CENSUS_INTERVAL): take_census() is the reference.
    census = spool.take_census()
    assert census.pending == 1
    assert 60 <= census.oldest_age(now) < 3600

    spool.move(held, "hold", "incoming")  # released: waiting for delivery again
    assert spool.census().oldest_age(now) >= 3600


async def test_an_empty_queue_has_no_age(spool: Spool) -> None:
    assert spool.census().oldest_age(time.time()) == 0
    queue_id = await commit(spool, time.time() - 10)
    spool.delete(queue_id)

    assert spool.census().oldest_age(time.time()) == 0


async def test_running_counts_match_a_recount_after_claims_and_deliveries(spool: Spool) -> None:
    # claim() counts a message into active/ from the size it read, without a stat.
    ids = [await commit(spool, time.time(), size) for size in (100, 3000, 200)]
    delivered = spool.claim(ids[0])
    assert delivered is not None
    spool.delivered(delivered)
    assert spool.claim(ids[1]) is not None  # stays in active/

    counted = spool.census()
    recounted = spool.take_census()
    assert counted.messages == recounted.messages
    assert counted.bytes == recounted.bytes
    assert counted.messages["active"] == counted.messages["incoming"] == 1

"""The oldest-message age is right the moment the oldest message leaves, not only after
the periodic recount (relayd_queue_oldest_message_age_seconds)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relayd.queue import census
from relayd.queue.census import id_number, received_at_from_number
from relayd.queue.model import DeliveryState, Envelope, new_queue_id, received_at_from_id
from relayd.queue.spool import Spool
from tests.helpers import make_message

HOUR = 3600.0


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    return spool


async def commit(spool: Spool, received_at: float) -> str:
    queue_id = new_queue_id(received_at)
    envelope = Envelope("app@example.com", ("user@example.com",), received_at=received_at)
    await spool.commit(queue_id, envelope, make_message())
    return queue_id


def oldest(spool: Spool) -> float | None:
    return spool.census().oldest_received_at


@pytest.mark.parametrize("recounted", [False, True])
async def test_oldest_follows_the_oldest_as_it_is_delivered_failed_or_held(
    spool: Spool, recounted: bool
) -> None:
    now = time.time()
    ids = [await commit(spool, now - hours * HOUR) for hours in (3, 2, 1, 0.5)]
    if recounted:
        spool.take_census()  # the periodic recount, then moves again
    assert oldest(spool) == pytest.approx(received_at_from_id(ids[0]))

    spool.delivered(spool.claim(ids[0]))
    assert oldest(spool) == pytest.approx(received_at_from_id(ids[1]))

    message = spool.claim(ids[1])  # deferred: still waiting, still the oldest
    spool.defer(message, DeliveryState(attempts=1), now + 60)
    assert oldest(spool) == pytest.approx(received_at_from_id(ids[1]))
    spool.fail(spool.claim(ids[1]), DeliveryState(attempts=2))
    assert oldest(spool) == pytest.approx(received_at_from_id(ids[2]))

    spool.hold(ids[2])  # held mail waits for the operator: not counted
    assert oldest(spool) == pytest.approx(received_at_from_id(ids[3]))
    spool.delete(ids[3])
    assert oldest(spool) is None and spool.census().oldest_age(now) == 0

    spool.release(ids[2])
    assert oldest(spool) == pytest.approx(received_at_from_id(ids[2]))


async def test_counted_oldest_agrees_with_a_recount(spool: Spool) -> None:
    now = time.time()
    ids = [await commit(spool, now - n * 60) for n in range(20, 0, -1)]
    for queue_id in ids[:7]:
        spool.delivered(spool.claim(queue_id))
    counted = oldest(spool)
    assert counted == spool.take_census().oldest_received_at
    assert counted == pytest.approx(received_at_from_id(ids[7]))


def test_ids_kept_as_numbers_sort_and_date_as_the_ids_do() -> None:
    ids = [new_queue_id(now) for now in (1_700_000_000.0, 1_700_000_000.000001, 1_800_000_000.5)]
    assert sorted(ids, key=id_number) == sorted(ids)
    for queue_id in ids:
        assert received_at_from_number(id_number(queue_id)) == received_at_from_id(queue_id)


@pytest.fixture
def few_tracked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(census, "TRACKED_IDS", 3)


@pytest.mark.usefixtures("few_tracked")
@pytest.mark.parametrize("recounted", [False, True])
async def test_beyond_the_tracked_ids_the_oldest_stays_right_and_a_recount_finds_the_next(
    tmp_path: Path, recounted: bool
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    now = time.time()
    ids = [await commit(spool, now - minutes * 60) for minutes in range(8, 0, -1)]
    if recounted:
        spool.take_census()  # tracks the 3 oldest of 8
    spool.hold(ids[1])
    spool.release(ids[1])  # a tracked one back
    for position in range(3):
        assert oldest(spool) == pytest.approx(received_at_from_id(ids[position]))
        assert not spool.recount_wanted
        spool.delivered(spool.claim(ids[position]))
    # All tracked ids left: the last one stands in (never younger than the truth)
    # until the recount that the daemon runs at once.
    assert oldest(spool) <= received_at_from_id(ids[3])
    assert spool.recount_wanted
    spool.take_census()
    assert not spool.recount_wanted
    assert oldest(spool) == pytest.approx(received_at_from_id(ids[3]))
    assert spool.census().pending == 5


@pytest.mark.usefixtures("few_tracked")
async def test_a_recount_keeps_only_the_oldest_ids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    now = time.time()
    ids = [await commit(spool, now - minutes * 60) for minutes in range(6, 0, -1)]
    found, _ = census.scan(spool.path)
    assert sorted(found.pending_ids) == sorted(id_number(queue_id) for queue_id in ids[:3])

"""Claims never run on the event loop; several share one thread hop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from relayd.transports.base import Attempt, Blocked, Submission
from tests.harness import FAST_RETRY, Harness
from tests.helpers import eventually, load_settings


class Accepting:
    rate_limited = False
    concurrency = 2

    def __init__(self) -> None:
        self.delivered: list[str] = []

    def blocked(self) -> Blocked | None:
        return None

    async def wait_until_available(self) -> None:
        await asyncio.Event().wait()

    def reconfigure(self, settings: object) -> None:
        return None

    async def close(self) -> None:
        return None

    async def deliver(self, submission: Submission) -> Attempt:
        self.delivered.append(submission.queue_id)
        return Attempt(delivered=submission.recipients, reply="250 2.0.0 Ok")


async def test_a_slow_claim_never_stops_the_event_loop(tmp_path: Path) -> None:
    """A FIFO's open, or a stalled disk, blocks whoever claims: never the loop."""
    h = Harness(load_settings(tmp_path, {"retry": FAST_RETRY}), Accepting())
    claim, threads = h.spool.claim, []

    def slow_claim(queue_id: str):
        threads.append(threading.get_ident())
        time.sleep(0.3)
        return claim(queue_id)

    h.spool.claim = slow_claim
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    try:
        await h.scheduler.start()
        queue_id = await h.queue()  # small: it used to be claimed on the loop
        await eventually(lambda: h.settled(queue_id))
    finally:
        ticking.cancel()
        await h.stop()
    assert threads and threading.get_ident() not in threads
    assert ticks >= 15  # the loop went on during the 0.3 s claim


async def test_messages_waiting_share_a_thread_hop(tmp_path: Path) -> None:
    h = Harness(load_settings(tmp_path, {"retry": FAST_RETRY}), Accepting())
    hops: list[int] = []
    batch = h.scheduler.claims._claim_batch

    def counted(ids: list[str]) -> list[object]:
        hops.append(len(ids))
        return batch(ids)

    h.scheduler.claims._claim_batch = counted
    ids = await h.queue_many(12)
    try:
        await h.scheduler.start()
        await eventually(h.drained)
    finally:
        await h.stop()
    assert sorted(h.transport.delivered) == sorted(ids)
    assert sum(hops) >= 12 and len(hops) < 12  # fewer hops than messages
    assert max(hops) <= h.scheduler.active_limit

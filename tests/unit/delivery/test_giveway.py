"""Deliveries give way to the listener: one connection fewer, nothing read ahead, only
while messages arrive quickly and the process is busy; wide again once either ends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from relayd.delivery.giveway import ARRIVALS_PER_SECOND, CPU_SHARE, WINDOW, ListenerFirst
from relayd.transports.base import Attempt, Submission
from tests.harness import FAST_RETRY, Harness
from tests.helpers import eventually, load_settings
from tests.unit.delivery.test_claims import Accepting
from tests.unit.delivery.test_routing import Routed


class Clocks:
    """Wall and CPU time that the test moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu = 5.0

    def spend(self, seconds: float, cpu_share: float) -> None:
        self.now += seconds
        self.cpu += seconds * cpu_share


def watching(clocks: Clocks) -> ListenerFirst:
    return ListenerFirst(clock=lambda: clocks.now, cpu_clock=lambda: clocks.cpu)


def burst(first: ListenerFirst, clocks: Clocks, *, per_second: float, cpu_share: float) -> None:
    """One window of arrivals at ``per_second`` with the process ``cpu_share`` busy."""
    for _ in range(round(per_second * WINDOW)):
        first.arrived()
    clocks.spend(WINDOW * 1.01, cpu_share)  # a little over: float sums of 0.1 fall short


def test_a_burst_on_a_busy_process_engages_it_for_the_next_window() -> None:
    clocks = Clocks()
    first = watching(clocks)
    assert not first.engaged()  # nothing measured yet
    burst(first, clocks, per_second=ARRIVALS_PER_SECOND * 2, cpu_share=CPU_SHARE * 1.5)
    assert first.engaged()
    clocks.spend(WINDOW / 2, 1.0)  # within the window: the decision holds
    assert first.engaged()
    clocks.spend(WINDOW, 0.0)  # the burst ended: no arrivals in the last window
    assert not first.engaged()


def test_a_burst_on_a_process_with_cpu_to_spare_is_left_alone() -> None:
    """Deliveries waiting on the network (Exchange tens of ms away) cost little CPU:
    narrowing them would only slow them."""
    clocks = Clocks()
    first = watching(clocks)
    burst(first, clocks, per_second=ARRIVALS_PER_SECOND * 5, cpu_share=CPU_SHARE * 0.8)
    assert not first.engaged()


def test_a_busy_process_without_arrivals_is_left_alone() -> None:
    """A drain of the queue keeps the process busy by itself: it must not narrow itself."""
    clocks = Clocks()
    first = watching(clocks)
    burst(first, clocks, per_second=ARRIVALS_PER_SECOND * 0.8, cpu_share=1.0)
    assert not first.engaged()


def test_arrivals_are_a_rate_over_the_time_since_the_last_look() -> None:
    """Twenty messages over ten quiet seconds are a trickle, not a burst."""
    clocks = Clocks()
    first = watching(clocks)
    for _ in range(20):
        first.arrived()
    clocks.spend(10.0, 1.0)
    assert not first.engaged()


class Holding(Accepting):
    """A transport of three connections whose deliveries take a while: it counts how
    many the scheduler has under way at once (a real transport's pool would hold the
    ones beyond three, read ahead, until a connection is free)."""

    concurrency = 3

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.peak = 0

    async def deliver(self, submission: Submission) -> Attempt:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.03)
        self.in_flight -= 1
        self.delivered.append(submission.queue_id)
        return Attempt(delivered=submission.recipients, reply="250 2.0.0 Ok")


async def test_deliveries_go_one_connection_fewer_and_unread_during_a_burst_and_wide_after(
    tmp_path: Path,
) -> None:
    transport = Holding()
    h = Harness(load_settings(tmp_path, {"retry": FAST_RETRY}), transport)
    # A process always busy (CPU time runs with the wall clock), and arrivals far
    # above the threshold while the "listener" task runs.
    h.scheduler.listener_first = ListenerFirst(cpu_clock=time.monotonic)
    first = h.scheduler.listener_first

    async def listener() -> None:
        while True:
            for _ in range(ARRIVALS_PER_SECOND):
                first.arrived()
            await asyncio.sleep(0.01)

    sending = asyncio.create_task(listener())
    try:
        await asyncio.sleep(WINDOW * 1.5)  # a full window of the burst measured
        await h.scheduler.start()
        during = await h.queue_many(12)
        await eventually(lambda: set(during) <= set(transport.delivered))
        assert transport.peak == 2
        assert h.scheduler.active_limit == 2
        sending.cancel()
        # The window since the scheduler's last look ends with the burst's last
        # arrivals; the one after it has none.
        await asyncio.sleep(WINDOW * 1.5)
        first.engaged()
        await asyncio.sleep(WINDOW * 1.5)
        assert not first.engaged()
        transport.peak = 0
        after = await h.queue_many(12, notify=False)
        h.scheduler.wake()
        await eventually(lambda: set(after) <= set(transport.delivered))
        assert transport.peak == 6  # three on the wire, three read ahead
        assert h.scheduler.active_limit == 6
    finally:
        sending.cancel()
        await h.stop()


async def test_every_route_gives_way_to_the_same_listener(tmp_path: Path) -> None:
    routed = Routed(tmp_path)
    watchers = {id(s.listener_first) for s in routed.scheduler.schedulers.values()}
    assert len(watchers) == 1 and len(routed.scheduler.schedulers) == 3

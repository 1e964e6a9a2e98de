"""The ids the scheduler takes next: two bounded lanes, taken in turn.

* **New mail** (incoming/), oldest first: queue ids sort by arrival, so the lane is
  kept sorted and whatever the source (the listener's ``notify``, a scan of the
  spool) the oldest message goes first. It holds at most ``limit`` ids; beyond, the
  newest are left on disk for a later scan, which lists them oldest first.
* **Due retries** (deferred/ messages whose time has come), in the order they came
  due, at most ``retry_limit``.

``pop`` alternates between the lanes while both hold ids, so a backlog of new mail
(easy at Exchange's 30 messages a minute) never makes due retries wait behind all of
it, and a burst of retries after an outage does not hold up new mail either. Postfix
does the same with its incoming and deferred queues (qmgr takes from each in turn).

``ReadySource`` fills the lanes: the listener's ``notify`` (no directory scan for new
mail) and scans of the spool (start-up, retries coming due, ``wake`` after an
operator's change, a periodic safety net), each lane scanned only when it is empty.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable

from relayd.queue.spool import Spool

RESCAN_INTERVAL = 15.0  # safety net: see operator changes and anything missed
READY_LIMIT = 10_000  # new-mail ids kept in memory; beyond, the spool is scanned instead
SCAN_BATCH = 500  # ids one scan takes, per lane (and the bound of the due-retries lane)
MIN_SCAN_GAP = 0.05  # never scan the spool in a tight loop


class ReadyQueue:
    """Bounded, de-duplicated, fair: see the module docstring."""

    def __init__(self, limit: int, retry_limit: int) -> None:
        self.limit = limit
        self.retry_limit = retry_limit
        self._incoming: list[str] = []  # sorted: oldest first
        self._retries: deque[str] = deque()
        self._members: set[str] = set()
        self._retry_next = True  # whose turn it is while both lanes hold ids

    def __len__(self) -> int:
        return len(self._incoming) + len(self._retries)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._members

    def ids(self) -> set[str]:
        return set(self._members)

    @property
    def incoming_count(self) -> int:
        return len(self._incoming)

    @property
    def retry_count(self) -> int:
        return len(self._retries)

    @property
    def incoming_room(self) -> int:
        return max(0, self.limit - len(self._incoming))

    @property
    def retry_room(self) -> int:
        return max(0, self.retry_limit - len(self._retries))

    def add_new(self, queue_id: str) -> bool:
        """New mail from the listener. False when it was not kept (the lane is full, or
        every id in it is older): a later scan finds it on disk."""
        return self.add_incoming((queue_id,)) == 0

    def add_incoming(self, queue_ids: Iterable[str]) -> int:
        """New mail found in incoming/; returns how many ids were left out (for a
        later scan) to keep the lane within its bound, the newest first."""
        for queue_id in queue_ids:
            if queue_id not in self._members:
                bisect.insort(self._incoming, queue_id)
                self._members.add(queue_id)
        excess = len(self._incoming) - self.limit
        if excess <= 0:
            return 0
        for queue_id in self._incoming[self.limit :]:
            self._members.discard(queue_id)
        del self._incoming[self.limit :]
        return excess

    def add_retries(self, queue_ids: Iterable[str]) -> None:
        """Due retries, in the order they came due, as many as there is room for."""
        for queue_id in queue_ids:
            if len(self._retries) >= self.retry_limit:
                return
            if queue_id not in self._members:
                self._retries.append(queue_id)
                self._members.add(queue_id)

    def pop(self) -> str | None:
        """The next id: the lanes in turn, the other one when one is empty."""
        take_retry = bool(self._retries) and (self._retry_next or not self._incoming)
        if take_retry:
            queue_id = self._retries.popleft()
        elif self._incoming:
            queue_id = self._incoming.pop(0)  # a memmove of at most `limit` pointers
        else:
            return None
        self._retry_next = not take_retry
        self._members.discard(queue_id)
        return queue_id


class ReadySource:
    """The ready lanes and the scans that fill them; the scheduler asks ``next``."""

    def __init__(self, spool: Spool, owns: Callable[[str, str], bool] | None = None) -> None:
        self.spool = spool
        self.owns = owns  # a route's: (id, state) → whether its scheduler takes it
        self.lanes = ReadyQueue(READY_LIMIT, SCAN_BATCH)
        self._scan_due_at = 0.0  # monotonic; 0 = scan as soon as the new-mail lane is empty
        self._last_scan = -MIN_SCAN_GAP
        self._next_deferred: float | None = None  # wall clock
        self._finished_during_scan: set[str] | None = None

    def __len__(self) -> int:
        return len(self.lanes)

    def notify(self, queue_id: str) -> None:
        if not self.lanes.add_new(queue_id):
            self._scan_due_at = 0.0  # left on disk: a scan finds it, oldest first

    def wake(self) -> None:
        """Rescan soon (an operator changed the spool)."""
        self._scan_due_at = 0.0
        self._next_deferred = None

    def rescan_soon(self) -> None:
        self._scan_due_at = 0.0

    def come_back_at(self, next_attempt: float) -> None:
        """A message was deferred until ``next_attempt`` (wall clock): look then."""
        self._next_deferred = min(self._next_deferred or math.inf, next_attempt)

    def finished(self, queue_id: str) -> None:
        if self._finished_during_scan is not None:
            self._finished_during_scan.add(queue_id)

    def idle_time(self) -> float:
        """How long nothing needs looking at."""
        until_scan = self._scan_due_at - time.monotonic()
        if self._next_deferred is not None:
            until_scan = min(until_scan, self._next_deferred - time.time())
        return max(MIN_SCAN_GAP, until_scan)

    async def next(self, active: Collection[str]) -> str | None:
        """The next id to claim (None: nothing is ready); scans when a lane ran dry."""
        if self._scan_needed():
            await self._scan(active)
        return self.lanes.pop()

    # --- scanning ------------------------------------------------------------------

    def _scan_needed(self) -> bool:
        now = time.monotonic()
        if now - self._last_scan < MIN_SCAN_GAP:
            return False
        deferred_due = self._next_deferred is not None and self._next_deferred <= time.time()
        retries_wanted = deferred_due and self.lanes.retry_count == 0
        incoming_wanted = now >= self._scan_due_at and self.lanes.incoming_count == 0
        return retries_wanted or incoming_wanted

    async def _scan(self, active: Collection[str]) -> None:
        exclude = set(active) | self.lanes.ids()
        batch = min(SCAN_BATCH, self.lanes.incoming_room)
        retry_batch = min(SCAN_BATCH, self.lanes.retry_room)
        self._finished_during_scan = set()
        try:
            incoming, retries, next_deferred = await asyncio.to_thread(
                find_due, self.spool, exclude, batch, retry_batch, self.owns
            )
        finally:
            finished, self._finished_during_scan = self._finished_during_scan, None
        self._last_scan = time.monotonic()
        # A message that finished while the scan ran may have been deferred already;
        # taking it now would ignore its next-attempt time.
        skip = finished.union(active)
        left_out = self.lanes.add_incoming(q for q in incoming if q not in skip)
        self.lanes.add_retries(q for q in retries if q not in skip)
        self._next_deferred = next_deferred
        if batch > 0:  # with no room, what is on disk stays as unknown as it was
            more_waiting = len(incoming) >= batch or left_out > 0
            self._scan_due_at = 0.0 if more_waiting else self._last_scan + RESCAN_INTERVAL


def find_due(
    spool: Spool,
    exclude: set[str],
    batch: int,
    retry_batch: int,
    owns: Callable[[str, str], bool] | None = None,
) -> tuple[list[str], list[str], float | None]:
    """In a thread: up to ``batch`` new ids (oldest first), up to ``retry_batch`` due
    retries (in the order they came due), and when the next deferred message not
    among them is due; with ``owns``, only the ids one route's scheduler takes."""
    now = time.time()
    deferred = [
        (entry.next_attempt, entry.queue_id)
        for entry in spool.entries(("deferred",))
        if entry.queue_id not in exclude
        and entry.next_attempt is not None
        and (owns is None or owns(entry.queue_id, "deferred"))
    ]
    due = heapq.nsmallest(retry_batch, (item for item in deferred if item[0] <= now))
    taken = {queue_id for _, queue_id in due}
    upcoming = min((at for at, queue_id in deferred if queue_id not in taken), default=None)
    incoming: list[str] = []
    if batch > 0:  # every deferred id excluded: due() then lists incoming/ only
        excluded = exclude | {queue_id for _, queue_id in deferred}
        incoming = spool.due(now, batch, excluded, owns)
    return incoming, [queue_id for _, queue_id in due], upcoming

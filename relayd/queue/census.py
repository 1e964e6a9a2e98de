"""The queue's counts, bytes and oldest arrival: kept by every move, recounted from disk.

Gauges and `relayd queue` read these counters rather than listing directories: with
100,000 messages queued, a listing costs a good part of a second.

The oldest pending message is kept exact between recounts: every move names its
queue id, the ids of pending messages are counted (a move between two pending
states counts it out and in again), and a heap of those ids (they sort by arrival)
gives the oldest, so the age gauge drops as soon as the oldest message leaves.
The ids are kept as the numbers they spell (``id_number``): with 100,000 queued, as
strings they and their dict took about 11 MiB of the daemon's memory; as numbers
about half (bench/README.md, "peak RSS, with messages queued").
"""

from __future__ import annotations

import heapq
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relayd.queue.model import PENDING_STATES, STATES, is_queue_id, received_at_from_id


@dataclass
class Census:
    """Counts, bytes and the oldest arrival per state, read from disk."""

    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    oldest_received_at: float | None = None
    # The ids of the pending messages as numbers, as scan() found them (for
    # Counts.replace only).
    pending_ids: list[int] | None = field(default=None, repr=False, compare=False)

    @property
    def pending(self) -> int:
        return sum(self.messages[state] for state in PENDING_STATES)

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest pending message has waited (0 when none is pending)."""
        oldest = self.oldest_received_at
        return max(0.0, now - oldest) if oldest else 0.0


# The oldest pending ids the census tracks one by one. With more pending, the ids after
# these are only counted: new arrivals are younger than every tracked id, so the oldest
# is still the smallest tracked one; once all the tracked have left, a recount (asked
# for through ``recount_wanted``, done by the daemon within a second) finds the next.
# Tracking every id cost about 20 MiB of peak memory with 100,000 queued.
TRACKED_IDS = 4096


class Counts:
    """The current census, updated by each move this process makes; thread-safe."""

    def __init__(self, tracked: int | None = None) -> None:
        self._lock = threading.Lock()  # guards everything below
        self._census = Census()
        self.tracked = tracked or TRACKED_IDS
        # Tracked pending id (its number) -> how many pending files it has (0 once it
        # left: dropped when it reaches the top of the heap, or at the next recount).
        self._pending: dict[int, int] = {}
        self._by_age: list[int] = []  # a heap of the ids in _pending: the oldest on top
        # Whether every pending id is tracked; if not, every untracked one is above
        # _bound (the largest id tracked when tracking stopped being complete).
        self._complete = True
        self._bound = -1
        self._last_oldest: int | None = None
        self.recount_wanted = False  # the oldest is no longer known without a recount

    def snapshot(self) -> Census:
        """The current counters (cheap; kept up to date by every move this process makes)."""
        with self._lock:
            return Census(dict(self._census.messages), dict(self._census.bytes), self._oldest())

    def count(
        self,
        state: str,
        delta: int,
        size: int,
        received_at: float = 0.0,
        *,
        queue_id: str = "",
    ) -> None:
        """Count a move. ``queue_id`` keeps the oldest exact; without it only an
        arrival's ``received_at`` is known, which can lower the oldest but never
        raise it again before the next recount."""
        with self._lock:
            self._census.messages[state] += delta
            self._census.bytes[state] += size
            if state in PENDING_STATES:
                if queue_id:
                    self._track(id_number(queue_id), delta)
                elif delta > 0 and received_at:
                    oldest = self._census.oldest_received_at
                    if oldest is None or received_at < oldest:
                        self._census.oldest_received_at = received_at
            if self._census.pending == 0:
                self._census.oldest_received_at = None
                self._forget_ids(complete=True)

    def replace(self, census: Census) -> None:
        with self._lock:
            ids, census.pending_ids = census.pending_ids or [], None
            self._census = census
            self._forget_ids(complete=len(ids) >= census.pending)
            for queue_id in ids:  # an id may be in two states for a moment
                self._pending[queue_id] = self._pending.get(queue_id, 0) + 1
            self._by_age = list(self._pending)
            heapq.heapify(self._by_age)
            self._bound = max(ids, default=-1)
            if ids:
                self._census.oldest_received_at = None  # the heap knows it exactly
            self.recount_wanted = False

    def _forget_ids(self, complete: bool) -> None:
        self._pending, self._by_age = {}, []
        self._complete, self._bound, self._last_oldest = complete, -1, None

    def _track(self, queue_id: int, delta: int) -> None:
        files = self._pending.get(queue_id)
        if files is not None:
            self._pending[queue_id] = files + delta
            return
        if delta <= 0:
            return  # an untracked id left: the oldest is among the tracked
        if self._complete and len(self._pending) >= self.tracked:
            self._complete = False  # this and later arrivals: counted, not tracked
        elif self._complete or queue_id <= self._bound:
            self._pending[queue_id] = delta  # a new id, or a tracked one back (released)
            heapq.heappush(self._by_age, queue_id)
            self._bound = max(self._bound, queue_id) if self._complete else self._bound

    def _oldest(self) -> float | None:
        """The arrival of the oldest pending message (lock held)."""
        heap = self._by_age
        while heap and self._pending.get(heap[0], 0) <= 0:
            self._pending.pop(heapq.heappop(heap), None)
        if heap:
            self._last_oldest = heap[0]
        elif not self._complete and self._last_oldest is not None:
            # The tracked ones have all left; until the recount, the last one tracked
            # stands in (the true oldest is younger: its age is overstated for a moment).
            self.recount_wanted = True
            heap = [self._last_oldest]
        candidates = [received_at_from_number(heap[0])] if heap else []
        if self._census.oldest_received_at is not None:
            candidates.append(self._census.oldest_received_at)
        return min(candidates) if candidates else None


def id_number(queue_id: str) -> int:
    """A queue id as the number its hex digits spell: numbers sort as the ids do."""
    return int(queue_id, 16)


def received_at_from_number(number: int) -> float:
    """``received_at_from_id`` for ``id_number(queue_id)``: the id's last six hex
    digits (24 bits) are random, the others the arrival in microseconds."""
    return (number >> 24) / 1_000_000


def scan(
    path: Callable[[str], Path], names: set[str] | None = None, keep: int | None = None
) -> tuple[Census, list[str]]:
    """Count every state from disk: the census, and the paths of files whose names
    are not queue ids (which the count skips). Each id found is added to ``names``
    when it is given (recovery uses them to find delivery states left without a file).

    Per file only what the census needs: the name (ids sort by arrival, so the
    smallest pending name is the oldest message) and one stat for the size. Of the
    pending ids, the ``keep`` smallest are kept for ``Counts`` to track.
    """
    census = Census(pending_ids=[])
    largest_first: list[int] = []  # a heap of the kept ids, negated: the largest on top
    keep = keep or TRACKED_IDS
    strays: list[str] = []
    oldest = ""
    for state in STATES:
        count = size = 0
        with os.scandir(path(state)) as entries:
            for entry in entries:
                if not is_queue_id(entry.name):
                    strays.append(entry.path)
                    continue
                try:
                    size += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # moved on meanwhile; the next count sees it
                    continue
                count += 1
                if names is not None:
                    names.add(entry.name)
                if state in PENDING_STATES:
                    _keep_smallest(largest_first, id_number(entry.name), keep)
                    if not oldest or entry.name < oldest:
                        oldest = entry.name
        census.messages[state], census.bytes[state] = count, size
    census.oldest_received_at = received_at_from_id(oldest) if oldest else None
    census.pending_ids = [-negated for negated in largest_first]
    return census, strays


def _keep_smallest(largest_first: list[int], number: int, keep: int) -> None:
    if len(largest_first) < keep:
        heapq.heappush(largest_first, -number)
    elif -number > largest_first[0]:
        heapq.heapreplace(largest_first, -number)

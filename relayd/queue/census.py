"""The queue's counts, bytes and oldest arrival: kept by every move, recounted from disk.

Gauges and `relayd queue` read these counters rather than listing directories: with
100,000 messages queued, a listing costs a good part of a second.
"""

from __future__ import annotations

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

    @property
    def pending(self) -> int:
        return sum(self.messages[state] for state in PENDING_STATES)

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest pending message has waited (0 when none is pending)."""
        oldest = self.oldest_received_at
        return max(0.0, now - oldest) if oldest else 0.0


class Counts:
    """The current census, updated by each move this process makes; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the census below
        self._census = Census()

    def snapshot(self) -> Census:
        """The current counters (cheap; kept up to date by every move this process makes)."""
        with self._lock:
            return Census(
                dict(self._census.messages),
                dict(self._census.bytes),
                self._census.oldest_received_at,
            )

    def count(self, state: str, delta: int, size: int, received_at: float = 0.0) -> None:
        with self._lock:
            self._census.messages[state] += delta
            self._census.bytes[state] += size
            if delta > 0 and received_at and state in PENDING_STATES:
                oldest = self._census.oldest_received_at
                if oldest is None or received_at < oldest:
                    self._census.oldest_received_at = received_at
            if self._census.pending == 0:
                self._census.oldest_received_at = None

    def replace(self, census: Census) -> None:
        with self._lock:
            self._census = census


def scan(path: Callable[[str], Path], names: set[str] | None = None) -> tuple[Census, list[str]]:
    """Count every state from disk: the census, and the paths of files whose names
    are not queue ids (which the count skips). Each id found is added to ``names``
    when it is given (recovery uses them to find delivery states left without a file).

    Per file only what the census needs: the name (ids sort by arrival, so the
    smallest pending name is the oldest message) and one stat for the size.
    """
    census = Census()
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
                if state in PENDING_STATES and (not oldest or entry.name < oldest):
                    oldest = entry.name
        census.messages[state], census.bytes[state] = count, size
    census.oldest_received_at = received_at_from_id(oldest) if oldest else None
    return census, strays

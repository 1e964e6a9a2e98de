"""Upstream limits as small clock-driven objects: sliding windows.

Nothing here sleeps or does I/O. Each object answers "how long until I allow this?"
from a clock it was given, so the scheduler can wait exactly that long and tests can
drive time by hand.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]


class SlidingWindow:
    """At most ``limit`` units in any ``window`` seconds; a limit of 0 means no limit.

    A sliding window (not a token bucket): a bucket that starts full lets through up
    to twice the limit in the first window, and Exchange Online counts per window.
    Used for messages per minute (unit = one message) and recipients per day
    (unit = one recipient).
    """

    def __init__(self, limit: int, window: float, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0

    @property
    def unlimited(self) -> bool:
        return self.limit <= 0

    def used(self) -> int:
        self._expire(self._clock())
        return self._used

    def remaining(self) -> float:
        """Units that may be spent now (infinity when there is no limit)."""
        return float("inf") if self.unlimited else max(0, self.limit - self.used())

    def wait_time(self, units: int = 1) -> float:
        """Seconds until ``units`` may be spent; 0 if now.

        More units than the whole limit wait until the window is empty, so an
        oversized request is delayed, never refused for ever.
        """
        if self.unlimited:
            return 0.0
        now = self._clock()
        self._expire(now)
        must_free = self._used + min(units, self.limit) - self.limit
        if must_free <= 0:
            return 0.0
        freed = 0
        for at, count in self._events:
            freed += count
            if freed >= must_free:
                return max(0.0, at + self.window - now)
        return 0.0  # unreachable: everything in the window frees at least must_free

    def spend(self, units: int = 1) -> None:
        if self.unlimited or units <= 0:
            return
        self._events.append((self._clock(), units))
        self._used += units

    def set_limit(self, limit: int) -> None:
        """SIGHUP: a new limit applies at once to what was already spent."""
        self.limit = limit

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] + self.window <= now:
            _, count = self._events.popleft()
            self._used -= count

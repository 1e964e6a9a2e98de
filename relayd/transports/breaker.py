"""The circuit breaker: pause the whole upstream after throttling or failures.

Clock-driven like ``relayd.delivery.limits``: nothing here sleeps or does I/O, so the
transport asks it "how long until I may try?" and tests drive time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class CircuitBreaker:
    """Pauses the whole upstream after throttling or failures, then lets one probe through.

    ``trip`` opens it for a fixed pause (421 / 432 4.3.2: the server asked us to slow
    down). ``failure`` opens it for a pause that doubles with each consecutive failure
    (connection refused, auth rejected), between the given bounds. After the pause the
    breaker is *probing*: callers should try one connection at a time until
    ``success`` closes it again. A new breaker probes too (``start_probing``): until
    the first session has worked, nothing is known about the upstream, and three
    sessions refused at once would mean three token refreshes.

    ``success`` (a session connected and authenticated) ends a pause that failures
    caused, but not one the server asked for (``trip``: throttling, an account
    refusal) before it has run out: a session that authenticated proves nothing about
    Exchange's quota or its throttling.
    """

    def __init__(self, clock: Clock = time.monotonic, *, start_probing: bool = False) -> None:
        self._clock = clock
        self._open_until = 0.0
        self._asked = False  # the pause was asked for by the server (trip)
        self.failures = 0
        self.reason = "start" if start_probing else ""

    def trip(self, reason: str, pause: float) -> None:
        self._hold(reason, pause)
        self._asked = True

    def _hold(self, reason: str, pause: float) -> None:
        self.reason = reason
        self._open_until = max(self._open_until, self._clock() + pause)

    def failure(self, reason: str, min_pause: float, max_pause: float) -> float:
        """Record a consecutive failure; returns the pause it caused."""
        self.failures += 1
        pause = min(max_pause, min_pause * 2 ** min(self.failures - 1, 32))
        self._hold(reason, pause)
        return pause

    def resume(self) -> None:
        """End the pause early (the cause was fixed); the next attempt is a probe."""
        self._open_until = 0.0

    def success(self) -> None:
        self.failures = 0
        if self._asked and self.is_open:
            return  # throttled or refused by the server: wait until the pause runs out
        self._open_until = 0.0
        self._asked = False
        self.reason = ""

    def remaining(self) -> float:
        """Seconds the upstream stays paused (0 when closed or probing)."""
        return max(0.0, self._open_until - self._clock())

    @property
    def is_open(self) -> bool:
        return self.remaining() > 0

    @property
    def probing(self) -> bool:
        """Something failed and nothing has succeeded since: try one at a time."""
        return bool(self.reason) and not self.is_open

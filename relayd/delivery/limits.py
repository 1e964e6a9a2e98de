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


class Spent:
    """One spend in a window: when, and how many units still count."""

    __slots__ = ("at", "units")

    def __init__(self, at: float, units: int) -> None:
        self.at = at
        self.units = units


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
        self._events: deque[Spent] = deque()
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
        for event in self._events:
            freed += event.units
            if freed >= must_free:
                return max(0.0, event.at + self.window - now)
        return 0.0  # unreachable: everything in the window frees at least must_free

    def spend(self, units: int = 1) -> Spent:
        """Spend ``units`` now; the returned record can give part of them back."""
        event = Spent(self._clock(), units)
        if self.unlimited or units <= 0:
            event.units = 0
            return event
        self._events.append(event)
        self._used += units
        return event

    def refund(self, spent: Spent, units: int) -> None:
        """Give back up to ``units`` of an earlier spend that the upstream never counted.

        The rest of that spend keeps its own time: giving back from a later spend
        instead would let the window free up before the upstream's own does.
        """
        units = min(units, spent.units)
        if units <= 0:
            return
        spent.units -= units
        self._used -= units

    def recount(self, spent: Spent, units: int) -> None:
        """Count ``units`` of an earlier spend from now, and give the rest of it back.

        The upstream counts a message when it accepts it, after the spend (for the first
        message on a connection: a connect, TLS and AUTH later) and before now. Counted
        from the spend, the window would free up before the upstream's does and let
        messages through that the upstream refuses as over its limit
        (bench/ratelimit.py: 3 throttling replies a minute, one per connection).
        """
        self.refund(spent, spent.units)
        self.spend(units)

    def set_limit(self, limit: int) -> None:
        """SIGHUP: a new limit applies at once to what was already spent."""
        self.limit = limit

    def _expire(self, now: float) -> None:
        while self._events and self._events[0].at + self.window <= now:
            event = self._events.popleft()
            self._used -= event.units
            event.units = 0  # out of the window: nothing left to give back


class Reservation:
    """What one message took from a SendingBudget: one message, its recipients."""

    __slots__ = ("message", "recipients")

    def __init__(self, message: Spent, recipients: Spent) -> None:
        self.message = message
        self.recipients = recipients


class SendingBudget:
    """The upstream's two sending limits (Exchange Online: 30 messages a minute,
    10,000 recipients a day), reserved when a message is claimed and given back for
    what the upstream never counted."""

    def __init__(self, per_minute: int, per_day: int, clock: Clock = time.monotonic) -> None:
        self.rate = SlidingWindow(per_minute, 60.0, clock)
        self.daily = SlidingWindow(per_day, 86_400.0, clock)

    def set_limits(self, per_minute: int, per_day: int) -> None:
        self.rate.set_limit(per_minute)
        self.daily.set_limit(per_day)

    def reserve(self, recipients: int) -> Reservation:
        return Reservation(self.rate.spend(1), self.daily.spend(recipients))

    def give_back(self, reservation: Reservation, messages: int, recipients: int) -> None:
        """Keep ``messages`` and ``recipients`` of the reservation, counted from now (the
        attempt's end: ``SlidingWindow.recount``); return the rest."""
        self.rate.recount(reservation.message, messages)
        self.daily.recount(reservation.recipients, recipients)

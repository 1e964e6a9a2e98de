"""The idle timeout of every fast-path session of one listener, on one timer.

A session that sends nothing for ``listen.idle_timeout`` is closed without a reply, as
aiosmtpd closes its own (RFC 5321 §4.5.3.2.7 gives a server 5 minutes). A timer per
session, made at the greeting and cancelled at the close, was about 2 % of the event
loop's samples with a new connection per message (bench/README.md, "One idle timer
per listener"). Here each session only keeps its deadline; one look at all the
deadlines, every quarter of the timeout (at most every second), closes the sessions
past theirs, so a silent session ends at most that much after its timeout. The look
runs only while there are sessions to look at.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

# The longest wait between two looks: how late past its timeout a session may end.
MAX_INTERVAL = 1.0


class IdleSession(Protocol):
    """What the sweep needs of a session."""

    idle_deadline: float  # the event loop's time at which the session has been idle too long

    def timed_out(self) -> None:
        """Close the session: its deadline passed."""


class IdleSweep:
    """Closes the watched sessions whose idle deadline has passed."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.interval = min(MAX_INTERVAL, timeout / 4)
        self._sessions: set[IdleSession] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, session: IdleSession, loop: asyncio.AbstractEventLoop) -> None:
        self._sessions.add(session)
        if self._timer is None:
            self._timer = loop.call_later(self.interval, self._sweep, loop)

    def unwatch(self, session: IdleSession) -> None:
        self._sessions.discard(session)

    @property
    def running(self) -> bool:
        """Whether a look is due (only while sessions are watched, or until the next look)."""
        return self._timer is not None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for session in [session for session in self._sessions if session.idle_deadline <= now]:
            self._sessions.discard(session)
            session.timed_out()
        self._timer = loop.call_later(self.interval, self._sweep, loop) if self._sessions else None

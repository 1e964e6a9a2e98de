"""A small pool of upstream SMTP sessions: at most N open, reused, closed when idle.

Exchange Online allows three concurrent connections per mailbox and answers a
fourth with ``432 4.3.2``, so the limit counts every open connection, in use or
idle, and a slot is only given back once its connection is closed. Connections are
reused for many messages (authentication is the expensive part) and closed with
QUIT after ``idle_timeout`` without work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiosmtplib

QUIT_TIMEOUT = 5.0


class ConnectionPool:
    """Hands out connected, authenticated sessions made by ``connect``."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[aiosmtplib.SMTP]],
        *,
        limit: int,
        idle_timeout: float,
        on_count: Callable[[int], None] = lambda count: None,
    ) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._connect = connect
        self._on_count = on_count
        self._open = 0  # in use + idle + being opened + being closed
        self._idle: list[tuple[aiosmtplib.SMTP, asyncio.TimerHandle]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._closing: set[asyncio.Task] = set()
        self._closed = False

    @property
    def open_count(self) -> int:
        return self._open

    async def acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A session and whether it was reused. Waits while the pool is full.

        Exceptions from ``connect`` propagate; the slot is given back first.
        """
        while True:
            session = self._take_idle()
            if session is not None:
                return session, True
            if self._open < self.limit:
                self._count(+1)
                break
            await self._wait_for_slot()
        try:
            return await self._connect(), False
        except BaseException:
            self._count(-1)
            raise

    def release(self, session: aiosmtplib.SMTP, *, reusable: bool) -> None:
        """Give a session back: kept for the next message, or closed and forgotten."""
        if reusable and session.is_connected and not self._closed and self._open <= self.limit:
            handle = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, session)
            self._idle.append((session, handle))
            self._wake_one()
        else:
            session.close()
            self._count(-1)

    def discard_idle(self) -> None:
        """Drop every idle session (one turned out stale: the others likely are too)."""
        while self._idle:
            session, handle = self._idle.pop()
            handle.cancel()
            session.close()
            self._count(-1)

    def reconfigure(self, limit: int, idle_timeout: float) -> None:
        self.limit, self.idle_timeout = limit, idle_timeout
        for _ in range(min(self._open - self.limit, len(self._idle))):
            session, handle = self._idle.pop(0)  # the longest idle first
            handle.cancel()
            self._quit_later(session)
        self._wake_one()

    async def close(self) -> None:
        """QUIT every idle session and wait (bounded) for the goodbyes."""
        self._closed = True
        while self._idle:
            session, handle = self._idle.pop()
            handle.cancel()
            self._quit_later(session)
        if self._closing:
            await asyncio.wait(self._closing, timeout=QUIT_TIMEOUT + 1)

    # --- internals -------------------------------------------------------------------

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        while self._idle:
            session, handle = self._idle.pop()  # most recent first: the rest time out
            handle.cancel()
            if session.is_connected:
                return session
            session.close()
            self._count(-1)
        return None

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # pass on a wake-up this task can no longer use
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire(self, session: aiosmtplib.SMTP) -> None:
        for index, (idle, _) in enumerate(self._idle):
            if idle is session:
                del self._idle[index]
                self._quit_later(session)
                return

    def _quit_later(self, session: aiosmtplib.SMTP) -> None:
        task = asyncio.get_running_loop().create_task(self._quit(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _quit(self, session: aiosmtplib.SMTP) -> None:
        # The slot stays taken until the server has seen QUIT: opening a new
        # connection before the old one is gone could be the "4th" one.
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.quit(), QUIT_TIMEOUT)
        finally:
            session.close()
            self._count(-1)

    def _count(self, delta: int) -> None:
        self._open += delta
        self._on_count(self._open)
        if delta < 0:
            self._wake_one()

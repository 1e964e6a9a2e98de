"""The upstream connection pool: limit, reuse, replacement, idle close."""

from __future__ import annotations

import asyncio

import pytest

from relayd.transports.pool import ConnectionPool
from tests.helpers import eventually


class Session:
    """Stands in for aiosmtplib.SMTP: the pool only uses these three members."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.is_connected = True
        self.quit_sent = False

    def close(self) -> None:
        self.is_connected = False

    async def quit(self) -> None:
        self.quit_sent = True
        self.close()


class Factory:
    def __init__(self) -> None:
        self.made: list[Session] = []
        self.fail_next = False

    async def __call__(self) -> Session:
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionRefusedError("refused")
        self.made.append(Session(len(self.made)))
        return self.made[-1]


def pool(factory: Factory, limit: int = 2, idle_timeout: float = 60) -> ConnectionPool:
    counts: list[int] = []
    made = ConnectionPool(factory, limit=limit, idle_timeout=idle_timeout, on_count=counts.append)
    made.counts = counts  # type: ignore[attr-defined]
    return made


async def test_never_more_than_the_limit_and_sessions_are_reused() -> None:
    factory = Factory()
    connections = pool(factory, limit=2)
    (a, reused_a), _ = await connections.acquire(), await connections.acquire()
    assert not reused_a and connections.open_count == 2
    third = asyncio.ensure_future(connections.acquire())
    await asyncio.sleep(0.01)
    assert not third.done()
    connections.release(a, reusable=True)
    session, reused = await asyncio.wait_for(third, 1)
    assert session is a and reused
    assert len(factory.made) == 2 and max(connections.counts) == 2


async def test_broken_session_frees_its_slot_for_a_new_one() -> None:
    factory = Factory()
    connections = pool(factory, limit=1)
    session, _ = await connections.acquire()
    session.close()  # the server hung up
    connections.release(session, reusable=True)
    fresh, reused = await connections.acquire()
    assert fresh is not session and not reused and connections.open_count == 1


async def test_failed_connect_gives_the_slot_back() -> None:
    factory = Factory()
    connections = pool(factory, limit=1)
    factory.fail_next = True
    with pytest.raises(ConnectionRefusedError):
        await connections.acquire()
    assert connections.open_count == 0
    session, _ = await connections.acquire()
    assert session.is_connected


async def test_idle_sessions_are_closed_with_quit() -> None:
    factory = Factory()
    connections = pool(factory, limit=2, idle_timeout=0.05)
    session, _ = await connections.acquire()
    connections.release(session, reusable=True)
    await eventually(lambda: connections.open_count == 0, 2)
    assert session.quit_sent


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    factory = Factory()
    connections = pool(factory, limit=1)
    session, _ = await connections.acquire()
    first = asyncio.ensure_future(connections.acquire())
    second = asyncio.ensure_future(connections.acquire())
    await asyncio.sleep(0.01)
    connections.release(session, reusable=True)  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs
    got, _ = await asyncio.wait_for(second, 1)
    assert got is session


async def three_idle_sessions() -> tuple[ConnectionPool, list[Session]]:
    connections = pool(Factory(), limit=3)
    sessions = [(await connections.acquire())[0] for _ in range(3)]
    for session in sessions:
        connections.release(session, reusable=True)
    return connections, sessions


async def test_close_quits_idle_sessions() -> None:
    connections, sessions = await three_idle_sessions()
    await connections.close()
    assert all(s.quit_sent for s in sessions) and connections.open_count == 0


async def test_lower_limit_closes_surplus_idle_sessions() -> None:
    connections, _ = await three_idle_sessions()
    connections.reconfigure(1, 60)
    await eventually(lambda: connections.open_count == 1, 2)

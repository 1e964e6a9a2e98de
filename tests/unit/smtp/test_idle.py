"""IdleSweep: one timer closes every fast-path session silent past its deadline."""

from __future__ import annotations

import asyncio

from relayd.smtp.idle import MAX_INTERVAL, IdleSweep

TIMEOUT = 0.2  # a look every 0.05 s


class Session:
    """Stands for a FastPath: a deadline that commands move on, and a close."""

    def __init__(self, sweep: IdleSweep, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.sweep = loop, sweep
        self.closed_at: float | None = None
        self.command()
        sweep.watch(self, loop)

    def command(self) -> None:
        self.idle_deadline = self.loop.time() + self.sweep.timeout

    def timed_out(self) -> None:
        self.closed_at = self.loop.time()


async def test_a_silent_session_ends_soon_after_its_timeout_and_a_busy_one_goes_on() -> None:
    loop = asyncio.get_running_loop()
    sweep = IdleSweep(TIMEOUT)
    started = loop.time()
    silent, busy = Session(sweep, loop), Session(sweep, loop)
    for _ in range(8):  # 8 x 0.05 s: twice the timeout in all
        await asyncio.sleep(TIMEOUT / 4)
        busy.command()

    assert silent.closed_at is not None
    assert TIMEOUT <= silent.closed_at - started <= TIMEOUT + 2 * sweep.interval
    assert busy.closed_at is None


async def test_the_look_runs_only_while_sessions_are_watched() -> None:
    loop = asyncio.get_running_loop()
    sweep = IdleSweep(TIMEOUT)
    assert not sweep.running
    sessions = [Session(sweep, loop) for _ in range(50)]
    assert sweep.running
    for session in sessions:
        sweep.unwatch(session)  # the sessions closed on their own
    await asyncio.sleep(2 * sweep.interval)

    assert not sweep.running
    assert all(session.closed_at is None for session in sessions)  # unwatched: left alone
    again = Session(sweep, loop)
    await asyncio.sleep(TIMEOUT + 2 * sweep.interval)
    assert again.closed_at is not None and not sweep.running


def test_the_look_is_a_quarter_of_the_timeout_and_at_most_a_second() -> None:
    assert IdleSweep(0.2).interval == 0.05
    assert IdleSweep(300).interval == MAX_INTERVAL == 1.0

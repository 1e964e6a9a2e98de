"""The claim path in-process: how fast the scheduler takes queued messages, and how much
of that runs on the event loop's thread.

    python3 bench/claims.py [--messages 3000] [--size 2048] [--repeat 5]

Two figures per run, both over a spool filled beforehand (nothing is asserted):

* ``claim``: the scheduler's own claim step (rename into active/, read, parse, the
  sender policy) as its dispatch loop takes messages with every delivery slot free;
  msg/s and the event loop thread's CPU time per claim.
* ``drain``: the whole delivery path (claim, a transport that accepts at once, the
  outcome batches) until the spool is empty; msg/s.

Run the same file from another checkout to compare (it imports the relayd beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayd.queue.model import Envelope, new_queue_id
from relayd.transports.base import Attempt, Blocked, Submission
from tests.harness import Harness
from tests.helpers import load_settings, make_message


class Accepting:
    """A transport that accepts every message at once."""

    rate_limited = False
    concurrency = 4

    def blocked(self) -> Blocked | None:
        return None

    async def wait_until_available(self) -> None:
        await asyncio.Event().wait()

    def reconfigure(self, settings: object) -> None:
        return None

    async def close(self) -> None:
        return None

    async def deliver(self, submission: Submission) -> Attempt:
        return Attempt(delivered=submission.recipients, reply="250 2.0.0 Ok")


async def fill(h: Harness, count: int, size: int) -> list[str]:
    ids = []
    content = make_message("claim bench", body_size=size)
    envelope = Envelope("app@example.com", ("user@example.org",), received_at=time.time())
    for _ in range(count):
        queue_id = new_queue_id()
        await h.spool.commit(queue_id, envelope, content)
        ids.append(queue_id)
    return ids


async def claim_run(directory: Path, count: int, size: int) -> tuple[float, float]:
    h = Harness(load_settings(directory), Accepting())
    ids = await fill(h, count, size)
    scheduler = h.scheduler
    cpu, started = time.thread_time(), time.perf_counter()
    if hasattr(scheduler, "_claim_soon"):  # one at a time (relayd before the claim batches)
        for queue_id in ids:
            await scheduler._claim_soon(queue_id)
    else:  # as the dispatch loop does with every delivery slot free
        scheduler._ready.lanes.add_incoming(ids)
        while await scheduler._next_claim() is not None:
            pass
    elapsed, loop_cpu = time.perf_counter() - started, time.thread_time() - cpu
    return count / elapsed, loop_cpu / count * 1e6


async def drain_run(directory: Path, count: int, size: int) -> float:
    h = Harness(load_settings(directory), Accepting())
    await fill(h, count, size)
    started = time.perf_counter()
    await h.scheduler.start()
    deadline = started + 300
    while h.spool.census().pending and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    await h.stop()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--base", default="/var/tmp")
    args = parser.parse_args()
    claims, loop_us, drains = [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="relayd-claims-", dir=args.base) as tmp:
            rate, cpu = asyncio.run(claim_run(Path(tmp) / "a", args.messages, args.size))
            claims.append(rate)
            loop_us.append(cpu)
            drains.append(asyncio.run(drain_run(Path(tmp) / "b", args.messages, args.size)))
    print(f"{args.messages} messages of {args.size} bytes, medians of {args.repeat} runs")
    print(
        f"claim: {statistics.median(claims):.0f} msg/s, event loop CPU per claim "
        f"{statistics.median(loop_us):.0f} µs"
    )
    print(f"drain: {statistics.median(drains):.0f} msg/s")


if __name__ == "__main__":
    main()

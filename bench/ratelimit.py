"""Exchange's sending limit used fully, never exceeded. Prints the figures.

    python3 bench/ratelimit.py [--limit 600] [--minutes 2] [--runs 1]

The fake Exchange here (``LimitedExchange``, a subclass of tests/fakes/exchange.py)
enforces ``--limit`` N messages in any 60 seconds per mailbox, counted when it accepts
a message (the end of DATA), as Exchange Online does with its 30 a minute; the
message past the limit gets a throttling reply and is not kept. relayd runs with
``upstream.rate_limit_per_minute: N`` (its window is a minute too: both are scaled by
N, not by time) over a spool filled beforehand with (minutes + 1) × N messages, so that
mail is waiting during ``--minutes`` whole minutes. Printed:

* delivered in each minute from the first delivery, as % of N (target ≥ 98 % in every
  minute that ended with mail still queued), and the most in any sliding 60 s;
* throttling replies the fake gave (target 0);
* oldest first: how far a message's delivery position is from its queue position
  (at most the messages in flight, 2 × 3 connections, when the order is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from bench.delivering import Fakes, relay_config
from bench.measure import machine, relay_cpu_seconds
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import HOSTNAME, FakeExchange
from tests.helpers import RelayProcess, make_message, wait_for_port

WINDOW = 60.0
# Exchange Online's answer when a mailbox sends too fast (a 4.3.2, as its concurrency
# limit: relayd pauses the whole upstream on it, relayd.transports.replies).
THROTTLED = f"432 4.3.2 STOREDRV.ClientSubmit; sender submission rate exceeded [{HOSTNAME}]"
NUMBER = re.compile(rb"Subject: queued (\d+)")


class LimitedExchange(FakeExchange):
    """At most ``limit`` accepted messages per mailbox in any ``window`` seconds."""

    def __init__(self, *args, limit: int, window: float = WINDOW, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limit, self.window = limit, window
        self.accepted_at: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        self.delivered_at: list[float] = []
        self.throttled = 0

    def record(self, envelope, *args, **kwargs) -> str:
        now = time.monotonic()
        recent = self.accepted_at[(envelope.mail_from or "").lower()]
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.limit:
            self.throttled += 1
            return THROTTLED
        recent.append(now)
        self.delivered_at.append(now)
        return super().record(envelope, *args, **kwargs)


async def prefill(spool_directory: Path, count: int) -> None:
    """``count`` messages numbered in queue order (ids 1 ms apart, oldest first)."""
    spool = Spool(spool_directory)
    spool.recover()
    start = time.time() - count / 1000 - 1
    for number in range(count):
        envelope = Envelope(sender=MAILBOX, recipients=("user@example.org",), received_at=start)
        content = make_message(f"queued {number}", body_size=2048, sender=MAILBOX)
        await spool.commit(new_queue_id(start + number / 1000), envelope, content)


def per_minute(times: list[float], minutes: int) -> list[int]:
    first = times[0]
    counts = [0] * (minutes + 1)
    for at in times:
        counts[min(int((at - first) // WINDOW), minutes)] += 1
    return counts


def most_in_window(times: list[float]) -> int:
    return max(bisect.bisect_left(times, at + WINDOW) - i for i, at in enumerate(times))


def displacement(fake: FakeExchange) -> int:
    """The largest distance between a message's delivery position and its queue position."""
    numbers = [int(m.group(1)) for m in (NUMBER.search(x.content) for x in fake.messages) if m]
    order = sorted(numbers)
    return max((abs(order.index(n) - i) for i, n in enumerate(numbers)), default=0)


async def run(root: Path, args: argparse.Namespace) -> dict:
    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    count = (args.minutes + 1) * args.limit
    with FakeEntra(ca) as entra:
        fakes = Fakes(ca, ca_file, entra)
        fake = LimitedExchange(ca, validator=entra.is_valid_access_token, limit=args.limit)
        await fake.start()
        try:
            path = await asyncio.to_thread(
                relay_config, root, fakes, fake, rate_limit_per_minute=args.limit
            )
            print(f"  filling the spool with {count:,} messages", file=sys.stderr)
            await prefill(root / "spool", count)
            relay = RelayProcess(path).start(wait=False)
            try:
                await asyncio.to_thread(wait_for_port, "127.0.0.1", relay.port, 60)
                assert relay.process is not None
                cpu_before = relay_cpu_seconds(relay.process.pid)
                deadline = time.monotonic() + (args.minutes + 2) * WINDOW + 60
                while len(fake.messages) < count and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                cpu = relay_cpu_seconds(relay.process.pid) - cpu_before
            finally:
                relay.stop()
        finally:
            await fake.stop()
    times = fake.delivered_at
    return {
        "count": count,
        "delivered": len(fake.messages),
        "minutes": per_minute(times, args.minutes) if times else [],
        "most": most_in_window(times) if times else 0,
        "throttled": fake.throttled,
        "displacement": displacement(fake),
        "cpu": cpu,
    }


def report(result: dict, args: argparse.Namespace) -> list[str]:
    n = args.limit
    minutes = result["minutes"]
    shown = ", ".join(
        f"minute {i + 1}: {c} ({c * 100 / n:.1f} %)" for i, c in enumerate(minutes[: args.minutes])
    )
    backlogged = minutes[: args.minutes]
    sustained = min(backlogged) * 100 / n if backlogged else 0.0
    return [
        f"limit N = {n}/min (fake and relayd), {result['count']:,} queued, 3 connections:",
        f"  delivered {result['delivered']:,}; {shown}; after: {sum(minutes[args.minutes :])}",
        f"  sustained (the least of the minutes with mail still queued): {sustained:.1f} % of N",
        f"  most in any 60 s: {result['most']} (limit {n})",
        f"  throttling replies: {result['throttled']}",
        f"  oldest first: largest distance between delivery and queue position"
        f" {result['displacement']} (in flight at most 6)",
        f"  relayd CPU {result['cpu']:.2f} s",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=600, help="N messages per minute")
    parser.add_argument("--minutes", type=int, default=2, help="whole minutes with mail queued")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"), help="where spools go")
    args = parser.parse_args()
    lines = []
    for number in range(args.runs):
        header = machine(args.base)
        with tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp:
            print(f"  rate limit run {number + 1}", file=sys.stderr)
            result = asyncio.run(run(Path(tmp), args))
        lines += [header, *report(result, args), ""]
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

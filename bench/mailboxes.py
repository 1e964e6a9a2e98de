"""Draining a queue over one mailbox and over three (routes): a Markdown table.

    python3 bench/mailboxes.py [--messages 600] [--rate 30] [--scale 100] [--repeat 1]

Exchange Online lets each mailbox submit 30 messages a minute; Learn says the excess
is delayed ("throttled and successively carried over to the following minutes").
The fake Exchange (tests/fakes/exchange.py) does that per mailbox, ``--rate`` a
minute scaled up ``--scale`` times so a run takes seconds: 30 × 100 = 3,000 a minute,
at most 30 in any 0.6 s, the final reply to the excess held until a slot frees. One
mailbox carries everything at that rate; with routes, each mailbox has its own, so
three should drain about three times faster.

Each row: the spool filled beforehand with ``--messages`` 2 KiB messages (senders
taking turns, one sender per mailbox), then ``relayd serve`` with one mailbox (no
``routes:``) or with two routes plus the default, every mailbox signed in at the fake
Entra ID (``relayd auth login --mailbox`` for the routes), 3 connections each. The
time runs from the moment relayd listens to the last message at the fake (and to
the first). relayd's own ``rate_limit_per_minute`` is off: its window is a real
minute and cannot be scaled, so the fake's delay is the limit here. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from bench.e2e import QUIET
from bench.measure import machine
from relayd import config
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.auth_helpers import AuthCli, shipped_oauth, sign_in
from tests.fakes.entra import MAILBOX, FakeEntra, sign_in_in_browser
from tests.fakes.exchange import FakeExchange
from tests.helpers import RelayProcess, deep_merge, make_message, wait_for_port, write_config

ROUTE_MAILBOXES = ("notify@contoso.example", "approvals@contoso.example")


def login(config_path: Path, ca_file: Path, mailbox: str) -> None:
    """`relayd auth login --mailbox MAILBOX`: sign in "on a laptop", paste the address."""
    cli = AuthCli(config_path, "login", "--mailbox", mailbox)
    try:
        cli.send(sign_in_in_browser(cli.wait_for_line("https://127.0.0.1:"), ca_file) + "\n")
        if cli.finish() != 0:
            raise SystemExit(f"auth login --mailbox {mailbox} failed:\n{cli.everything()}")
    finally:
        cli.kill()


async def prefill(spool_directory: Path, count: int, senders: list[str]) -> None:
    """Queue ``count`` messages straight into the spool, the senders taking turns."""
    spool = Spool(spool_directory)
    spool.recover()
    for number in range(count):
        sender = senders[number % len(senders)]
        content = make_message(f"message {number}", body_size=2048, sender=sender)
        envelope = Envelope(sender=sender, recipients=("u@example.org",), received_at=time.time())
        await spool.commit(new_queue_id(), envelope, content)


async def drain(tmp: Path, mailboxes: int, args: argparse.Namespace) -> dict:
    """One row: fakes, config, sign-ins, a filled spool, relayd serve until it is empty."""
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    addresses = [MAILBOX, *ROUTE_MAILBOXES[: mailboxes - 1]]
    with FakeEntra(ca, users=tuple(addresses)) as entra:
        fake = FakeExchange(
            ca,
            validator=entra.is_valid_access_token,
            mailbox=MAILBOX,
            mailboxes=tuple(addresses[1:]),
        )
        for address in addresses:
            fake.mailboxes.rate_limit(address, args.rate, per=60 / args.scale)
        await fake.start()
        routes = [{"mailbox": a, "senders": [a], "max_connections": 3} for a in addresses[1:]]
        overrides = {
            "upstream": fake.relay_config(ca_file, rate_limit_per_minute=0)["upstream"],
            "oauth": shipped_oauth(tmp, entra, ca_file),
        }
        if routes:
            overrides["routes"] = routes
        config_path = write_config(tmp, deep_merge(QUIET, overrides))
        await asyncio.to_thread(sign_in, config.load(config_path), ca_file)
        for address in addresses[1:]:
            await asyncio.to_thread(login, config_path, ca_file, address)
        await prefill(tmp / "spool", args.messages, addresses)
        relay = RelayProcess(config_path).start(wait=False)
        try:
            await asyncio.to_thread(wait_for_port, "127.0.0.1", relay.port, 30)
            started = time.perf_counter()
            deadline, first = started + 600, None
            while len(fake.messages) < args.messages and time.perf_counter() < deadline:
                if first is None and fake.messages:
                    first = time.perf_counter() - started
                await asyncio.sleep(0.01)
            seconds = time.perf_counter() - started
        finally:
            relay.stop()
            await fake.stop()
    return {
        "mailboxes": mailboxes,
        "seconds": seconds,
        "first": first if first is not None else seconds,
        "delivered": len(fake.messages),
        "per_mailbox": collections.Counter(m.mailbox for m in fake.messages),
        "peaks": [fake.peak_connections_of(address) for address in addresses],
    }


async def main(args: argparse.Namespace) -> None:
    header = machine(Path(tempfile.gettempdir()))
    results: dict[int, list[dict]] = {1: [], 3: []}
    for _ in range(args.repeat):
        for mailboxes in results:
            print(f"  {mailboxes} mailbox(es), {args.messages} messages", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
                results[mailboxes].append(await drain(Path(tmp), mailboxes, args))
    per_minute = args.rate * args.scale
    window = 60 / args.scale
    print(f"\nrelayd: spool drain over one mailbox and over three — {header}")
    print(
        f"\n`python3 bench/mailboxes.py --messages {args.messages} --rate {args.rate}"
        f" --scale {args.scale} --repeat {args.repeat}`: {args.messages} × 2 KiB queued"
        f" beforehand; the fake Exchange lets each mailbox submit {args.rate} per"
        f" {window:g} s ({per_minute:,} a minute, Exchange's {args.rate} a minute ×"
        f" {args.scale}) and delays the excess; medians of {args.repeat}\n"
    )
    print(
        "| mailboxes | drain s | first delivery s | delivered msg/s | delivered | per mailbox"
        " | peak connections per mailbox | speed-up |"
    )
    print("|---:|---:|---:|---:|---:|---|---|---:|")
    one = statistics.median(row["seconds"] for row in results[1])
    for mailboxes, rows in results.items():
        seconds = statistics.median(row["seconds"] for row in rows)
        first = statistics.median(row["first"] for row in rows)
        last = rows[-1]
        split = ", ".join(str(count) for _, count in sorted(last["per_mailbox"].items()))
        peaks = ", ".join(str(peak) for peak in last["peaks"])
        print(
            f"| {mailboxes} | {seconds:.2f} | {first:.2f} | {args.messages / seconds:,.0f}"
            f" | {last['delivered']}"
            f" | {split} | {peaks} | {one / seconds:.2f}× |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--rate", type=int, default=30, help="messages a minute per mailbox")
    parser.add_argument("--scale", type=int, default=100, help="time runs this much faster")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; medians shown")
    asyncio.run(main(parser.parse_args()))

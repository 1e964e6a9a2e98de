"""End-to-end delivery benchmark: client → relayd serve → upstream. Prints a Markdown table.

    python3 bench/e2e.py [--messages 3000] [--clients 4] [--size 2048] [--rows smtp,maildir]

Rows (nothing is asserted; the figures are what this machine did):

* ``smtp``: ``relayd serve`` as a subprocess, signed in through the fake Entra ID
  (MSAL over HTTPS), delivering to the fake Exchange Online over STARTTLS + AUTH
  XOAUTH2 with a pool of 3 connections, rate limit off.
* ``graph``: ``relayd serve`` with ``upstream.transport: graph``, signed in through the
  fake Entra ID for Microsoft Graph, sending to the fake Graph (tests/fakes/graph.py,
  HTTPS) with at most 4 requests at once, rate limit off.
* ``maildir``: ``relayd serve`` with the maildir transport (a durable Maildir write
  per message instead of the upstream).

Each path runs twice: with clients sending (messages divided by the time from the
first client command to the last delivery: end to end), and as a drain of a spool
filled beforehand (delivery alone: scheduler, spool moves, upstream). A message counts
as delivered when it is at the fake Exchange / in the Maildir. The CPU columns show
where the time went: the client and the fake Exchange share this benchmark's process,
so when that column nears the elapsed time, the benchmark, not relayd, is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from bench.measure import cpu_seconds, machine, relay_cpu_seconds
from relayd import config
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.auth_helpers import shipped_oauth, sign_in
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.graph import FakeGraph
from tests.helpers import (
    RelayProcess,
    deep_merge,
    make_message,
    send_messages,
    wait_for_port,
    write_config,
)

QUIET = {"logging": {"level": "warning"}, "metrics": {"enabled": False}}
PATHS = {
    "smtp": "relayd serve → fake Exchange (STARTTLS + XOAUTH2, pool 3)",
    "graph": "relayd serve → fake Graph (HTTPS sendMail, 4 requests at once)",
    "maildir": "relayd serve → Maildir",
}


def batch(count: int, size: int) -> list[tuple[str, list[str], bytes]]:
    return [
        (
            MAILBOX,
            [f"user{n % 10}@example.org"],
            make_message(f"message {n}", body_size=size, sender=MAILBOX),
        )
        for n in range(count)
    ]


async def prefill(spool_directory: Path, count: int, size: int) -> None:
    """Queue messages straight into the spool (the drain rate then excludes accepting)."""
    spool = Spool(spool_directory)
    spool.recover()
    for sender, recipients, content in batch(count, size):
        envelope = Envelope(sender=sender, recipients=tuple(recipients), received_at=time.time())
        await spool.commit(new_queue_id(), envelope, content)


async def measure(
    relay: RelayProcess, count: int, clients: int, size: int, delivered: Callable[[], int]
) -> dict:
    """Client mode: send ``count`` messages and wait until all are delivered. Drain mode
    (``clients == 0``): the spool was filled beforehand; wait until it is empty."""
    cpu_before = relay_cpu_seconds(relay.process.pid), cpu_seconds(os.getpid())
    started = time.perf_counter()
    already = delivered()
    if clients:
        await send_messages(relay.port, batch(count, size), connections=clients)
    accepted = time.perf_counter()
    deadline = accepted + 300
    while delivered() < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    finished = time.perf_counter()
    cpu_after = relay_cpu_seconds(relay.process.pid), cpu_seconds(os.getpid())
    return {
        "accepted_per_s": count / (accepted - started) if clients else None,
        "delivered_per_s": (count - already) / (finished - started),
        "delivered": delivered(),
        "cpu": [after - before for after, before in zip(cpu_after, cpu_before, strict=True)],
    }


async def run_row(tmp: Path, path: str, args: argparse.Namespace, drain: bool) -> dict:
    """One table row: the upstream, a relayd serve in front of it, the measurement."""
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with FakeEntra(ca) as entra:
        fake = FakeExchange(ca, validator=entra.is_valid_access_token, mailbox=MAILBOX)
        graph = FakeGraph(ca, grant=entra.token_grant, mailbox=MAILBOX)
        if path == "smtp":
            await fake.start()
            overrides = {
                "upstream": fake.relay_config(ca_file, rate_limit_per_minute=0)["upstream"],
                "oauth": shipped_oauth(tmp, entra, ca_file),
            }
            maildir = None
        elif path == "graph":
            await graph.start()
            overrides = {
                "upstream": graph.relay_config(ca_file, rate_limit_per_minute=0),
                "oauth": shipped_oauth(tmp, entra, ca_file),
            }
            maildir = None
        else:
            overrides, maildir = {"upstream": {"transport": "maildir"}}, tmp / "maildir" / "new"
        config_path = write_config(tmp, deep_merge(QUIET, overrides))
        if path in ("smtp", "graph"):
            await asyncio.to_thread(sign_in, config.load(config_path), ca_file)
        if drain:
            await prefill(tmp / "spool", args.messages, args.size)

        def delivered() -> int:
            if path == "graph":
                return len(graph.messages)
            if maildir is None:
                return len(fake.messages)
            return len(os.listdir(maildir)) if maildir.is_dir() else 0

        relay = RelayProcess(config_path).start(wait=False)
        try:
            await asyncio.to_thread(wait_for_port, "127.0.0.1", relay.port, 30)
            clients = 0 if drain else args.clients
            result = await measure(relay, args.messages, clients, args.size, delivered)
        finally:
            relay.stop()
            await fake.stop()
            await graph.stop()
    load = "spool drain" if drain else f"{args.clients} clients"
    peak = {"smtp": fake.stats.peak_connections, "graph": graph.peak_in_flight}.get(path, "-")
    return {"path": PATHS[path], "load": load, **result, "peak": peak}


async def main(args: argparse.Namespace) -> None:
    rows = []
    for path in args.rows.split(","):
        for drain in (False, True):
            with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
                rows.append(await run_row(Path(tmp), path, args, drain))
    print(f"\nrelayd end-to-end delivery — {machine(Path(tempfile.gettempdir()))}")
    print(f"{args.messages} messages of {args.size} bytes, rate limit off\n")
    print(
        "| path | load | accepted msg/s | delivered msg/s | delivered | peak upstream conns"
        " | CPU s relayd | CPU s bench (client + fake) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        accepted = "-" if row["accepted_per_s"] is None else f"{row['accepted_per_s']:.0f}"
        print(
            f"| {row['path']} | {row['load']} | {accepted} | {row['delivered_per_s']:.0f}"
            f" | {row['delivered']} | {row['peak']} | {row['cpu'][0]:.1f} | {row['cpu'][1]:.1f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rows", default="smtp,graph,maildir")
    asyncio.run(main(parser.parse_args()))

"""End-to-end delivery benchmark: client → relayd → upstream. Prints a Markdown table.

    python3 bench/e2e.py [--messages 3000] [--clients 4] [--size 2048]

Rows (nothing is asserted; the figures are what this machine did):

* ``maildir``: ``relayd serve`` as a subprocess with the maildir transport: listener,
  durable spool, scheduler and a durable Maildir write per message.
* ``smtp``: relayd's daemon object (listener, spool, scheduler, SmtpTransport with
  a pool of 3, rate limit off) in a child process, delivering to the fake Exchange
  Online in this process over STARTTLS + AUTH XOAUTH2. Until the MSAL token module
  is merged the access token comes from the tests' stand-in TokenSource (a cached
  token, which is also what the real module hands out between refreshes); after the
  merge this row should run ``relayd serve`` against the fake Entra ID instead.

Each path runs twice: with clients sending (messages divided by the time from the
first client command to the last delivery: end to end), and as a drain of a spool
filled beforehand (delivery alone: scheduler, spool moves, upstream). A message
counts as delivered when it is in the Maildir / at the fake Exchange. The CPU
columns show where the time went: the client and the fake Exchange share the
benchmark's own process (one core), so when that column is near the elapsed time,
the benchmark, not relayd, is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from relayd.spool import Envelope, Spool, new_queue_id
from tests.fakes.exchange import MAILBOX, FakeExchange
from tests.helpers import (
    REPO,
    RelayProcess,
    deep_merge,
    make_message,
    send_messages,
    wait_for_port,
    write_config,
)

QUIET = {"logging": {"level": "warning"}, "metrics": {"enabled": False}}


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(port: int, count: int, clients: int, size: int, delivered) -> dict:
    """Client mode: send ``count`` messages and wait until all are delivered. Drain mode
    (``clients == 0``): the spool was filled beforehand; wait until it is empty."""
    started = time.perf_counter()
    already = delivered()
    if clients:
        await send_messages(port, batch(count, size), connections=clients)
    accepted = time.perf_counter()
    deadline = accepted + 300
    while delivered() < count and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    finished = time.perf_counter()
    return {
        "accepted_per_s": count / (accepted - started) if clients else None,
        "delivered_per_s": (count - already) / (finished - started),
        "delivered": delivered(),
    }


async def run_row(tmp: Path, transport: str, args: argparse.Namespace, drain: bool) -> dict:
    """One table row: start the relay (and the fake Exchange), measure, stop."""
    fake = None
    if transport == "smtp":
        fake, overrides = await start_fake(tmp)
    else:
        overrides = {"upstream": {"transport": "maildir"}}
    config = write_config(tmp, deep_merge(QUIET, overrides))
    if drain:
        await prefill(tmp / "spool", args.messages, args.size)
    relay, delivered = await (start_child(config, fake) if fake else start_serve(tmp, config))
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", relay.port, 30)
        clients = 0 if drain else args.clients
        cpu_before = cpu_seconds(relay.process.pid), cpu_seconds(os.getpid())
        result = await measure(relay.port, args.messages, clients, args.size, delivered)
        cpu_after = cpu_seconds(relay.process.pid), cpu_seconds(os.getpid())
        result["cpu"] = [
            after - before for after, before in zip(cpu_after, cpu_before, strict=True)
        ]
    finally:
        relay.stop()
        if fake is not None:
            await fake.stop()
    path = {
        "maildir": "relayd serve → Maildir",
        "smtp": "relayd (child process) → fake Exchange, STARTTLS + XOAUTH2, pool 3",
    }[transport]
    mode = "spool drain" if drain else f"{args.clients} clients"
    peak = fake.stats.peak_connections if fake else "-"
    return {"path": path, "mode": mode, **result, "peak": peak}


async def start_fake(tmp: Path) -> tuple[FakeExchange, dict]:
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    fake = FakeExchange(ca, validator=lambda user, value: False)
    await fake.start()
    return fake, fake.relay_config(ca_file, rate_limit_per_minute=0, max_connections=3)


async def start_serve(tmp: Path, config: Path):
    new = tmp / "maildir" / "new"
    relay = RelayProcess(config).start(wait=False)
    return relay, lambda: len(os.listdir(new)) if new.is_dir() else 0


async def start_child(config: Path, fake: FakeExchange):
    """The relay for the smtp row, in a child process; it prints its (stand-in) token."""
    relay = RelayProcess(config, args=())
    relay.process = subprocess.Popen(
        [sys.executable, __file__, "--relay-child", str(config)],
        stdout=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    token = (await asyncio.to_thread(relay.process.stdout.readline)).strip()
    fake.validator = lambda user, value: user == MAILBOX and value == token
    return relay, lambda: len(fake.messages)


def relay_child(config_path: str) -> None:
    """The relay side of the smtp row: Relay with the stand-in token source."""
    from relayd import config
    from relayd import logging as relay_logging
    from relayd.app import Relay
    from tests.fakes.tokens import StandInTokens

    settings = config.load(config_path)
    relay_logging.configure("json", "warning")
    tokens = StandInTokens(settings.upstream.mailbox)
    print(tokens.current, flush=True)

    class StandInRelay(Relay):
        def __init__(self) -> None:
            self.tokens = tokens  # Relay.__init__ reads it (getattr) for the transport
            super().__init__(settings, config_path=Path(config_path))

    async def run() -> None:
        await StandInRelay().run()

    asyncio.run(run())


async def main(args: argparse.Namespace) -> None:
    rows = []
    for transport in args.rows.split(","):
        for drain in (False, True):
            with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
                rows.append(await run_row(Path(tmp), transport, args, drain))
    print(f"\nrelayd end-to-end delivery — {machine()}")
    print(f"{args.messages} messages of {args.size} bytes, rate limit off\n")
    print(
        "| path | load | accepted msg/s | delivered msg/s | delivered | peak upstream conns"
        " | CPU s relayd | CPU s bench (client + fake) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        accepted = "-" if row["accepted_per_s"] is None else f"{row['accepted_per_s']:.0f}"
        print(
            f"| {row['path']} | {row['mode']} | {accepted} | {row['delivered_per_s']:.0f}"
            f" | {row['delivered']} | {row['peak']} | {row['cpu'][0]:.1f} | {row['cpu'][1]:.1f} |"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--relay-child":
        relay_child(sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rows", default="maildir,smtp")
    asyncio.run(main(parser.parse_args()))

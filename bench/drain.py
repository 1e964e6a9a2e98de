"""relayd's CPU per delivered message, delivery alone: a spool filled beforehand is
drained by ``relayd serve`` to the fake Exchange (STARTTLS + XOAUTH2, pool of 3,
rate limit off, log level info as shipped). Prints a Markdown table.

    python3 bench/drain.py [--messages 2000] [--rounds 3] [--tree A=PATH --tree B=PATH]
                           [--py-spy PATH --profile-tree B]

``--tree`` runs the same drain with another checkout's relayd (its PYTHONPATH), the
trees alternated round by round, so an A/B on a busy machine shares its moments.
CPU is relayd's process (user + system, /proc) from the first to the last delivery
it makes; the fake Exchange runs in this benchmark's process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from bench.e2e import prefill
from bench.measure import from_checkout, machine, relay_cpu_seconds
from relayd import config
from tests.auth_helpers import shipped_oauth, sign_in
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.helpers import RelayProcess, deep_merge, wait_for_port, write_config


async def one_drain(tmp: Path, tree: Path, args: argparse.Namespace, spy: str | None) -> dict:
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with FakeEntra(ca) as entra:
        fake = FakeExchange(ca, validator=entra.is_valid_access_token, mailbox=MAILBOX)
        await fake.start()
        overrides = {
            "metrics": {"enabled": args.metrics},
            "upstream": fake.relay_config(ca_file, rate_limit_per_minute=0)["upstream"],
            "oauth": shipped_oauth(tmp, entra, ca_file),
        }
        config_path = write_config(tmp, deep_merge({}, overrides))
        await asyncio.to_thread(sign_in, config.load(config_path), ca_file)
        await prefill(tmp / "spool", args.messages, args.size)
        relay = RelayProcess(config_path, **from_checkout(tree)).start(wait=False)
        recorder = None
        try:
            await asyncio.to_thread(wait_for_port, "127.0.0.1", relay.port, 30)
            while not fake.messages:  # from the first delivery (start-up excluded)
                await asyncio.sleep(0.001)
            pid = relay.process.pid
            if spy:
                recorder = subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--gil",
                        "-r",
                        "250",
                        "-f",
                        "raw",
                        "-o",
                        spy_out(args),
                        "-p",
                        str(pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            cpu_before, first, started = (
                relay_cpu_seconds(pid),
                len(fake.messages),
                time.perf_counter(),
            )
            deadline = started + args.deadline
            while len(fake.messages) < args.messages and time.perf_counter() < deadline:
                await asyncio.sleep(0.002)
            elapsed = time.perf_counter() - started
            cpu = relay_cpu_seconds(pid) - cpu_before
            count = len(fake.messages) - first
        finally:
            if recorder is not None:
                recorder.send_signal(2)
                recorder.wait(30)
            relay.stop()
            await fake.stop()
    return {"rate": count / elapsed, "cpu_ms": 1000 * cpu / count, "count": count}


def spy_out(args: argparse.Namespace) -> str:
    return str(args.profile_out)


async def main(args: argparse.Namespace) -> None:
    trees = dict(item.split("=", 1) for item in args.tree) or {"this": str(REPO)}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for round_number in range(args.rounds):
        for name, tree in trees.items():
            spy = args.py_spy if name == args.profile_tree and round_number == 0 else None
            with tempfile.TemporaryDirectory(prefix="relayd-drain-", dir=args.base) as tmp:
                row = await one_drain(Path(tmp), Path(tree).resolve(), args, spy)
            results[name].append(row)
            print(
                f"round {round_number + 1} {name}: {row['rate']:.0f} msg/s,"
                f" {row['cpu_ms']:.3f} ms CPU/msg ({row['count']} msgs)",
                flush=True,
            )
    print(f"\nrelayd spool drain to the fake Exchange — {machine(args.base)}")
    print(f"{args.messages} × {args.size} bytes, pool 3, {args.rounds} rounds alternated\n")
    print(
        "| relayd | drain msg/s (each round) | CPU ms per delivered msg (each round)"
        " | median CPU ms |"
    )
    print("|---|---|---|---:|")
    for name, rows in results.items():
        rates = ", ".join(f"{r['rate']:.0f}" for r in rows)
        cpus = ", ".join(f"{r['cpu_ms']:.3f}" for r in rows)
        median = statistics.median(r["cpu_ms"] for r in rows)
        print(f"| {name} | {rates} | {cpus} | {median:.3f} |")


REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], help="NAME=checkout path")
    parser.add_argument("--metrics", action="store_true", help="metrics endpoint on")
    parser.add_argument("--py-spy", help="py-spy's path: profile the first round of --profile-tree")
    parser.add_argument("--profile-tree", default="this")
    parser.add_argument("--profile-out", type=Path, default=Path("/tmp/relayd-drain.raw"))
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--deadline", type=float, default=120, help="seconds per drain, at most")
    asyncio.run(main(parser.parse_args()))

"""Accept benchmark: how fast relayd takes mail durably. Prints a Markdown table.

    python3 bench/accept.py [--messages 5000] [--clients 1,20] [--size 2048]

relayd runs as a subprocess with an upstream nobody can reach, so the figures are the
listener and the durable spool commit alone (fsync of file and directory before 250).
Nothing here asserts a speed: it prints what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.smtpload import run_load
from tests.helpers import RelayProcess, unreachable_upstream, write_config


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--clients", default="1,20")
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp:
        base = Path(tmp)
        config = write_config(base, {**unreachable_upstream(base), "logging": {"level": "warning"}})
        with RelayProcess(config) as relay:
            idle_rss = peak_rss_mib(relay.process.pid)
            for clients in (int(c) for c in args.clients.split(",")):
                result = asyncio.run(
                    run_load("127.0.0.1", relay.port, clients, args.messages, args.size)
                )
                rows.append(result)
            peak = peak_rss_mib(relay.process.pid)

    print(f"relayd accept benchmark — {machine()}\n")
    print("| clients | size | messages | failed | msg/s | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.clients} | {r.size} B | {r.sent} | {r.failed} | {r.rate:,.0f} "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} |"
        )
    print(f"\nRSS: {idle_rss:.1f} MiB at start, peak {peak:.1f} MiB")


if __name__ == "__main__":
    main()

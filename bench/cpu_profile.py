"""Where relayd's CPU goes while it accepts and delivers at once. Prints the figures.

    python3 bench/cpu_profile.py [--messages 2000] [--clients 20] [--rate 200] [--py-spy PATH]

The load of bench/delivering.py (smtp-source, a new connection per message, relayd
forwarding over STARTTLS + XOAUTH2 to the fake Exchange, 3 connections), relayd alone.
During the load:

* per-thread CPU from /proc/<pid>/task: the main thread (the event loop: listener,
  scheduler, TLS to the upstream) against the other threads (spool commits, claims,
  outcome moves, token store), and the share of one core each used;
* py-spy (``pip install py-spy``; on PyPI) samples the thread that holds the GIL
  (``--gil``: Python work on a CPU; a thread waiting in a system call or for a queue is
  not counted), and each sample is put in the part of relayd its stack is in (the
  first of ``PARTS`` it contains: queue, listener, transports, scheduler, ...).
  relayd runs on uvloop: time inside uvloop's C code (its TLS and socket work) shows
  under the Python frame that called it, or as "event loop (uvloop, C)" when no
  Python frame of relayd is on the stack (callbacks, TLS record processing).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from bench.delivering import Fakes, _describe, run_relayd
from bench.measure import machine, thread_cpu_seconds
from tests.fakes.entra import FakeEntra

# (what the stack contains, the part of relayd it is), the first match wins: a listener
# stack that reaches the spool's commit counts as spool, a delivery stack that reaches
# the spool's moves too.
PARTS = (
    ("relayd/queue/", "spool (commit, claims, moves)"),
    ("relayd/smtp/", "listener (relayd's SMTP handler)"),
    ("aiosmtpd/", "listener (aiosmtpd)"),
    ("relayd/transports/", "delivery (transport, SMTP client, TLS)"),
    ("aiosmtplib/", "delivery (aiosmtplib, TLS)"),
    ("relayd/delivery/", "scheduler, claims, outcomes"),
    ("relayd/auth/", "tokens"),
    ("relayd/ops/", "ops (metrics, status, health)"),
    ("structlog/", "logging"),
)
BLOCKING = ["--gil"]  # only samples of the thread holding the GIL: Python work on a CPU
LOOP = "event loop (uvloop, C: callbacks, sockets, TLS records)"


@contextlib.contextmanager
def watched(pid: int, py_spy: str | None, rate: int, output: Path, cpu: dict) -> Iterator[None]:
    """Per-thread CPU over the block, and py-spy recording it (stopped by SIGINT)."""
    before = thread_cpu_seconds(pid)
    started = time.perf_counter()
    spy = None
    if py_spy:
        command = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), *BLOCKING]
        command += ["--threads", "--format", "raw", "--output", str(output)]
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached before the load starts
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(pid, stop, cpu.setdefault("series", [])))
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        after = thread_cpu_seconds(pid)
        cpu["elapsed"] = time.perf_counter() - started
        cpu["main"] = after.get(pid, 0.0) - before.get(pid, 0.0)
        cpu["others"] = sum(v - before.get(t, 0.0) for t, v in after.items() if t != pid)
        cpu["threads"] = len(after)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)


def _sample(pid: int, stop: threading.Event, series: list) -> None:
    """(time, main thread CPU, other threads' CPU) every second, until ``stop``."""
    while not stop.wait(1.0 if series else 0.0):
        threads = thread_cpu_seconds(pid)
        main = threads.pop(pid, 0.0)
        series.append((time.perf_counter(), main, sum(threads.values())))


def busy_seconds(series: list) -> list[tuple[float, float]]:
    """Per second: the share of a core the main thread and the other threads used."""
    return [
        ((m1 - m0) / (t1 - t0), (o1 - o0) / (t1 - t0))
        for (t0, m0, o0), (t1, m1, o1) in itertools.pairwise(series)
    ]


def parts(raw: Path) -> tuple[collections.Counter, collections.Counter]:
    """Samples per part of relayd: the main thread's, and the other threads'."""
    main, others = collections.Counter(), collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        part = next((name for key, name in PARTS if key in stack), LOOP)
        thread = stack.split(";", 1)[0]
        target = main if "MainThread" in thread else others
        target[part] += int(count)
    return main, others


def report(result, cpu: dict, raw: Path | None) -> list[str]:
    elapsed = cpu["elapsed"]
    lines = [
        _describe(result),
        f"relayd CPU over {elapsed:.1f} s: main thread {cpu['main']:.2f} s"
        f" ({cpu['main'] * 100 / elapsed:.0f} % of a core), {cpu['threads'] - 1} other threads"
        f" {cpu['others']:.2f} s ({cpu['others'] * 100 / elapsed:.0f} % of a core)",
    ]
    seconds = busy_seconds(cpu.get("series", []))
    if seconds:
        shown = ", ".join(f"{m * 100:.0f}+{o * 100:.0f}" for m, o in seconds)
        lines.append(f"each second, % of a core, main thread + other threads: {shown}")
    if raw is None or not raw.is_file():
        return [*lines, "(no py-spy samples)"]
    main, others = parts(raw)
    for title, counter in (("main thread", main), ("other threads", others)):
        total = sum(counter.values()) or 1
        lines.append(f"\n{title}: {total} samples")
        lines += [f"  {n * 100 / total:5.1f} %  {part}" for part, n in counter.most_common()]
    return lines


async def run(root: Path, args: argparse.Namespace) -> list[str]:
    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cpu: dict = {}
    raw = (args.raw or root / "py-spy.txt") if args.py_spy else None
    with FakeEntra(ca) as entra:
        tmp = root / "relayd"
        tmp.mkdir()

        def watch(pid: int) -> contextlib.AbstractContextManager:
            return watched(pid, args.py_spy, args.rate, raw or root / "py-spy.txt", cpu)

        result = await run_relayd(tmp, Fakes(ca, ca_file, entra), args, watch)
    return report(result, cpu, raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy's path")
    parser.add_argument("--raw", type=Path, help="keep py-spy's samples (raw format) here")
    parser.add_argument("--no-py-spy", action="store_true", help="per-thread CPU only")
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"), help="where spools go")
    args = parser.parse_args()
    if args.no_py_spy:
        args.py_spy = None
    header = machine(args.base)
    with tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp:
        lines = asyncio.run(run(Path(tmp), args))
    print(f"\n{header}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

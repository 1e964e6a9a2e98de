"""Where the two cores go while relayd accepts alone, a new connection per message.
Prints the figures; asserts nothing.

    python3 bench/cores.py [--runs 3] [--messages 3000] [--sessions 20] [--base /mnt/spool]

Postfix's smtp-source (``--sessions`` sessions, 2 KiB, a new connection per message)
against relayd, whose upstream nobody answers (nothing is delivered). For each run:

* the rate, and the CPU per message (user + system, from /proc) of relayd's event
  loop thread, of its spool writer processes, and of smtp-source (its rusage);
* the CPU per message of the kernel's own threads (children of kthreadd: writeback,
  the journal, the loop device, ksoftirqd) and of softirq work (/proc/stat), and the
  whole machine's busy time per message, which includes both;
* the spool file system's journal commits per message (/proc/fs/jbd2, ext4 only);
* from the event loop thread's /proc/PID/task/TID/schedstat (the kernel's
  Documentation/scheduler/sched-stats.rst: time on a core, time runnable and waiting
  for one), the share of the run's wall time it ran and the share it waited for a
  core. When the two come close to 100 %, the loop is never idle: what limits the rate
  is the CPU the loop gets, that is its own work per message and what the rest of the
  machine takes from the two cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import postfix
from bench.listener import SMALL, smtp_source
from bench.measure import cpu_seconds, descendants, filesystem_of, machine
from tests.helpers import RelayProcess, unreachable_upstream, write_config

_TICK = os.sysconf("SC_CLK_TCK")  # the unit of /proc's CPU times


@dataclass(frozen=True)
class Reading:
    """What the counters said at one moment (seconds)."""

    loop_user: float
    loop_system: float
    loop_ran: float
    loop_waited: float
    writers: float
    kernel_threads: float
    softirq: float
    machine_busy: float
    journal_commits: int


def _thread_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the thread whose id is ``pid`` (the main thread)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _schedstat(pid: int) -> tuple[float, float]:
    """Seconds the main thread ran on a core and waited, runnable, for one."""
    ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(ran) / 1e9, int(waited) / 1e9


def _machine() -> tuple[float, float]:
    """Seconds the machine's cores were busy since boot (all but idle and iowait), and
    the part of it that went to softirq work."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / _TICK, values[6] / _TICK


def _kernel_threads() -> float:
    """CPU seconds of the kernel's threads alive now (kthreadd's children; a kworker
    that ends during a run takes its share with it)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if fields[1] == "2":
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def read(pid: int, writers: list[int], journal: Path | None) -> Reading:
    user, system = _thread_times(pid)
    ran, waited = _schedstat(pid)
    writer_seconds = sum(cpu_seconds(writer) for writer in writers)
    busy, softirq = _machine()
    commits = int(journal.read_text().split()[0]) if journal is not None else 0
    return Reading(
        user, system, ran, waited, writer_seconds, _kernel_threads(), softirq, busy, commits
    )


def one_run(relay: RelayProcess, args: argparse.Namespace, journal: Path | None) -> str:
    assert relay.process is not None
    pid = relay.process.pid
    writers = descendants(pid)
    before = read(pid, writers, journal)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = smtp_source(relay.port, args.sessions, args.messages, SMALL, reuse=False)
    after = read(pid, writers, journal)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    source = (children_after.ru_utime - children.ru_utime) + (
        children_after.ru_stime - children.ru_stime
    )

    def per_message(seconds: float) -> str:
        return f"{seconds * 1000 / args.messages:.2f}"

    commits = (
        ""
        if journal is None
        else f"{(after.journal_commits - before.journal_commits) / args.messages:.2f}"
    )

    return (
        f"| {args.messages / wall:,.0f} msg/s"
        f" | {per_message(after.loop_user - before.loop_user)}"
        f" / {per_message(after.loop_system - before.loop_system)}"
        f" | {per_message(after.writers - before.writers)}"
        f" | {per_message(source)}"
        f" | {per_message(after.kernel_threads - before.kernel_threads)}"
        f" / {per_message(after.softirq - before.softirq)}"
        f" | {per_message(after.machine_busy - before.machine_busy)}"
        f" | {commits}"
        f" | {100 * (after.loop_ran - before.loop_ran) / wall:.0f} %"
        f" | {100 * (after.loop_waited - before.loop_waited) / wall:.0f} % |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3000, help="per smtp-source run")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"), help="where spools go")
    args = parser.parse_args()
    if postfix.SMTP_SOURCE is None:
        raise SystemExit("bench: smtp-source is needed (Debian's postfix package)")
    print(machine(args.base) + "\n")
    command = f"python3 bench/cores.py --runs {args.runs} --messages {args.messages}"
    print(f"`{command} --sessions {args.sessions} --base {args.base}`\n")
    print(
        "| rate | event loop CPU ms/msg (user / system) | spool writers ms/msg"
        " | smtp-source ms/msg | kernel threads / softirq ms/msg | machine busy ms/msg"
        " | journal commits per msg | loop on a core | loop waiting for one |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    journal = filesystem_of(args.base).journal_stats
    with tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp:
        base = Path(tmp)
        with RelayProcess(write_config(base, unreachable_upstream(base))) as relay:
            smtp_source(relay.port, args.sessions, 300, SMALL, reuse=False)  # warm up, untimed
            for _ in range(args.runs):
                print(one_run(relay, args, journal), flush=True)


if __name__ == "__main__":
    main()

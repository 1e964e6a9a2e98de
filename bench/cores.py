"""Where the two cores go while relayd accepts alone, a new connection per message.
Prints the figures; asserts nothing.

    python3 bench/cores.py [--runs 3] [--messages 3000] [--sessions 20] [--base /mnt/spool]

Postfix's smtp-source (``--sessions`` sessions, 2 KiB, a new connection per message)
against relayd, whose upstream nobody answers (nothing is delivered). For each run:

* the rate, and the CPU per message (user + system, from /proc) of relayd's event
  loop thread, of its spool writer processes, and of smtp-source (its rusage);
* the whole machine's busy time per message (/proc/stat), which includes what the
  kernel's own threads did (journal commits, the loop device, network work);
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
from bench.measure import cpu_seconds, descendants, machine
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
    machine_busy: float


def _thread_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the thread whose id is ``pid`` (the main thread)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _schedstat(pid: int) -> tuple[float, float]:
    """Seconds the main thread ran on a core and waited, runnable, for one."""
    ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(ran) / 1e9, int(waited) / 1e9


def _machine_busy() -> float:
    """Seconds the machine's cores were busy since boot (all but idle and iowait)."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / _TICK


def read(pid: int, writers: list[int]) -> Reading:
    user, system = _thread_times(pid)
    ran, waited = _schedstat(pid)
    writer_seconds = sum(cpu_seconds(writer) for writer in writers)
    return Reading(user, system, ran, waited, writer_seconds, _machine_busy())


def one_run(relay: RelayProcess, args: argparse.Namespace) -> str:
    assert relay.process is not None
    pid = relay.process.pid
    writers = descendants(pid)
    before, children = read(pid, writers), resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = smtp_source(relay.port, args.sessions, args.messages, SMALL, reuse=False)
    after, children_after = read(pid, writers), resource.getrusage(resource.RUSAGE_CHILDREN)
    source = (children_after.ru_utime - children.ru_utime) + (
        children_after.ru_stime - children.ru_stime
    )

    def per_message(seconds: float) -> str:
        return f"{seconds * 1000 / args.messages:.2f}"

    return (
        f"| {args.messages / wall:,.0f} msg/s"
        f" | {per_message(after.loop_user - before.loop_user)}"
        f" / {per_message(after.loop_system - before.loop_system)}"
        f" | {per_message(after.writers - before.writers)}"
        f" | {per_message(source)}"
        f" | {per_message(after.machine_busy - before.machine_busy)}"
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
        " | smtp-source ms/msg | machine busy ms/msg | loop on a core | loop waiting for one |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp:
        base = Path(tmp)
        with RelayProcess(write_config(base, unreachable_upstream(base))) as relay:
            smtp_source(relay.port, args.sessions, 300, SMALL, reuse=False)  # warm up, untimed
            for _ in range(args.runs):
                print(one_run(relay, args), flush=True)


if __name__ == "__main__":
    main()

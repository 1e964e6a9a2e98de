"""Where the two cores go while relayd accepts alone, a new connection per message.
Prints the figures; asserts nothing.

    python3 bench/cores.py [--runs 3] [--messages 3000] [--sessions 20] [--with-postfix]
                           [--base /mnt/spool]

Postfix's smtp-source (``--sessions`` sessions, 2 KiB, a new connection per message)
against relayd, whose upstream nobody answers (nothing is delivered); with
``--with-postfix``, also against a private Postfix that keeps its mail queued
(bench/postfix.py, holding), the two alternated, so that the machine's figures of both
relays come from the same minutes. For each run:

* the rate, and the CPU per message (user + system, from /proc) of relayd's event
  loop thread, of its spool writer processes (relayd's rows only), and of smtp-source
  (its rusage);
* the CPU per message of the kernel's own threads (children of kthreadd), the
  journal's (jbd2) apart from the others (kworkers: a loop device's I/O, writeback,
  ext4's extent conversions; ksoftirqd), and of softirq work (/proc/stat), and the
  whole machine's busy time per message, which includes them all;
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
import contextlib
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import postfix
from bench.listener import SMALL, smtp_source
from bench.measure import (
    TICK,
    cpu_seconds,
    descendants,
    every_stat,
    filesystem_of,
    machine,
    stat_of,
    user_system_seconds,
)
from tests.helpers import RelayProcess, unreachable_upstream, write_config


@dataclass(frozen=True)
class Reading:
    """What the counters said at one moment (seconds)."""

    loop_user: float
    loop_system: float
    loop_ran: float
    loop_waited: float
    writers: float
    journal_threads: float
    other_kernel_threads: float
    softirq: float
    machine_busy: float
    journal_commits: int


def _thread_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the thread whose id is ``pid`` (the main thread)."""
    _, fields = stat_of(f"/proc/{pid}/task/{pid}/stat")
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _schedstat(pid: int) -> tuple[float, float]:
    """Seconds the main thread ran on a core and waited, runnable, for one."""
    ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(ran) / 1e9, int(waited) / 1e9


def _machine() -> tuple[float, float]:
    """Seconds the machine's cores were busy since boot (all but idle and iowait), and
    the part of it that went to softirq work."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK, values[6] / TICK


def _kernel_threads() -> tuple[float, float]:
    """CPU seconds of the kernel's threads alive now (kthreadd's children; a kworker
    that ends during a run takes its share with it): the journal threads' (jbd2/DEV),
    and all the others'."""
    journal = other = 0.0
    for name, fields in every_stat():
        if fields[1] != "2":
            continue
        seconds = user_system_seconds(fields)
        if name.startswith("jbd2/"):
            journal += seconds
        else:
            other += seconds
    return journal, other


@dataclass(frozen=True)
class Server:
    """What smtp-source sends to: relayd (its main thread's and writers' counters are
    read) or Postfix (``pid`` None: its many processes are in the machine's figures)."""

    name: str
    port: int
    pid: int | None = None
    writers: tuple[int, ...] = ()


def read(server: Server, journal: Path | None) -> Reading:
    user = system = ran = waited = 0.0
    if server.pid is not None:
        user, system = _thread_times(server.pid)
        ran, waited = _schedstat(server.pid)
    writer_seconds = sum(cpu_seconds(writer) for writer in server.writers)
    busy, softirq = _machine()
    commits = int(journal.read_text().split()[0]) if journal is not None else 0
    return Reading(
        user, system, ran, waited, writer_seconds, *_kernel_threads(), softirq, busy, commits
    )


def one_run(server: Server, args: argparse.Namespace, journal: Path | None) -> str:
    """One smtp-source run against ``server``, as a table row."""
    before = read(server, journal)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = smtp_source(server.port, args.sessions, args.messages, SMALL, reuse=False)
    after = read(server, journal)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    source = (children_after.ru_utime - children.ru_utime) + (
        children_after.ru_stime - children.ru_stime
    )
    return _row(server, args.messages, wall, source, before, after, journal is not None)


def _row(
    server: Server,
    messages: int,
    wall: float,
    source: float,
    before: Reading,
    after: Reading,
    journaled: bool,
) -> str:
    def per_message(field: str) -> str:
        return f"{(getattr(after, field) - getattr(before, field)) * 1000 / messages:.2f}"

    def share(field: str) -> str:
        return f"{100 * (getattr(after, field) - getattr(before, field)) / wall:.0f} %"

    commits = (after.journal_commits - before.journal_commits) / messages
    relayd_only = [
        f"{per_message('loop_user')} / {per_message('loop_system')}",
        per_message("writers"),
    ]
    loop_shares = [share("loop_ran"), share("loop_waited")]
    if server.pid is None:  # Postfix: no event loop, no writers of relayd's
        relayd_only, loop_shares = ["", ""], ["", ""]
    cells = [
        server.name,
        f"{messages / wall:,.0f} msg/s",
        *relayd_only,
        f"{source * 1000 / messages:.2f}",
        f"{per_message('journal_threads')} / {per_message('other_kernel_threads')}"
        f" / {per_message('softirq')}",
        per_message("machine_busy"),
        f"{commits:.2f}" if journaled else "",
        *loop_shares,
    ]
    return "| " + " | ".join(cells) + " |"


def servers(stack: contextlib.ExitStack, root: Path, args: argparse.Namespace) -> list[Server]:
    """relayd, whose upstream nobody answers, and with ``--with-postfix`` a private
    Postfix that keeps its mail queued as relayd's stays; each warmed up."""
    base = root / "relayd"
    base.mkdir()
    relay = stack.enter_context(RelayProcess(write_config(base, unreachable_upstream(base))))
    assert relay.process is not None
    found = [Server("relayd", relay.port, relay.process.pid, tuple(descendants(relay.process.pid)))]
    if args.with_postfix:
        postfix.become_subreaper()
        sink = stack.enter_context(postfix.SmtpSink())
        local = stack.enter_context(postfix.LocalPostfix(root / "postfix", sink.port, holding=True))
        found.append(Server("Postfix", local.port))
    for server in found:
        smtp_source(server.port, args.sessions, 300, SMALL, reuse=False)  # warm up, untimed
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3000, help="per smtp-source run")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"), help="where spools go")
    parser.add_argument(
        "--with-postfix",
        action="store_true",
        help="the same runs against a private Postfix holding its mail, alternated",
    )
    args = parser.parse_args()
    if args.with_postfix and not postfix.available():
        raise SystemExit("bench: --with-postfix needs Debian's postfix package (bench/README.md)")
    if postfix.SMTP_SOURCE is None:
        raise SystemExit("bench: smtp-source is needed (Debian's postfix package)")
    print(machine(args.base) + "\n")
    command = f"python3 bench/cores.py --runs {args.runs} --messages {args.messages}"
    postfix_flag = " --with-postfix" if args.with_postfix else ""
    print(f"`{command} --sessions {args.sessions}{postfix_flag} --base {args.base}`\n")
    print(
        "| server | rate | event loop CPU ms/msg (user / system) | spool writers ms/msg"
        " | smtp-source ms/msg | kernel: journal / other threads / softirq ms/msg"
        " | machine busy ms/msg | journal commits per msg | loop on a core"
        " | loop waiting for one |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    journal = filesystem_of(args.base).journal_stats
    with (
        tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        root.chmod(0o755)  # Postfix's daemons look up their queue below it
        found = servers(stack, root, args)
        for run in range(args.runs):
            for server in found if run % 2 == 0 else found[::-1]:  # alternated
                print(one_run(server, args, journal), flush=True)


if __name__ == "__main__":
    main()

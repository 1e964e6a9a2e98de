"""What the benchmarks read from the machine: its description, and a process's memory
and CPU time (Linux /proc)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


@dataclass(frozen=True)
class Filesystem:
    mount_point: str
    type: str
    device: str

    @property
    def journal(self) -> str:
        """ext4 keeps its journal in a jbd2 thread per device; other types say nothing."""
        if self.type not in ("ext3", "ext4"):
            return ""
        return "journal" if self.journal_stats is not None else "no journal"

    @property
    def journal_stats(self) -> Path | None:
        """jbd2's statistics of this file system's journal (its first number counts the
        commits), if it has one."""
        name = Path(self.device).name
        for entry in _listdir("/proc/fs/jbd2"):
            if name and entry.startswith(f"{name}-"):
                return Path("/proc/fs/jbd2", entry, "info")
        return None

    def __str__(self) -> str:
        details = ", ".join(part for part in (self.device, self.journal) if part)
        return f"{self.type} ({details}) at {self.mount_point}"


def filesystem_of(path: Path) -> Filesystem:
    """The mount that holds ``path`` (the longest mount point that is a prefix of it)."""
    resolved = str(path.resolve())
    best = Filesystem("/", "unknown", "")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point = fields[4]
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best.mount_point):
            after = fields[fields.index("-") + 1 :]  # fstype, source, super options
            best = Filesystem(mount_point, after[0], after[1])
    return best


def machine(spool_base: Path) -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {cpu_model()}, Linux {platform.release()},"
        f" Python {platform.python_version()}; spools on {filesystem_of(spool_base)};"
        f" load average before the run {load}"
    )


def _proc_status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    return _proc_status(pid, "VmHWM")


TICK = os.sysconf("SC_CLK_TCK")  # the unit of /proc's CPU times


def stat_of(path: str) -> tuple[str, list[str]]:
    """A /proc/.../stat file: the command name, and the fields after it (proc(5):
    [0] the state, [1] the parent, [3] the session, [11] to [14] utime, stime, cutime
    and cstime in ticks). The name may hold spaces and parentheses: it ends at the last
    ")"."""
    text = Path(path).read_text()
    end = text.rindex(")")
    return text[text.index("(") + 1 : end], text[end + 1 :].split()


def user_system_seconds(fields: list[str]) -> float:
    """User + system CPU seconds from ``stat_of``'s fields (without reaped children's)."""
    return (int(fields[11]) + int(fields[12])) / TICK


def every_stat() -> Iterator[tuple[str, list[str]]]:
    """``stat_of`` of every live process (one that exits meanwhile is left out)."""
    for entry in _listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                yield stat_of(f"/proc/{entry}/stat")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    _, fields = stat_of(f"/proc/{pid}/stat")
    return user_system_seconds(fields)


def relay_cpu_seconds(pid: int) -> float:
    """CPU time of relayd's process and every live process below it (its spool writers,
    relayd.queue.writer; children of children too, as a listener process of its own
    would start the writers: bench/README.md), and what each has already waited for
    used (cutime + cstime)."""
    total = _with_waited_for(pid)
    for child in descendants(pid):
        with contextlib.suppress(OSError):  # it exited meanwhile
            total += _with_waited_for(child)
    return total


def _with_waited_for(pid: int) -> float:
    """A process's CPU time and its reaped children's (utime, stime, cutime, cstime):
    a reaped child is no longer below it, so nothing is counted twice."""
    _, fields = stat_of(f"/proc/{pid}/stat")
    return sum(int(value) for value in fields[11:15]) / TICK


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``: its children, theirs, and so on."""
    found, waiting = [], children(pid)
    while waiting:
        child = waiting.pop()
        found.append(child)
        waiting += children(child)
    return found


def children(pid: int) -> list[int]:
    """The live child processes of any thread of ``pid`` (relayd starts its spool
    writers from the event loop's thread pool)."""
    found = []
    for tid in _listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            found += [
                int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            ]
    return found


def children_rss_mib(pid: int) -> float:
    """The resident memory of every process below ``pid`` now (VmRSS), together."""
    return sum(_proc_status(child, "VmRSS") for child in descendants(pid))


def session_cpu_seconds(session: int) -> float:
    """CPU time of every process in a session (Postfix's master and all its daemons),
    with what the daemons that already exited used (their parent's cutime + cstime)."""
    # One that exits meanwhile is left out: its parent's cutime has it now.
    total = sum(
        sum(int(value) for value in fields[11:15])
        for _, fields in every_stat()
        if int(fields[3]) == session
    )
    return total / TICK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time of each live thread of a process (/proc/PID/task); the thread whose id
    is the pid is the main thread (relayd's event loop)."""
    per_thread: dict[int, float] = {}
    for tid in _listdir(f"/proc/{pid}/task"):
        try:
            _, fields = stat_of(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        per_thread[int(tid)] = user_system_seconds(fields)
    return per_thread


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def spread(directory: Path) -> None:
    """Ask ext4 to put each new subdirectory of ``directory`` on its own block group
    (chattr +T; not inherited by the subdirectories). On ext4 without a journal,
    creating a file skips the inodes freed in the last minutes one by one, so a spool
    next to one where many files were deleted gets slow creates (bench/run.py's
    docstring); every relay's spool starts on a fresh block group alike."""
    if shutil.which("chattr"):
        subprocess.run(["chattr", "+T", str(directory)], capture_output=True, check=False)


def from_checkout(tree: Path) -> dict:
    """RelayProcess's ``env`` and ``cwd`` that run relayd from the checkout at ``tree``.

    ``python -m relayd`` puts its working directory first on sys.path, ahead of
    PYTHONPATH: with PYTHONPATH alone, every "tree" of an A/B would run the checkout
    the benchmark was started from. This asks the same interpreter, with the same
    settings, which relayd it imports, and stops the run if it is not ``tree``'s."""
    tree = tree.resolve()
    settings = {"env": {"PYTHONPATH": str(tree)}, "cwd": tree}
    found = subprocess.run(
        [sys.executable, "-c", "import relayd; print(relayd.__file__)"],
        env={**os.environ, **settings["env"]},
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree):
        raise SystemExit(f"bench: relayd from {tree} would run {found}")
    return settings

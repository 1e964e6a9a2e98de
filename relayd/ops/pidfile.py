"""The daemon's pid file: one daemon per spool, and how `relayd queue` finds it.

The daemon holds an exclusive ``flock`` on ``<spool>/relayd.pid`` for as long as it
runs. That lock, not the file's existence, says whether a daemon is alive: the kernel
drops it when the process dies, however it dies, so a pid file left behind by a crash
(or a pid the kernel has since given to another program) is never mistaken for a live
daemon. Two daemons on one spool would move each other's messages (start-up recovery
puts active/ back into the queue), so the second one refuses to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from pathlib import Path

from relayd.ops.files import NOFOLLOW

PID_FILE_NAME = "relayd.pid"


class AlreadyRunning(Exception):
    """Another live daemon holds the pid file's lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path}: another relayd ({who}) is already using this spool")
        self.path, self.pid = path, pid


class PidFile:
    """Held by the running daemon; released (and removed) at a clean stop."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Lock and write our pid. Raises AlreadyRunning when another daemon holds it."""
        # O_NOFOLLOW: a symlink planted at the pid file's name is refused (ELOOP), never
        # followed to truncate and write whatever it points to.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self.path, read_pid(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the file, then drop the lock (only if this process holds it)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def read_pid(path: Path) -> int | None:
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running_daemon(path: Path) -> int | None:
    """The pid of the live daemon that owns this pid file, or None.

    A pid counts only if the file's lock is held (some daemon is alive) and
    /proc/<pid>/cmdline shows `relayd ... serve`: never signal an unrelated process
    that happens to have inherited a stale pid.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = read_pid(path)  # locked: a daemon is alive
    else:
        return None  # nobody holds the lock: the file is stale
    finally:
        os.close(fd)
    return pid if pid is not None and _is_relayd_daemon(pid) else None


def signal_daemon(path: Path, signum: int = signal.SIGUSR1) -> int | None:
    """Send ``signum`` to the running daemon; its pid, or None when none runs.

    Raises PermissionError when the daemon runs as a user we may not signal.
    """
    pid = running_daemon(path)
    if pid is None:
        return None
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return None
    return pid


def _is_relayd_daemon(pid: int) -> bool:
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"relayd" in argument for argument in arguments) and b"serve" in arguments

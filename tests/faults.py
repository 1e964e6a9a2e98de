"""Fault injection at every file-system call, after SQLite's I/O-error and crash tests and
ALICE (Pillai et al., "All File Systems Are Not Created Equal", OSDI 2014).

``Injector`` wraps the ``os`` functions (and ``fcntl.flock``) that relayd's file code
calls, for the files under the given roots only. One run of an operation records the
sequence of calls; then each call can in turn be made to fail (``Fault``: EIO, ENOSPC,
EDQUOT, EFBIG, or a short write) or be the last one before a crash: ``Crash``, a
BaseException raised right after the call, stops the operation there, and the test
throws away every object in memory and starts again from what is on disk.

What is on disk after a crash depends on what was synced. The injector keeps a model
of it: which directory entries (creations, renames, removals) and which file contents
have been made durable by fsync(2)/fdatasync(2) or O_DSYNC/O_SYNC writes. From it,
``crash_states()`` gives the states a crash may leave:

* ``process``: everything done so far survives (the process was killed, the kernel
  kept it all);
* ``power``: only what was synced survives (a power cut, the most pessimistic);
* ``power+k``: what was synced plus the first k operations not yet synced, in order
  (a journaling file system that writes metadata in order, as ext4 and XFS do).

File contents not synced are lost in the power states (a file created and renamed
without an fsync is empty after the power cut). Renames are atomic and become durable
when either directory is synced; a mkdir is taken as durable at once (relayd creates
its directories at start-up); timestamps are not modelled (a deferred message's next
attempt may come early after a crash, which no invariant depends on).

The real fsync is skipped and O_DSYNC taken off the real open (the model decides what
survives), so a matrix of a thousand runs takes seconds, not minutes.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYNC_FLAGS = getattr(os, "O_DSYNC", 0) | getattr(os, "O_SYNC", 0)
WRITES = ("write", "writev")
READS = ("read", "pread", "fstat", "stat", "lstat", "scandir", "listdir")
# What each call may fail with: every call EIO; calls that may allocate space or change
# the file system also ENOSPC and EDQUOT; writes also EFBIG (a file-size limit such as
# systemd's LimitFSIZE=) and short writes, alone or followed by ENOSPC on the next write.
WRITE_FAULTS = ("EIO", "ENOSPC", "EDQUOT", "EFBIG", "short", "short+ENOSPC")
CHANGE_FAULTS = ("EIO", "ENOSPC", "EDQUOT")
READ_FAULTS = ("EIO",)


class Crash(BaseException):
    """The machine stops right after the call: nothing after it runs."""


class ModelOutOfStep(AssertionError):
    """A file changed behind the injector's back (a call it does not wrap)."""


@dataclass(frozen=True)
class Call:
    """One recorded file-system call."""

    index: int
    name: str
    path: str  # relative to its root; for fd calls, the file the descriptor is for

    @property
    def faults(self) -> tuple[str, ...]:
        if self.name in WRITES:
            return WRITE_FAULTS
        if self.name in READS or (self.name == "open" and self.path.endswith(" (read)")):
            return READ_FAULTS
        return CHANGE_FAULTS

    def __str__(self) -> str:
        return f"#{self.index} {self.name}({self.path})"


@dataclass(frozen=True)
class Fault:
    """Fail call ``index`` with ``kind`` (an errno name or "short"), or crash after it."""

    index: int
    kind: str  # "EIO", "ENOSPC", "EDQUOT", "EFBIG", "short", "short+ENOSPC" or "crash"


@dataclass
class _Op:
    """A directory change not yet known to be durable."""

    kind: str  # link | rename | unlink
    paths: tuple[str, ...]
    key: int | None = None

    @property
    def directories(self) -> set[str]:
        return {os.path.dirname(path) for path in self.paths}


@dataclass
class Image:
    """A file tree as a crash leaves it: directories, and files by content."""

    directories: set[str] = field(default_factory=set)
    files: dict[str, bytes] = field(default_factory=dict)


class Injector:
    """Wraps os.* for files under ``roots``; see the module docstring."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [os.path.abspath(root) for root in roots]
        self.calls: list[Call] = []
        self._lock = threading.RLock()
        self._armed = False
        self._crashed = False  # after the crash point nothing runs (but close)
        self._fault: Fault | None = None
        self.fired: Call | None = None
        self._short_fds: set[int] = set()
        self._fds: dict[int, tuple[str, int | None, bool]] = {}  # fd → path, key, synced
        self._keys = itertools.count(1)
        self._live: dict[str, int] = {}  # path → key, as the real tree is now
        self._durable_files: dict[str, int] = {}
        self._durable_dirs: set[str] = set()
        self._content: dict[int, bytes] = {}  # key → durable content
        self._pending: list[_Op] = []
        self._real: dict[str, Callable[..., Any]] = {}

    # --- set-up ------------------------------------------------------------------------

    def install(self, monkeypatch: Any) -> Injector:
        for name in (
            "open", "read", "pread", "write", "writev", "fsync", "fdatasync", "close",
            "fstat", "rename", "replace", "unlink", "remove", "rmdir", "utime", "mkdir",
            "stat", "lstat", "scandir", "listdir", "chmod", "chown", "ftruncate",
        ):  # fmt: skip
            self._real[name] = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrapper(name))
        self._real["flock"] = fcntl.flock
        monkeypatch.setattr(fcntl, "flock", self._wrapper("flock"))
        return self

    def arm(self, fault: Fault | None = None) -> None:
        """Start recording (and injecting ``fault``); the tree as it is now is durable."""
        with self._lock:
            self.calls, self._fault, self.fired = [], fault, None
            self._crashed = False
            self._short_fds.clear()
            self._snapshot()
            self._armed = True

    def disarm(self) -> None:
        with self._lock:
            self._armed = self._crashed = False

    def run(self, operation: Callable[[], Any], fault: Fault | None = None) -> Any:
        """Run ``operation`` armed; disarmed afterwards whatever happens."""
        self.arm(fault)
        try:
            return operation()
        finally:
            self.disarm()

    # --- crash states ---------------------------------------------------------------------

    def crash_states(self) -> list[tuple[str, Image]]:
        """The states a crash at this point may leave (call right after the Crash)."""
        with self._lock:
            self._check_model()
            states = [("process", self._real_image())]
            for count in range(len(self._pending) + 1):
                image = self._durable_image(self._pending[:count])
                if all(image != seen for _, seen in states):
                    states.append(("power" if count == 0 else f"power+{count}", image))
            return states

    def restore(self, image: Image) -> None:
        """Make the real tree what ``image`` says (disarmed: nothing is recorded)."""
        assert not self._armed
        for root in self.roots:
            shutil.rmtree(root, ignore_errors=True)
        for directory in sorted(image.directories, key=len):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        for path, content in image.files.items():
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(content)
            os.chmod(path, 0o600)

    # --- the wrappers ---------------------------------------------------------------------

    def _wrapper(self, name: str) -> Callable[..., Any]:
        real = self._real[name]
        method = getattr(self, f"_do_{name}", None)

        def call(*args: Any, **kwargs: Any) -> Any:
            target = self._target(name, args)
            if target is None:
                if name in ("fsync", "fdatasync"):
                    return None  # not ours, and never needed for real in the tests
                if name == "open" and len(args) > 1:
                    args = (args[0], args[1] & ~SYNC_FLAGS, *args[2:])
                return real(*args, **kwargs)
            with self._lock:
                return self._intercept(name, real, method, target, args, kwargs)

        call.__name__ = name
        return call

    def _intercept(self, name, real, method, target, args, kwargs) -> Any:
        if self._crashed:  # the machine is off: clean-up code after the crash never ran
            if name == "close":
                return self._do_close(real, args, kwargs)  # only to give the fd back
            raise Crash(f"{name} after the crash")
        if not self._armed:
            return (method or self._plain)(real, args, kwargs)
        record = Call(len(self.calls), name, self._describe(name, target, args))
        self.calls.append(record)
        fault = self._fault
        if name in WRITES and args and args[0] in self._short_fds and self.fired:
            self._short_fds.discard(args[0])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if fault is not None and fault.index == record.index and fault.kind != "crash":
            self.fired = record
            return self._fail(name, real, method, args, kwargs, fault.kind)
        try:
            return (method or self._plain)(real, args, kwargs)
        finally:
            if fault is not None and fault.index == record.index:
                self.fired = record
                self._armed, self._crashed = False, True
                raise Crash(str(record))

    def _fail(self, name, real, method, args, kwargs, kind: str) -> Any:
        if kind.startswith("short") and name in WRITES:
            data = b"".join(args[1]) if name == "writev" else bytes(args[1])
            half = max(1, len(data) // 2)
            if kind == "short+ENOSPC":
                self._short_fds.add(args[0])
            return self._do_write(real=self._real["write"], args=(args[0], data[:half]))
        code = getattr(errno, kind)
        if name == "close":  # close(2) releases the descriptor even when it fails
            self._do_close(real, args, kwargs)
        raise OSError(code, os.strerror(code))

    # --- what each call does to the model ---------------------------------------------

    @staticmethod
    def _plain(real, args, kwargs) -> Any:
        return real(*args, **kwargs)

    def _do_open(self, real, args, kwargs) -> int:
        path = self._abs(args[0])
        flags = args[1] if len(args) > 1 else kwargs.get("flags", os.O_RDONLY)
        existed = self._lstat(path) is not None
        fd = real(path, flags & ~SYNC_FLAGS, *args[2:], **kwargs)
        info = self._lstat(path)
        if info is not None and stat.S_ISDIR(info.st_mode):
            self._fds[fd] = (path, None, False)
            return fd
        if not existed:
            key = next(self._keys)
            self._live[path] = key
            self._content[key] = b""
            self._pending.append(_Op("link", (path,), key))
        key = self._live.get(path)
        if flags & os.O_TRUNC and key is not None and flags & SYNC_FLAGS:
            self._content[key] = b""
        self._fds[fd] = (path, key, bool(flags & SYNC_FLAGS))
        return fd

    def _do_write(self, real, args, kwargs=None) -> int:
        count = real(*args, **(kwargs or {}))
        _, key, synced = self._fds.get(args[0], ("", None, False))
        if synced and key is not None:
            self._content[key] = self._read_fd(args[0])
        return count

    _do_writev = _do_write

    def _do_fsync(self, real, args, kwargs) -> None:
        path, key, _ = self._fds[args[0]]
        if key is None:
            self._sync_directory(path)
        else:
            self._content[key] = self._read_fd(args[0])

    _do_fdatasync = _do_fsync

    def _do_close(self, real, args, kwargs) -> None:
        self._fds.pop(args[0], None)
        return real(*args, **kwargs)

    def _do_rename(self, real, args, kwargs) -> None:
        source, target = self._abs(args[0]), self._abs(args[1])
        result = real(*args, **kwargs)
        key = self._live.pop(source, None)
        if key is not None:
            self._live[target] = key
            self._pending.append(_Op("rename", (source, target), key))
        return result

    _do_replace = _do_rename

    def _do_unlink(self, real, args, kwargs) -> None:
        path = self._abs(args[0])
        result = real(*args, **kwargs)
        if self._live.pop(path, None) is not None:
            self._pending.append(_Op("unlink", (path,)))
        return result

    _do_remove = _do_unlink

    def _do_mkdir(self, real, args, kwargs) -> None:
        result = real(*args, **kwargs)
        path = self._abs(args[0])
        self._durable_dirs.add(path)
        return result

    def _do_rmdir(self, real, args, kwargs) -> None:
        result = real(*args, **kwargs)
        self._durable_dirs.discard(self._abs(args[0]))
        return result

    def _do_ftruncate(self, real, args, kwargs) -> None:
        return real(*args, **kwargs)  # data change: durable at the next fsync

    # --- the model ----------------------------------------------------------------------

    def _sync_directory(self, directory: str) -> None:
        """fsync(directory): its pending changes, and earlier ones on the same names
        (a file's creation before its rename), become durable, in order."""
        chosen: set[int] = set()
        names: set[str] = set()
        for index in range(len(self._pending) - 1, -1, -1):
            op = self._pending[index]
            if directory in op.directories or names.intersection(op.paths):
                chosen.add(index)
                names.update(op.paths)
        for index in sorted(chosen):
            self._apply(self._pending[index], self._durable_files)
        self._pending = [op for i, op in enumerate(self._pending) if i not in chosen]

    @staticmethod
    def _apply(op: _Op, files: dict[str, int]) -> None:
        if op.kind == "link":
            assert op.key is not None
            files[op.paths[0]] = op.key
        elif op.kind == "rename":
            assert op.key is not None
            files.pop(op.paths[0], None)
            files[op.paths[1]] = op.key
        else:
            files.pop(op.paths[0], None)

    def _durable_image(self, extra: list[_Op]) -> Image:
        files = dict(self._durable_files)
        for op in extra:
            self._apply(op, files)
        return Image(
            set(self._durable_dirs), {p: self._content.get(k, b"") for p, k in files.items()}
        )

    def _real_image(self) -> Image:
        image = Image()
        for root in self.roots:
            for directory, _, names in os.walk(root):
                image.directories.add(directory)
                for name in names:
                    path = os.path.join(directory, name)
                    with open(path, "rb") as handle:
                        image.files[path] = handle.read()
        return image

    def _snapshot(self) -> None:
        """Everything on disk now counts as durable (the set-up before the operation)."""
        self._live, self._durable_files, self._content, self._pending = {}, {}, {}, []
        image = self._real_image()
        self._durable_dirs = set(image.directories)
        for path, content in image.files.items():
            key = next(self._keys)
            self._live[path] = self._durable_files[path] = key
            self._content[key] = content
        for fd, (path, key, synced) in list(self._fds.items()):  # held across arm()
            self._fds[fd] = (path, None if key is None else self._live.get(path), synced)

    def _check_model(self) -> None:
        real = set(self._real_image().files)
        if real != set(self._live):
            raise ModelOutOfStep(
                f"files the model does not know: {sorted(real - set(self._live))}; "
                f"files it thinks exist: {sorted(set(self._live) - real)}"
            )

    # --- helpers ---------------------------------------------------------------------------

    def _lstat(self, path: str) -> os.stat_result | None:
        try:
            return self._real["lstat"](path)
        except OSError:
            return None

    def _read_fd(self, fd: int) -> bytes:
        with open(f"/proc/self/fd/{fd}", "rb") as handle:
            return handle.read()

    @staticmethod
    def _abs(path: Any) -> str:
        return os.path.abspath(os.fsdecode(os.fspath(path)))

    def _target(self, name: str, args: tuple) -> str | None:
        """The file a call is about, if it is under a root; None for everything else."""
        if not args:
            return None
        first = args[0]
        if isinstance(first, int):
            with self._lock:
                known = self._fds.get(first)
            return known[0] if known else None
        try:
            paths = [self._abs(first)]
            if name in ("rename", "replace") and len(args) > 1:
                paths.append(self._abs(args[1]))
        except TypeError:
            return None
        for path in paths:
            if any(path == root or path.startswith(root + os.sep) for root in self.roots):
                return paths[0]
        return None

    def _describe(self, name: str, target: str, args: tuple) -> str:
        text = self._relative(target)
        if name in ("rename", "replace"):
            text += " -> " + self._relative(self._abs(args[1]))
        if name == "open":
            flags = args[1] if len(args) > 1 else 0
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            text += "" if writes else " (read)"
        return text

    def _relative(self, path: str) -> str:
        for root in self.roots:
            if path == root or path.startswith(root + os.sep):
                return os.path.relpath(path, os.path.dirname(root))
        return path


def points(calls: list[Call]) -> Iterator[Fault]:
    """Every fault for every recorded call: each failure it can have, then a crash."""
    for call in calls:
        for kind in call.faults:
            yield Fault(call.index, kind)
        yield Fault(call.index, "crash")


@dataclass
class Tally:
    """What a matrix enumerated, ran and found."""

    points: int = 0  # calls recorded, over all scenarios
    ran: int = 0  # calls at which faults were injected (each must be, every one)
    runs: int = 0
    crash_states: int = 0
    found: list[str] = field(default_factory=list)

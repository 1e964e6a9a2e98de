"""File primitives for everything relayd keeps on disk (spool, Maildir, token cache).

Each one closes a way a file operation can go wrong quietly:

* ``write_all``: write(2) and writev(2) may write less than asked (a full disk, a quota,
  a file-size limit such as systemd's ``LimitFSIZE=``) and still succeed; the rest is
  written or an error raised, so a short file is never taken for a whole one.
* ``create_new``: ``O_CREAT | O_EXCL | O_NOFOLLOW``: a name that exists already,
  including a symlink planted there, is never opened or followed.
* ``open_regular``: ``O_NOFOLLOW | O_NONBLOCK`` and an fstat: a symlink, FIFO, device
  or directory under a queue file's name is refused at once (``NotRegular``) instead of
  being followed, or blocking the caller for ever (a FIFO's open waits for a writer).
* ``fsync_directory``: a new, renamed or removed name is durable only once its
  directory is synced.
* ``writable_by_others``: the check behind "refusing to start" on a directory that
  another user could plant files or links in.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC
READ_REGULAR = os.O_RDONLY | NOFOLLOW | NONBLOCK | CLOEXEC

Buffer = bytes | bytearray | memoryview


class NotRegular(OSError):
    """The name is a symlink, FIFO, socket, device or directory: not a file we wrote."""


def write_all(fd: int, buffers: Sequence[Buffer]) -> int:
    """Write every byte of ``buffers`` or raise OSError; returns the byte count.

    The usual case is one writev(2) that writes everything; only a partial write costs
    more calls. A write that makes no progress is ENOSPC: the kernel reports a full
    disk as a short write first and as the error on the next call.
    """
    total = sum(len(buffer) for buffer in buffers)
    written = os.writev(fd, buffers) if len(buffers) > 1 else os.write(fd, buffers[0])
    if written == total:
        return total
    remaining = memoryview(b"".join(buffers))[written:]
    while remaining:
        count = os.write(fd, remaining)
        if count <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        remaining = remaining[count:]
    return total


def create_new(path: str | Path, flags: int = 0, mode: int = 0o600) -> int:
    """Open a file that must not exist yet (never a planted file or symlink)."""
    return os.open(path, NEW_FILE | flags, mode)


def open_regular(path: str | Path, flags: int = READ_REGULAR) -> tuple[int, os.stat_result]:
    """Open an existing regular file without following a link or blocking on a FIFO:
    the descriptor and its fstat. Raises NotRegular for anything else."""
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise NotRegular(errno.ELOOP, "is a symbolic link", str(path)) from None
        if error.errno in (errno.ENXIO, errno.EISDIR):  # a socket, or a directory
            raise NotRegular(error.errno, "is not a regular file", str(path)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(errno.EINVAL, "is not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_all(fd: int, size: int) -> bytes:
    """Read ``size`` bytes (from fstat): one read(2) for a whole file; fewer bytes only
    if the file ends sooner (it was cut meanwhile)."""
    first = os.read(fd, size)
    if len(first) >= size:
        return first
    chunks = [first]
    while (got := sum(map(len, chunks))) < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_regular(path: str | Path) -> bytes:
    """The whole content of a regular file (see ``open_regular``)."""
    fd, info = open_regular(path)
    try:
        return read_all(fd, info.st_size)
    finally:
        os.close(fd)


def fsync_directory(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | DIRECTORY | CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writable_by_others(path: Path, fix: str = "chmod 700") -> str | None:
    """Why the directory ``path`` is unsafe (group or others may write in it), or None.

    Whoever may write in a directory may put a symlink or a FIFO where relayd will
    create or read a file, or replace a file it reads."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None
    if mode & 0o022:
        return f"{path} is writable by others (mode {mode:04o}); run: {fix} {path}"
    return None

"""The token cache file and the auth state file beside it.

Both hold secrets or facts about them, so both are written the same way: a private
temporary file (0600, created with O_EXCL | O_NOFOLLOW under a random name), every
byte written (a short write is an error), fsync, rename over the old one, fsync the
directory. A reader therefore sees the old file or the new one, never half of either.
A lock file beside the cache (``fcntl.flock``) serialises read-modify-write between the
daemon and ``relayd auth`` commands, so a sign-in and a refresh can never overwrite
each other's rotated refresh token; it is never opened through a symlink.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.ops.files import CLOEXEC, NOFOLLOW, fsync_directory, writable_by_others, write_all

PRIVATE_MODE = 0o600


class CacheStorageError(OSError):
    """The token cache file (or its lock) could not be used: a local disk problem, never
    Entra ID's. ``str()`` names the file and the system's reason, never a token."""


@dataclass(frozen=True)
class FileStamp:
    """Enough of stat() to notice that another process replaced the file."""

    inode: int
    mtime_ns: int
    size: int


def file_stamp(path: Path) -> FileStamp | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return FileStamp(info.st_ino, info.st_mtime_ns, info.st_size)


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600, durable on return."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp: O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600, a name nobody could guess.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        try:
            write_all(descriptor, [data])
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        _give_to_directory_owner(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


def _give_to_directory_owner(path: Path) -> None:
    """`relayd auth login` is often run as root while the daemon runs as its own user:
    a file root creates in the daemon's directory must stay readable by the daemon."""
    if os.geteuid() != 0:
        return
    owner = path.parent.stat()
    if owner.st_uid != 0 or owner.st_gid != 0:
        os.chown(path, owner.st_uid, owner.st_gid)


def exposure(path: Path) -> str | None:
    """Why ``path`` is too open (group or others may access it), or None when private."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
    if mode & 0o077:
        return f"{path} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}"
    return None


def _open_lock_file(path: Path) -> int:
    """The lock file, never through a symlink: opened if it is there, else created
    with O_EXCL (a name planted between the two attempts is refused, not followed)."""
    flags = os.O_RDWR | NOFOLLOW | CLOEXEC
    for _ in range(3):
        try:
            descriptor = os.open(path, flags)
        except FileNotFoundError:
            try:
                descriptor = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
            except FileExistsError:
                continue  # another process created it just now: open that one
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OSError(f"{path} is not a regular file; remove it")
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor
    raise OSError(f"cannot open the lock file {path}")


class TokenStore:
    """Paths and file operations for one token cache; holds no tokens itself."""

    def __init__(self, cache_path: Path) -> None:
        self.cache_path = cache_path
        self.lock_path = cache_path.with_name(cache_path.name + ".lock")
        self.state_path = cache_path.with_name(cache_path.name + ".state.json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive cross-process lock for a read-modify-write of the cache (blocking)."""
        try:
            self.cache_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = _open_lock_file(self.lock_path)
        except OSError as error:
            raise _storage_error("cannot open the lock file", self.lock_path, error) from None
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            except OSError as error:
                raise _storage_error("cannot lock", self.lock_path, error) from None
            yield
        finally:
            # Closing releases the lock, even when close(2) reports an error: nothing
            # was written through this descriptor, so there is nothing to lose.
            with contextlib.suppress(OSError):
                os.close(descriptor)

    def stamp(self) -> FileStamp | None:
        try:
            return file_stamp(self.cache_path)
        except OSError as error:
            raise _storage_error("cannot stat", self.cache_path, error) from None

    def directory_exposure(self) -> str | None:
        """Why the cache's directory is unsafe (others may write in it), or None."""
        return writable_by_others(self.cache_path.parent)

    def read_cache(self) -> tuple[str | None, FileStamp | None]:
        """The serialized cache (None when nobody has signed in) and its stamp."""
        try:
            with open(self.cache_path, encoding="utf-8") as handle:
                stamp = os.fstat(handle.fileno())
                return handle.read(), FileStamp(stamp.st_ino, stamp.st_mtime_ns, stamp.st_size)
        except FileNotFoundError:
            return None, None
        except OSError as error:
            raise _storage_error("cannot read", self.cache_path, error) from None

    def write_cache(self, text: str) -> FileStamp | None:
        try:
            write_private(self.cache_path, text.encode("utf-8"))
        except OSError as error:
            raise _storage_error("cannot write", self.cache_path, error) from None
        return self.stamp()

    def read_state(self) -> dict[str, Any] | None:
        """What the daemon last recorded, or None (never ran, or the file is damaged)."""
        try:
            document = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def write_state(self, document: dict[str, Any]) -> None:
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        write_private(self.state_path, text.encode("utf-8"))


def _storage_error(doing: str, path: Path, error: OSError) -> CacheStorageError:
    reason = error.strerror or str(error)
    return CacheStorageError(error.errno or 0, f"{doing} {path}: {reason}")


def stamp_to_json(stamp: FileStamp | None) -> list[int] | None:
    return [stamp.inode, stamp.mtime_ns, stamp.size] if stamp else None

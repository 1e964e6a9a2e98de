"""Writing a batch of new queue files durably: each written and synced under tmp/,
renamed into incoming/, and incoming/ fsynced once for the whole batch.

The same code runs in the listener's process (``FileWriter`` in a commit thread) and in
the writer process of ``relayd.queue.writer``, which runs it away from the event loop's
GIL.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from relayd.ops.files import CLOEXEC, NOFOLLOW, Buffer, fsync_directory, write_all
from relayd.queue.model import SpoolError

# Threads that write and sync one batch's files in parallel: the calling thread and a
# pool of the others.
WRITERS = 8
# Queue files are opened with O_DSYNC: the write returns only when the content and the
# metadata needed to read it back (size, blocks) are on disk, fdatasync(2)'s guarantee,
# in the same system call: one call and one GIL hand-over fewer per message than write +
# fsync (bench/README.md). Where the flag does not exist, the file is fsynced after.
_SYNCED_WRITES = getattr(os, "O_DSYNC", 0)
# O_EXCL | O_NOFOLLOW: a name already there (a planted file or symlink) is an error.
_NEW_QUEUE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC | _SYNCED_WRITES
WRITE_GROUP = 256 * 1024


@dataclass(frozen=True)
class QueueFile:
    """One new queue file: its name (the queue id) and its bytes, in parts."""

    queue_id: str
    parts: tuple[Buffer, ...]

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)


class FileWriter:
    """Writes batches of queue files into the spool at ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        # Plain strings: this runs for every message, and a pathlib join costs
        # microseconds each time.
        self._tmp_dir = os.path.join(directory, "tmp")
        self._incoming_dir = os.path.join(directory, "incoming")
        self._pool = ThreadPoolExecutor(WRITERS - 1, thread_name_prefix="spool-fsync")

    def write(self, files: Sequence[QueueFile]) -> list[int | SpoolError]:
        """Each file's size once it is durably in incoming/, or the error that kept it
        out (nothing of it is left behind then). One file's trouble stays with it: the
        others come from other clients, whose messages are fine.

        The files are written in parallel (so their syncs share the disk's flushes), in
        one slice per thread, not one task per file: each task costs Python work under
        the GIL. This thread writes the first slice itself, so a batch of one (a single
        client) takes no extra thread hop."""
        per_thread = -(-len(files) // WRITERS)  # ceiling division
        slices = [files[start : start + per_thread] for start in range(0, len(files), per_thread)]
        others = [self._pool.submit(self._write_slice, part) for part in slices[1:]]
        parts = [self._write_slice(slices[0]), *(future.result() for future in others)]
        written = [size for part in parts for size in part]
        for index, (queue_file, outcome) in enumerate(zip(files, written, strict=True)):
            if isinstance(outcome, SpoolError):
                continue
            try:
                os.rename(self._tmp(queue_file), self._incoming(queue_file))
            except OSError as error:
                with contextlib.suppress(OSError):  # never leave it behind in tmp/
                    os.unlink(self._tmp(queue_file))
                written[index] = SpoolError(f"cannot queue the file: {error.strerror}")
        try:
            fsync_directory(self._incoming_dir)
        except OSError as error:
            # The renames may not be durable: un-queue them so that nothing that will
            # get a 451 is delivered as well (the client will send it again).
            self.unqueue(files)
            failure = SpoolError(f"cannot sync the spool directory: {error.strerror}")
            return [failure for _ in files]
        return written

    def unqueue(self, files: Sequence[QueueFile]) -> None:
        """Remove whatever of ``files`` is in tmp/ or incoming/: they get a 451."""
        unqueue(self._tmp_dir, self._incoming_dir, files)

    def _tmp(self, queue_file: QueueFile) -> str:
        return os.path.join(self._tmp_dir, queue_file.queue_id)

    def _incoming(self, queue_file: QueueFile) -> str:
        return os.path.join(self._incoming_dir, queue_file.queue_id)

    def _write_slice(self, files: Sequence[QueueFile]) -> list[int | SpoolError]:
        return [self._write_tmp(queue_file) for queue_file in files]

    def _write_tmp(self, queue_file: QueueFile) -> int | SpoolError:
        """Write one file under tmp/ to disk: its size, or the error instead of raising
        it (this runs in a pool)."""
        path = self._tmp(queue_file)
        try:
            fd = os.open(path, _NEW_QUEUE_FILE, 0o600)
            try:
                # All of it or an error: a partial write (ENOSPC, EDQUOT, EFBIG from a
                # file-size limit) must never become a queued file and a 250.
                for group in _write_groups(queue_file.parts):
                    write_all(fd, group)
                if not _SYNCED_WRITES:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return SpoolError(f"cannot write queue file: {error.strerror}")
        return queue_file.size


def _write_groups(buffers: Sequence[Buffer]) -> list[list[Buffer]]:
    """The buffers in groups of about WRITE_GROUP bytes, one write each. With O_DSYNC a
    write returns when it is on the disk; a 30 MiB write in one call held the disk
    queue for its whole length, and the small messages committed meanwhile waited
    behind it (beside two 30 MiB senders, commits of small messages over 50 ms: 14 and
    73 with one write, 6 and 2 with 256 KiB writes; bench/README.md)."""
    groups: list[list[Buffer]] = [[]]
    size = 0
    for buffer in buffers:
        if size >= WRITE_GROUP:
            groups.append([])
            size = 0
        groups[-1].append(buffer)
        size += len(buffer)
    return groups


def unqueue(tmp_dir: str, incoming_dir: str, files: Sequence[QueueFile]) -> None:
    """Remove whatever of ``files`` is in ``tmp_dir`` or ``incoming_dir``."""
    for queue_file in files:
        for directory in (tmp_dir, incoming_dir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, queue_file.queue_id))

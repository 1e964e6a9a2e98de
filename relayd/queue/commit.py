"""The commit path: a message durably under incoming/ before the listener may answer 250.

Concurrent commits are grouped (``ThreadBatcher``): one thread writes and syncs a
batch of files under tmp/, renames each into incoming/ and fsyncs incoming/ once for
the whole batch. Free space is checked on the way in, without a statvfs per message.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from relayd.ops.files import CLOEXEC, NOFOLLOW, Buffer, fsync_directory, write_all
from relayd.queue.batch import ThreadBatcher
from relayd.queue.census import Counts
from relayd.queue.fileformat import encode_header
from relayd.queue.model import Envelope, SpoolError, SpoolFull

FREE_SPACE_TTL = 0.5
# Threads that write and sync one group commit's files in parallel: the commit thread
# and a pool of the others.
_WRITERS = 8
# Queue files are opened with O_DSYNC: the write returns only when the content and the
# metadata needed to read it back (size, blocks) are on disk, fdatasync(2)'s guarantee,
# in the same system call: one call and one GIL hand-over fewer per message than write +
# fsync (bench/README.md). Where the flag does not exist, the file is fsynced after.
_SYNCED_WRITES = getattr(os, "O_DSYNC", 0)
# O_EXCL | O_NOFOLLOW: a name already there (a planted file or symlink) is an error.
_NEW_QUEUE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC | _SYNCED_WRITES
# Messages over this size are committed in a lane of their own: writing 30 MiB takes
# a tenth of a second or more, and the small messages of a batch that shared it waited
# for it (p99 accept latency 416 ms beside two 30 MiB senders, bench/README.md).
BIG_MESSAGE = 1024 * 1024
WRITE_GROUP = 256 * 1024


@dataclass(frozen=True)
class _Job:
    queue_id: str
    envelope: Envelope
    content: tuple[bytes | memoryview, ...]  # the parts, written one after the other


class GroupCommit:
    """Writes new messages into the spool at ``directory``; counts them in ``counts``."""

    def __init__(self, directory: Path, min_free_space: int, counts: Counts) -> None:
        self.directory = Path(directory)
        self.min_free_space = min_free_space
        self._counts = counts
        # Concurrent commits share a thread hop and a directory fsync (_write_batch).
        self._committer = ThreadBatcher(self._write_batch, "spool-commit")
        self._big_committer = ThreadBatcher(self._write_batch, "spool-commit-big")
        self._free_lock = threading.Lock()  # both lanes subtract what they wrote
        self._fsync_pool = ThreadPoolExecutor(_WRITERS - 1, thread_name_prefix="spool-fsync")
        # The commit path runs for every message with the GIL held between system calls:
        # plain strings, because a pathlib join costs microseconds each time.
        self._tmp_dir = os.path.join(self.directory, "tmp")
        self._incoming_dir = os.path.join(self.directory, "incoming")
        self._free_bytes = 0
        self._free_checked_at = -FREE_SPACE_TTL

    def free_space(self) -> int:
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize

    def has_room_for(self, size: int = 0) -> bool:
        """Whether ``size`` more bytes leave at least min_free_space free.

        statvfs runs at most every FREE_SPACE_TTL seconds; bytes committed since are
        subtracted from the last reading, so a burst cannot overshoot the minimum.
        """
        now = time.monotonic()
        if now - self._free_checked_at > FREE_SPACE_TTL:
            self._free_bytes = self.free_space()
            self._free_checked_at = now
        return self._free_bytes - size >= self.min_free_space

    async def commit(
        self, queue_id: str, envelope: Envelope, content: bytes | Sequence[bytes | memoryview]
    ) -> None:
        """Store a message durably. When this returns, the listener may answer 250.

        ``content`` is the message, or its parts in order (a big message is read and
        checked in parts; they are written as they are, never joined).

        Concurrent commits are grouped: one thread writes and fsyncs a batch of files,
        renames them and fsyncs incoming/ once for the whole batch. Big messages have a
        lane of their own, so that no small message waits for one to be written.
        """
        parts = (content,) if isinstance(content, bytes | bytearray | memoryview) else content
        size = sum(len(part) for part in parts)
        if not self.has_room_for(size):
            raise SpoolFull("insufficient free space in the spool")
        lane = self._big_committer if size > BIG_MESSAGE else self._committer
        await lane.submit(_Job(queue_id, envelope, tuple(parts)))

    def _write_batch(self, jobs: list[_Job]) -> list[BaseException | None]:
        """Runs in the commit thread: write + fsync each file (the fsyncs in parallel, so
        they share the filesystem's journal commits), rename each, fsync the directory.

        The batch is cut into one slice per thread (not one task per file): each task
        costs Python work under the GIL that the event loop is waiting for. This thread
        writes the first slice itself, so a batch of one (a single client) takes no
        extra thread hop."""
        per_thread = -(-len(jobs) // _WRITERS)  # ceiling division
        slices = [jobs[start : start + per_thread] for start in range(0, len(jobs), per_thread)]
        others = [self._fsync_pool.submit(self._write_slice, part) for part in slices[1:]]
        parts = [self._write_slice(slices[0]), *(future.result() for future in others)]
        written = [size for part in parts for size in part]  # file size or error, in order
        results: list[BaseException | None] = []
        for job, outcome in zip(jobs, written, strict=True):
            if isinstance(outcome, SpoolError):
                results.append(outcome)
                continue
            try:
                os.rename(
                    os.path.join(self._tmp_dir, job.queue_id),
                    os.path.join(self._incoming_dir, job.queue_id),
                )
                results.append(None)
            except OSError as error:
                with contextlib.suppress(OSError):  # never leave it behind in tmp/
                    os.unlink(os.path.join(self._tmp_dir, job.queue_id))
                results.append(SpoolError(f"cannot queue the file: {error.strerror}"))
        try:
            fsync_directory(self._incoming_dir)
        except OSError as error:
            # The renames may not be durable: un-queue them so that nothing that will
            # get a 451 is delivered as well (the client will send it again).
            for job, result in zip(jobs, results, strict=True):
                if result is None:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self._incoming_dir, job.queue_id))
            failure = SpoolError(f"cannot sync the spool directory: {error.strerror}")
            return [failure for _ in jobs]
        for job, size, result in zip(jobs, written, results, strict=True):
            if result is None:
                with self._free_lock:
                    self._free_bytes -= size
                self._counts.count("incoming", +1, size, queue_id=job.queue_id)
        return results

    def _write_slice(self, jobs: list[_Job]) -> list[int | SpoolError]:
        return [self._write_tmp(job) for job in jobs]

    def _write_tmp(self, job: _Job) -> int | SpoolError:
        """Write one file under tmp/ to disk: its size (as take_census() counts it),
        or the error instead of raising it (this runs in a pool).

        Whatever goes wrong with one job stays with it: the others in the batch come
        from other clients, whose messages are fine."""
        try:
            header = encode_header(job.queue_id, job.envelope, job.content)
        except (ValueError, TypeError) as error:  # e.g. a lone surrogate in the HELO name
            return SpoolError(f"cannot encode the envelope: {error}")
        path = os.path.join(self._tmp_dir, job.queue_id)
        try:
            fd = os.open(path, _NEW_QUEUE_FILE, 0o600)
            try:
                # All of it or an error: a partial write (ENOSPC, EDQUOT, EFBIG from a
                # file-size limit) must never become a queued file and a 250.
                for group in _write_groups([header, *job.content]):
                    write_all(fd, group)
                if not _SYNCED_WRITES:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return SpoolError(f"cannot write queue file: {error.strerror}")
        return len(header) + sum(len(part) for part in job.content)


def _write_groups(buffers: list[Buffer]) -> list[list[Buffer]]:
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

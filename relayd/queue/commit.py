"""The commit path: a message durably under incoming/ before the listener may answer 250.

Concurrent commits are grouped in lanes (``relayd.queue.lanes``): each batch's files are
written and synced under tmp/, renamed into incoming/, and incoming/ is fsynced once for
the whole batch. In the daemon, small messages' lanes write through writer processes
of their own (``relayd.queue.writer``). Free space is checked on the way in, without a
statvfs per message.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from relayd.queue.census import Counts
from relayd.queue.fileformat import encode_header
from relayd.queue.lanes import CommitLane
from relayd.queue.model import Envelope, SpoolError, SpoolFull
from relayd.queue.writer_client import WriterClient
from relayd.queue.writing import QueueFile

FREE_SPACE_TTL = 0.5
# Messages over this size are committed in a lane of their own: writing 30 MiB takes
# a tenth of a second or more, and the small messages of a batch that shared it waited
# for it (p99 accept latency 416 ms beside two 30 MiB senders, bench/README.md).
BIG_MESSAGE = 1024 * 1024
# Lanes for the small messages: a message that arrives while one lane's batch is on its
# way to the disk starts a batch in another at once, instead of waiting for the first
# to finish (bench/README.md).
SMALL_LANES = 2


class GroupCommit:
    """Writes new messages into the spool at ``directory``; counts them in ``counts``.

    ``writer_process``: small messages are written by processes of their own, as the
    daemon does; else by this process's threads (the queue tools, the tests)."""

    def __init__(
        self, directory: Path, min_free_space: int, counts: Counts, *, writer_process: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.min_free_space = min_free_space
        self._counts = counts
        self._lanes = [
            CommitLane(
                self.directory,
                f"spool-commit-{number}",
                self._queued,
                writer=WriterClient(self.directory) if writer_process else None,
            )
            for number in range(SMALL_LANES)
        ]
        self._big_lane = CommitLane(self.directory, "spool-commit-big", self._queued)
        self._free_lock = threading.Lock()
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
        checked in parts; they are written as they are, never joined). A big message's
        header (its checksum) is computed in a thread, a small one's here.
        """
        parts = (content,) if isinstance(content, bytes | bytearray | memoryview) else content
        size = sum(len(part) for part in parts)
        if not self.has_room_for(size):
            raise SpoolFull("insufficient free space in the spool")
        big = size > BIG_MESSAGE
        try:
            if big:
                header = await asyncio.to_thread(encode_header, queue_id, envelope, parts)
            else:
                header = encode_header(queue_id, envelope, parts)
        except (ValueError, TypeError) as error:  # e.g. a lone surrogate in the HELO name
            raise SpoolError(f"cannot encode the envelope: {error}") from None
        lane = self._big_lane if big else min(self._lanes, key=lambda each: each.load)
        written = await lane.submit(QueueFile(queue_id, (header, *parts)))
        if isinstance(written, SpoolError):
            raise written

    def _queued(self, queue_file: QueueFile, size: int) -> None:
        with self._free_lock:
            self._free_bytes -= size
        self._counts.count("incoming", +1, size, queue_id=queue_file.queue_id)

    async def start(self) -> None:
        """Start the writer processes now, if there are to be any (else at first use)."""
        await asyncio.gather(*(lane.start() for lane in self._lanes))

    async def close(self) -> None:
        """Stop the writer processes (a later commit would start new ones)."""
        await asyncio.gather(*(lane.close() for lane in self._lanes))

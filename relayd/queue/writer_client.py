"""The daemon's side of the spool writer processes (``relayd.queue.writer``): starts
one, hands it batches on the event loop, and cleans up after it when it fails.

If a writer dies, stops answering or answers nonsense, it is killed, whatever of its
batch is in tmp/ or incoming/ is removed, and the caller writes the batch itself
(``relayd.queue.lanes``); a new writer is started RESTART_DELAY seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TypeVar

import relayd
from relayd.queue.model import SpoolError
from relayd.queue.writer import FRAME_LENGTH
from relayd.queue.writing import QueueFile, unqueue

# A reply is due within this many seconds: a healthy batch takes milliseconds, and a
# disk that stalls this long would keep the clients past their own DATA timeouts.
REPLY_TIMEOUT = 120.0
# A new writer has this long to start (a Python interpreter and a few modules).
START_TIMEOUT = 30.0
# After a failure, batches are written in the listener's process for this long before
# a new writer is started: a writer that cannot start does not cost every batch a try.
RESTART_DELAY = 10.0
# Where the relayd package is, for the writer's interpreter (relayd run from a source
# tree, without being installed, finds itself the same way).
_PACKAGE_ROOT = str(Path(relayd.__file__).resolve().parent.parent)


# How long a writer has to exit once its socket is closed, at shutdown.
STOP_TIMEOUT = 10.0
# What a writer that died, hung or sent nonsense looks like from here (a timeout is an
# OSError; a reply that is not JSON, a ValueError).
_FAILURES = (OSError, ValueError, subprocess.SubprocessError, asyncio.TimeoutError)
Outcome = TypeVar("Outcome")


class WriterFailed(Exception):
    """The writer died, stopped answering or could not start. Nothing of the batch it
    had is left in the spool: the caller may write the batch itself."""


class WriterClient:
    """The daemon's side of one writer process: starts it, hands it batches on the event
    loop (no thread, so no wait for the GIL on the way) and cleans up after it.

    One batch at a time: the commit lane that owns it waits for each reply."""

    def __init__(
        self, directory: Path, timeout: float = REPLY_TIMEOUT, restart_delay: float = RESTART_DELAY
    ) -> None:
        self.directory = Path(directory)
        self.timeout = timeout
        self.restart_delay = restart_delay
        self._lock = asyncio.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._failed_at = -restart_delay

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def available(self) -> bool:
        """Whether batches go to the writer now (not within restart_delay of a failure)."""
        return self._writer is not None or (
            time.monotonic() - self._failed_at >= self.restart_delay
        )

    async def start(self) -> None:
        """Start the writer now rather than at the first batch; WriterFailed if it
        cannot start."""
        async with self._lock:
            if self._writer is None:
                await self._guarded(self._start(), ())

    async def write(self, files: Sequence[QueueFile]) -> list[int | SpoolError]:
        """Each file's size once queued, or the error that kept it out; WriterFailed
        if the writer failed (then none of ``files`` is in the spool)."""
        async with self._lock:
            replies = await self._guarded(self._exchange(files), files)
        return [
            queue_file.size if reply is None else SpoolError(str(reply))
            for queue_file, reply in zip(files, replies, strict=True)
        ]

    async def close(self) -> None:
        async with self._lock:
            if self._writer is not None:
                self._writer.close()  # a healthy writer exits when it reads the end
                self._reader = self._writer = None
            if self._process is not None:
                process, self._process = self._process, None
                await asyncio.to_thread(_stop, process, STOP_TIMEOUT)

    async def _guarded(self, step: Awaitable[Outcome], files: Sequence[QueueFile]) -> Outcome:
        try:
            return await step
        except _FAILURES as error:
            process, self._process = self._process, None
            if self._writer is not None:
                self._writer.close()
            self._reader = self._writer = None
            self._failed_at = time.monotonic()
            # Killed first, so that it cannot rename anything after the clean-up.
            await asyncio.to_thread(self._kill_and_unqueue, process, files)
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise WriterFailed(reason) from None

    def _kill_and_unqueue(
        self, process: subprocess.Popen[bytes] | None, files: Sequence[QueueFile]
    ) -> None:
        if process is not None:
            _stop(process, 0)
        unqueue(
            os.path.join(self.directory, "tmp"), os.path.join(self.directory, "incoming"), files
        )

    async def _exchange(self, files: Sequence[QueueFile]) -> list[str | None]:
        if self._writer is None:
            await self._start()
        assert self._reader is not None and self._writer is not None
        listing = json.dumps([[f.queue_id, f.size] for f in files]).encode() + b"\n"
        body = [listing, *(part for queue_file in files for part in queue_file.parts)]
        length = sum(len(part) for part in body)
        # One copy of the batch (small files only: big ones never come here) and one
        # system call.
        self._writer.write(b"".join([FRAME_LENGTH.pack(length), *body]))
        replies = json.loads(await asyncio.wait_for(_read_frame(self._reader), self.timeout))
        if not isinstance(replies, list) or len(replies) != len(files):
            raise ValueError("the spool writer gave a reply that does not fit the batch")
        return replies

    async def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.to_thread(self._spawn, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        ready = await asyncio.wait_for(_read_frame(self._reader), START_TIMEOUT)
        if ready != b"ready":
            raise ValueError("the spool writer did not start")

    def _spawn(self, theirs: socket.socket) -> subprocess.Popen[bytes]:
        # -P: "-m" would put the working directory first on the module path, and a
        # relayd/ there (a checkout of another version, or a planted one) would be the
        # code that writes the spool. The writer's relayd is this one (PYTHONPATH).
        command = [sys.executable, "-P", "-m", "relayd.queue.writer", str(theirs.fileno())]
        command.append(str(self.directory))
        environment = dict(os.environ)
        path = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
        return subprocess.Popen(
            command, pass_fds=(theirs.fileno(),), env=environment, stdin=subprocess.DEVNULL
        )


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    """Wait ``grace`` seconds for the writer to exit by itself, then kill it."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
        return
    with contextlib.suppress(OSError):
        process.kill()
    process.wait()


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    try:
        (length,) = FRAME_LENGTH.unpack(await reader.readexactly(FRAME_LENGTH.size))
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionError("the spool writer closed its end") from None

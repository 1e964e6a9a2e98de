"""Commit lanes: new queue files, in batches, on their way to the disk.

A lane collects the files submitted while its last batch is being written and writes
them together, so that they share one directory fsync. It writes through a writer
process (``relayd.queue.writer``) when it has one, else in a thread of its own; a
writer that fails costs its batch nothing: the batch is written in the thread instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from relayd.queue.model import SpoolError
from relayd.queue.writer_client import WriterClient, WriterFailed
from relayd.queue.writing import FileWriter, QueueFile

log = structlog.get_logger("relayd.spool")

Written = int | SpoolError  # the file's size once queued, or why it is not


class CommitLane:
    """Writes batches of queue files into the spool at ``directory``.

    ``on_queued(queue_file, size)`` is called for each file queued, even when its
    submitter was cancelled meanwhile: work on disk is not undone, so it is counted."""

    def __init__(
        self,
        directory: Path,
        name: str,
        on_queued: Callable[[QueueFile, int], None],
        *,
        writer: WriterClient | None = None,
    ) -> None:
        self.name = name
        self.writer = writer
        self._on_queued = on_queued
        self._files = FileWriter(directory)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[tuple[QueueFile, asyncio.Future[Written]]] = []
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def load(self) -> int:
        """Files waiting for the next batch, plus one while a batch is being written."""
        return len(self._pending) + (self._drain_task is not None)

    async def submit(self, queue_file: QueueFile) -> Written:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Written] = loop.create_future()
        self._pending.append((queue_file, future))
        if self._drain_task is None:
            self._drain_task = loop.create_task(self._drain())
        return await future

    async def start(self) -> None:
        if self.writer is None:
            return
        try:
            await self.writer.start()
        except WriterFailed as error:
            self._warn("spool writer did not start; writing in the daemon's process", error)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._write([queue_file for queue_file, _ in batch])
                except asyncio.CancelledError:
                    raise
                except BaseException as error:  # never leave a submitter waiting
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (queue_file, future), result in zip(batch, results, strict=True):
                    if isinstance(result, int):
                        self._on_queued(queue_file, result)
                    if not future.done():
                        future.set_result(result)
        finally:
            self._drain_task = None

    async def _write(self, files: list[QueueFile]) -> list[Written]:
        writer = self.writer
        if writer is not None and writer.available():
            try:
                return await writer.write(files)
            except WriterFailed as error:
                # Nothing of the batch is in the spool: it is written here instead, and
                # its clients get their 250 as if nothing had happened.
                self._warn("spool writer failed; writing in the daemon's process", error)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._files.write, files)

    def _warn(self, event: str, error: WriterFailed) -> None:
        assert self.writer is not None
        log.warning(
            event, lane=self.name, error=str(error), retry_seconds=self.writer.restart_delay
        )

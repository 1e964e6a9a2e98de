"""Run blocking work in batches: one thread hop for many items.

Under load, the cost of handing each small file operation to a thread (queueing, waking
the thread, waking the event loop, contending for the GIL) exceeds the operation itself.
A ``ThreadBatcher`` collects the items submitted while its thread is busy and hands them
over together, so many messages share one hop, and the batch function can share costs
such as a directory fsync.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class ThreadBatcher(Generic[Item, Result]):
    """Feeds submitted items, in batches, to ``run_batch`` in one dedicated thread.

    ``run_batch(items)`` returns one entry per item: the result, or an exception
    instance for an item that failed (it is raised to that item's submitter only). An
    item whose submitter is cancelled is still processed: work on disk is not undone.
    """

    def __init__(
        self, run_batch: Callable[[list[Item]], list[Result | BaseException]], name: str
    ) -> None:
        self._run_batch = run_batch
        self._pending: list[tuple[Item, asyncio.Future]] = []
        self._drain_task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if self._drain_task is None:
            self._drain_task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                items = [item for item, _ in batch]
                try:
                    results = await loop.run_in_executor(self._thread, self._run_batch, items)
                except asyncio.CancelledError:
                    raise
                except BaseException as error:  # never leave a submitter waiting
                    results = [error] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._drain_task = None

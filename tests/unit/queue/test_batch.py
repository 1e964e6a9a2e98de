"""ThreadBatcher: many submissions share one thread hop; failures stay per item."""

from __future__ import annotations

import asyncio
import threading

import pytest

from relayd.queue.batch import ThreadBatcher


async def test_items_submitted_while_busy_form_one_batch() -> None:
    batches: list[list[int]] = []
    release = threading.Event()

    def run(items: list[int]) -> list[int]:
        batches.append(items)
        release.wait(5)  # the first batch holds the thread while others arrive
        return [item * 2 for item in items]

    batcher = ThreadBatcher(run, "test")
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.submit(n)) for n in range(1, 6)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [2, 4, 6, 8, 10]
    assert batches == [[0], [1, 2, 3, 4, 5]]


async def test_a_failed_item_raises_to_its_submitter_only() -> None:
    def run(items: list[int]) -> list[int | BaseException]:
        return [OSError("disk") if item == 2 else item for item in items]

    batcher = ThreadBatcher(run, "test")
    results = await asyncio.gather(*(batcher.submit(n) for n in range(4)), return_exceptions=True)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], OSError)


async def test_a_cancelled_submitter_does_not_undo_its_work() -> None:
    done: list[int] = []
    started = threading.Event()

    def run(items: list[int]) -> list[None]:
        started.set()
        threading.Event().wait(0.1)
        done.extend(items)
        return [None] * len(items)

    batcher = ThreadBatcher(run, "test")
    waiter = asyncio.ensure_future(batcher.submit(7))
    await asyncio.to_thread(started.wait, 5)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await batcher.submit(8)  # the next batch runs after the first finished
    assert done == [7, 8]


async def test_an_exception_from_the_batch_function_reaches_every_submitter() -> None:
    def run(items: list[int]) -> list[int]:
        raise RuntimeError("broken")

    batcher = ThreadBatcher(run, "test")
    results = await asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)

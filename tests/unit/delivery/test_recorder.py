"""Recording outcomes when the disk says no: the message is not left in active/ until a
restart; the outcome (and its DSN) is written as soon as the disk takes it again."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relayd.queue.model import SpoolError
from relayd.transports.base import LOCAL, Attempt, Blocked, Submission
from tests.harness import FAST_RETRY, Harness
from tests.helpers import eventually, load_settings

A, B = "a@example.org", "b@example.org"


class Upstream:
    """Takes a; the first time, defers (or refuses) b."""

    rate_limited = False
    concurrency = 1

    def __init__(self, first_b: str) -> None:
        self.first_b = first_b  # "defer" | "refuse"
        self.calls: list[tuple[str, ...]] = []

    def blocked(self) -> Blocked | None:
        return None

    async def wait_until_available(self) -> None:
        await asyncio.Event().wait()

    def reconfigure(self, settings: object) -> None:
        return None

    async def close(self) -> None:
        return None

    async def deliver(self, submission: Submission) -> Attempt:
        self.calls.append(submission.recipients)
        if len(self.calls) > 1 or B not in submission.recipients:
            return Attempt(delivered=submission.recipients, reply="250 2.0.0 Ok")
        others = tuple(r for r in submission.recipients if r != B)
        if self.first_b == "defer":
            return Attempt(delivered=others, deferred=(B,), reason=LOCAL, reply="451 4.3.0 later")
        return Attempt(delivered=others, failed=((B, "550 5.1.1 no such user"),), reply="550")

    def sent_to(self, recipient: str) -> int:
        return sum(recipient in call for call in self.calls)


class FullDisk:
    """While ``full``, renames into ``directory`` fail with ENOSPC (a full disk or a
    quota: writing the new delivery state is refused)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.full, self.refused, self.directory = True, 0, str(directory)
        self._replace = os.replace
        monkeypatch.setattr(os, "replace", self.replace)

    def replace(self, source, target, *args, **kwargs):
        if self.full and str(target).startswith(self.directory):
            self.refused += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._replace(source, target, *args, **kwargs)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[[Upstream], Harness]]:
    harnesses: list[Harness] = []

    def build(upstream: Upstream) -> Harness:
        harness = Harness(load_settings(tmp_path, {"retry": FAST_RETRY}), upstream)
        harnesses.append(harness)
        return harness

    yield build
    for harness in harnesses:
        await harness.stop()


async def test_an_outcome_the_disk_refused_is_recorded_once_the_disk_is_fine(
    make, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = Upstream("defer")
    h = make(upstream)
    disk = FullDisk(monkeypatch, h.spool.path("meta"))
    await h.scheduler.start()
    queue_id = await h.queue(recipients=(A, B))
    await eventually(lambda: disk.refused >= 2, message="the state write tried again")
    assert h.state_of(queue_id) == "active"  # owned by its delivery task meanwhile
    disk.full = False
    # Back in the normal flow within one retry interval (retry.min_delay, 0.1 s here):
    # deferred with a done, then b delivered.
    await eventually(lambda: h.settled(queue_id), timeout=FAST_RETRY_SECONDS + 2)
    assert upstream.sent_to(B) == 2
    assert upstream.sent_to(A) == 1  # what the first attempt achieved was kept


async def test_a_dsn_that_could_not_be_queued_is_queued_later_never_lost(
    make, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = Upstream("refuse")
    h = make(upstream)
    real_commit = h.spool.commit
    refused = []

    async def commit(queue_id, envelope, content):
        if not envelope.sender and len(refused) < 3:  # the DSN (null sender), 3 times
            refused.append(queue_id)
            raise SpoolError("cannot write queue file: No space left on device")
        await real_commit(queue_id, envelope, content)

    monkeypatch.setattr(h.spool, "commit", commit)
    await h.scheduler.start()
    queue_id = await h.queue(recipients=(A, B))
    await eventually(lambda: h.state_of(queue_id) == "failed" and h.scheduler.idle)
    assert len(refused) == 3
    dsns = [e for e in h.spool.entries() if e.queue_id not in (queue_id,)]
    sent = [call for call in upstream.calls if call == ("app@example.com",)]
    assert len(dsns) + len(sent) == 1  # one DSN, queued or already delivered


FAST_RETRY_SECONDS = 0.1

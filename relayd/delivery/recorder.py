"""Recording what became of an attempt: the spool move, the DSN, the metrics, one log line.

The decision itself is ``relayd.delivery.outcome.settle`` (pure); this applies it.
Spool moves go through one thread in batches (``Spool.apply``: each directory synced
once per batch), and a DSN is committed before the message leaves active/, so a crash
between the two repeats the DSN, never loses it.

When the outcome cannot be written (a full disk, EIO), the message stays in active/,
owned by its delivery task, and the same outcome is tried again: after 1 s, then
twice as long each time, never longer than ``retry.min_delay``. So once the disk is
fine, the message is back in the normal flow within one retry interval, with what
this attempt achieved (its recipients done stay done); no restart needed. A DSN that
could not be queued is tried again the same way, before the move.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from relayd.config import RetrySettings
from relayd.delivery import dsn
from relayd.delivery.outcome import (
    DEFERRED,
    DELIVERED,
    FAILED,
    HELD,
    RELEASED,
    Settlement,
    received_at,
    settle,
)
from relayd.ops.logging import PerMessageLogger
from relayd.ops.metrics import Metrics
from relayd.queue.batch import ThreadBatcher
from relayd.queue.model import QueuedMessage, SpoolError, new_queue_id
from relayd.queue.moves import Move
from relayd.queue.spool import Spool
from relayd.transports.base import Attempt

log = structlog.get_logger("relayd.scheduler")
per_message_log = PerMessageLogger("relayd.scheduler")

FIRST_RECORD_RETRY = 1.0  # seconds; doubles up to retry.min_delay
HOLD_PARKING = 86_400.0  # seconds; see _apply_batch()


class OutcomeRecorder:
    """Applies settled attempts to the spool and reports them."""

    def __init__(
        self, spool: Spool, metrics: Metrics, notify: Callable[[str], None], reporter: dsn.Reporter
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self.notify = notify  # a DSN was queued: the scheduler takes it like new mail
        self.reporter = reporter
        self._outcomes = ThreadBatcher(functools.partial(_apply_batch, spool), "spool-outcomes")
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Shutting down: outcomes still failing get one more try, then wait for the
        next start (recovery puts their messages back; this attempt is repeated)."""
        self._closing.set()

    async def record(
        self,
        message: QueuedMessage,
        attempt: Attempt,
        original: bytes,
        retry: RetrySettings,
        rng: random.Random,
    ) -> Settlement | None:
        """Settle and apply the attempt; the decision, or None when it could not be
        recorded before shutdown (the message then stays in active/ until the start)."""
        now = time.time()
        decision = settle(message, attempt, now, retry, rng)
        if not await self._store(message, decision, original, now, retry):
            return None
        self._report(message, attempt, decision, now)
        return decision

    async def _store(
        self,
        message: QueuedMessage,
        decision: Settlement,
        original: bytes,
        now: float,
        retry: RetrySettings,
    ) -> bool:
        """The DSN (if any), then the spool move; each tried again until it is on disk.
        False when shutdown came first."""
        dsn_queued = not decision.newly_failed or not message.envelope.sender
        longest = max(retry.min_delay, 0.05)
        delay, tries, final_try = min(FIRST_RECORD_RETRY, longest), 0, False
        while True:
            tries += 1
            if not dsn_queued:
                dsn_queued = await self._queue_dsn(message, decision.newly_failed, original, now)
            if dsn_queued and await self._move(message, decision, delay):
                if tries > 1:
                    log.info("delivery outcome recorded", queue_id=message.queue_id, tries=tries)
                return True
            if final_try:
                log.error(
                    "outcome not recorded; retried after a restart", queue_id=message.queue_id
                )
                return False
            if not self._closing.is_set():
                await self._pause(delay)
            final_try = self._closing.is_set()
            delay = min(delay * 2, longest)

    async def _move(self, message: QueuedMessage, decision: Settlement, delay: float) -> bool:
        try:
            await self._outcomes.submit((message, decision))
        except OSError as error:
            log.error(
                "cannot record a delivery outcome; trying again",
                queue_id=message.queue_id,
                outcome=decision.action,
                error=str(error),
                retry_in_seconds=delay,
            )
            return False
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless shutdown begins (asyncio.wait never cancels the waiter late)."""
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait([closing], timeout=seconds)
        finally:
            closing.cancel()

    async def _queue_dsn(
        self,
        message: QueuedMessage,
        failed: tuple[tuple[str, str], ...],
        original: bytes,
        now: float,
    ) -> bool:
        """Commit a DSN for ``failed``; False when it could not be stored (try again)."""
        dsn_id = new_queue_id()
        content = dsn.build(message, failed, original, self.reporter, now)
        try:
            await self.spool.commit(dsn_id, dsn.dsn_envelope(message, now), content)
        except (SpoolError, OSError) as error:
            log.error(
                "cannot queue a DSN; trying again", queue_id=message.queue_id, error=str(error)
            )
            return False
        self.metrics.dsn_sent.inc()
        log.info(
            "dsn queued",
            queue_id=message.queue_id,
            dsn_id=dsn_id,
            to=message.envelope.sender,
            recipients=len(failed),
        )
        self.notify(dsn_id)
        return True

    # --- records -----------------------------------------------------------------------

    def _report(
        self, message: QueuedMessage, attempt: Attempt, decision: Settlement, now: float
    ) -> None:
        fields = {
            "queue_id": message.queue_id,
            "attempts": decision.state.attempts,
            "delay": round(now - received_at(message), 3),
        }
        if attempt.delivered:
            self.metrics.recipients_delivered.inc(len(attempt.delivered))
            per_message_log.info(
                "delivered", reply=attempt.reply, recipients=len(attempt.delivered), **fields
            )
        if decision.action == DELIVERED:
            # Once per message, when every recipient is done (over however many
            # attempts); a message with a recipient that failed counts as failed.
            self.metrics.messages_delivered.inc()
        if decision.action == DEFERRED:
            self.metrics.messages_deferred.labels(attempt.reason).inc()
            log.info(
                "deferred",
                reason=attempt.reason,
                next_attempt=_iso(decision.next_attempt),
                recipients=len(attempt.deferred),
                error=attempt.reply,
                **fields,
            )
        elif decision.action == FAILED:
            self.metrics.messages_failed.labels(decision.fail_reason).inc()
            log.warning(
                "failed",
                reason=decision.fail_reason,
                recipients=len(decision.state.failed_recipients),
                error=decision.newly_failed[-1][1] if decision.newly_failed else attempt.reply,
                **fields,
            )
        elif decision.action == RELEASED:
            log.debug("released", reason=attempt.reason, detail=attempt.reply, **fields)
        elif decision.action == HELD:
            self.metrics.messages_held.labels(attempt.reason).inc()
            log.warning("held", reason=attempt.reason, error=attempt.reply, **fields)


def _apply_batch(
    spool: Spool, items: list[tuple[QueuedMessage, Settlement]]
) -> list[OSError | None]:
    """In the outcomes thread: the spool moves of a batch; one failure stays its own."""
    errors = spool.apply([_move(message, decision) for message, decision in items])
    for (message, decision), error in zip(items, errors, strict=True):
        if decision.action == HELD and error is None:
            _hold(spool, message.queue_id)
    return errors


_MOVES = {DELIVERED: "delivered", DEFERRED: "deferred", FAILED: "failed", RELEASED: "released"}


def _move(message: QueuedMessage, decision: Settlement) -> Move:
    if decision.action in (DEFERRED, FAILED):
        return Move(message, _MOVES[decision.action], decision.state, decision.next_attempt)
    if decision.action == HELD:
        # Through deferred/ (the state and its reason written with it), then the
        # operator's own hold (_apply_batch): a crash between the two leaves it
        # deferred, and it is held again at its next attempt. Parked far ahead so that
        # no scan takes it in between.
        return Move(message, "deferred", decision.state, time.time() + HOLD_PARKING)
    return Move(message, _MOVES[decision.action])


def _hold(spool: Spool, queue_id: str) -> None:
    """A HELD outcome's second step. Failing it is no reason to write the outcome
    again: the message waits in deferred/ and is held at its next attempt."""
    try:
        spool.hold(queue_id)
    except (OSError, SpoolError) as error:
        log.error(
            "cannot hold a message; it is held at its next attempt",
            queue_id=queue_id,
            error=str(error),
        )


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")

"""Recording what became of an attempt: the spool move, the DSN, the metrics, one log line.

The decision itself is ``relayd.delivery.outcome.settle`` (pure); this applies it.
Spool moves go through one thread in batches (unlinks and renames wait on the
filesystem journal; a meta file is fsynced), and a DSN is committed before the
message leaves active/, so a crash between the two repeats the DSN, never loses it.
"""

from __future__ import annotations

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
from relayd.ops.metrics import Metrics
from relayd.queue.batch import ThreadBatcher
from relayd.queue.model import QueuedMessage, SpoolError, new_queue_id
from relayd.queue.spool import Spool
from relayd.transports.base import Attempt

log = structlog.get_logger("relayd.scheduler")

HOLD_PARKING = 86_400.0  # seconds; see _apply()


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

    async def record(
        self,
        message: QueuedMessage,
        attempt: Attempt,
        original: bytes,
        retry: RetrySettings,
        rng: random.Random,
    ) -> Settlement | None:
        """Settle and apply the attempt; the decision, or None when it could not be
        recorded (the message then stays in active/ until a restart)."""
        now = time.time()
        decision = settle(message, attempt, now, retry, rng)
        if decision.newly_failed:
            await self._queue_dsn(message, decision.newly_failed, original, now)
        try:
            await self._outcomes.submit((message, decision))
        except OSError as error:
            log.error(
                "cannot record a delivery outcome; the message is retried after a restart",
                queue_id=message.queue_id,
                outcome=decision.action,
                error=str(error),
            )
            return None
        self._report(message, attempt, decision, now)
        return decision

    async def _queue_dsn(
        self,
        message: QueuedMessage,
        failed: tuple[tuple[str, str], ...],
        original: bytes,
        now: float,
    ) -> None:
        if not message.envelope.sender:
            return  # RFC 5321 §6.1: never a notification about a notification
        dsn_id = new_queue_id()
        content = dsn.build(message, failed, original, self.reporter, now)
        try:
            await self.spool.commit(dsn_id, dsn.dsn_envelope(message, now), content)
        except (SpoolError, OSError) as error:
            log.error("cannot queue a DSN", queue_id=message.queue_id, error=str(error))
            return
        self.metrics.dsn_sent.inc()
        log.info(
            "dsn queued",
            queue_id=message.queue_id,
            dsn_id=dsn_id,
            to=message.envelope.sender,
            recipients=len(failed),
        )
        self.notify(dsn_id)

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
            log.info("delivered", reply=attempt.reply, recipients=len(attempt.delivered), **fields)
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
    results: list[OSError | None] = []
    for message, decision in items:
        try:
            _apply(spool, message, decision)
            results.append(None)
        except OSError as error:
            results.append(error)
    return results


def _apply(spool: Spool, message: QueuedMessage, decision: Settlement) -> None:
    """In a thread: the spool move for a settled attempt."""
    if decision.action == DELIVERED:
        spool.delivered(message)
    elif decision.action == DEFERRED:
        assert decision.next_attempt is not None
        spool.defer(message, decision.state, decision.next_attempt)
    elif decision.action == FAILED:
        spool.fail(message, decision.state)
    elif decision.action == HELD:
        # Through deferred/ (the state and its reason written with it), then the
        # operator's own hold: a crash between the two leaves it deferred, and it is
        # held again at its next attempt. Parked far ahead so that no scan takes it
        # in between.
        spool.defer(message, decision.state, time.time() + HOLD_PARKING)
        spool.hold(message.queue_id)
    else:
        spool.release_claim(message)


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")

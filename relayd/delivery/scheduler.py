"""Which message goes next: new mail at once, deferred mail when due, within the limits.

The queue lives on disk; the scheduler keeps only a bounded set of messages in
flight (``active``) and a bounded list of ids to take next (``ready``), filled by the
listener's ``notify`` (no directory scan for new mail) and by scans of the spool
(start-up, deferred messages coming due, ``wake`` after an operator's change, a
periodic safety net).

Before it claims a message it asks whether the upstream may be used now: not while
the transport is paused (throttling, unreachable, no token), not beyond the rate
limit or the daily recipient budget. Excess mail therefore waits in the spool; it
is never sent only to be refused.

Each claimed message is delivered by a task, and its ``Attempt`` settled: the spool
moves it (delivered, deferred until when, failed, released), metrics and one log
line record it, and recipients that failed for good get a DSN (never for a DSN).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time

import structlog

from relayd import headers
from relayd.config import Settings
from relayd.delivery import dsn
from relayd.delivery.limits import SlidingWindow
from relayd.delivery.outcome import (
    FAIL_REASONS,
    RELEASED,
)
from relayd.delivery.policy import SenderPolicy
from relayd.delivery.recorder import OutcomeRecorder
from relayd.ops.metrics import Metrics
from relayd.queue.model import CorruptMessage, QueuedMessage
from relayd.queue.spool import Spool
from relayd.transports.base import DAILY_LIMIT, DEFER_REASONS, LOCAL, Attempt, Submission, Transport

log = structlog.get_logger("relayd.scheduler")

RESCAN_INTERVAL = 15.0  # safety net: see operator changes and anything missed
READY_LIMIT = 10_000  # ids kept in memory; beyond, the spool is scanned instead
SCAN_BATCH = 500
INLINE_CLAIM_LIMIT = 64 * 1024  # bigger messages are claimed and read in a thread
MIN_SCAN_GAP = 0.05  # never scan the spool in a tight loop
STOP_SETTLE_TIMEOUT = 10.0


class Scheduler:
    """Feeds queued messages to the transport and records what became of them."""

    def __init__(
        self,
        spool: Spool,
        transport: Transport,
        settings: Settings,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.spool = spool
        self.transport = transport
        self.metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 (retry jitter, not a secret)
        upstream = settings.upstream
        self.rate = SlidingWindow(upstream.rate_limit_per_minute, 60.0)
        self.daily = SlidingWindow(upstream.daily_recipient_limit, 86_400.0)
        self._fqdn = settings.hostname  # resolved once: getfqdn() may block on DNS
        reporter = self._dsn_reporter(settings)
        self.recorder = OutcomeRecorder(spool, metrics, self.notify, reporter)
        self._apply_settings(settings)
        self._active: dict[str, asyncio.Task] = {}
        self._settling: set[asyncio.Task] = set()
        self._ready: dict[str, None] = {}  # insertion-ordered set
        self._scan_due_at = 0.0  # monotonic; 0 = scan as soon as the ready list is empty
        self._last_scan = -MIN_SCAN_GAP
        self._next_deferred: float | None = None  # wall clock
        self._finished_during_scan: set[str] | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._claiming: asyncio.Future | None = None  # a claim running in a thread
        self._stopping = False
        self._paused: str | None = None
        for reason in DEFER_REASONS:
            metrics.messages_deferred.labels(reason)
        for reason in FAIL_REASONS:
            metrics.messages_failed.labels(reason)

    # --- interface -------------------------------------------------------------------

    @property
    def circuit_open(self) -> bool:
        """True while the upstream is paused for a while (throttled, unreachable)."""
        blocked = self.transport.blocked()
        return blocked is not None and blocked.seconds is not None

    @property
    def active_limit(self) -> int:
        # Twice the transport's concurrency: the next message is read from disk while
        # the previous one is still on the wire.
        return max(1, self.transport.concurrency) * 2

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def idle(self) -> bool:
        """Nothing claimed, being delivered or being recorded right now."""
        return not self._active and self._claiming is None and not self._settling

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    def notify(self, queue_id: str) -> None:
        """A message was committed: take it as soon as there is room."""
        if self._stopping:
            return
        if len(self._ready) < READY_LIMIT:
            self._ready[queue_id] = None
        else:
            self._scan_due_at = 0.0
        self._wakeup.set()

    def wake(self) -> None:
        """Rescan the spool now (an operator released, requeued or deleted something)."""
        self._scan_due_at = 0.0
        self._next_deferred = None
        self._wakeup.set()

    def reconfigure(self, settings: Settings) -> None:
        """SIGHUP: new limits, retry times, sender policy and upstream settings."""
        if settings.upstream.transport != self.settings.upstream.transport:
            log.warning(
                "upstream.transport changed; restart relayd to apply it",
                running=self.settings.upstream.transport,
                configured=settings.upstream.transport,
            )
        self._apply_settings(settings)
        self.rate.set_limit(settings.upstream.rate_limit_per_minute)
        self.daily.set_limit(settings.upstream.daily_recipient_limit)
        self.transport.reconfigure(settings)
        self.wake()

    async def stop(self, grace: float) -> None:
        """Let transactions in flight finish within ``grace``; give the rest back.

        An abandoned message is released to the spool untouched: if the upstream had
        already accepted it, it is sent again (a duplicate), never lost.
        """
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._release_interrupted_claim()
        pending: set[asyncio.Task] = set(self._active.values())
        if pending:
            log.info("waiting for deliveries in flight", count=len(pending), grace=grace)
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=STOP_SETTLE_TIMEOUT)
            log.warning("deliveries abandoned at shutdown; retried later", count=len(pending))
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=STOP_SETTLE_TIMEOUT)
        await self.transport.close()

    # --- the dispatch loop -----------------------------------------------------------

    def _apply_settings(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = SenderPolicy(settings.upstream)
        self.recorder.reporter = self._dsn_reporter(settings)

    def _dsn_reporter(self, settings: Settings) -> dsn.Reporter:
        hostname = settings.listen.hostname or self._fqdn
        smtp = settings.upstream.transport == "smtp"
        return dsn.Reporter(
            hostname=hostname,
            from_address=settings.upstream.mailbox or f"MAILER-DAEMON@{hostname}",
            remote_mta=settings.upstream.host if smtp else "",
        )

    async def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                pause, wait_for_transport = await self._dispatch()
            except Exception:
                log.exception("scheduler error; retrying shortly")
                pause, wait_for_transport = 1.0, False
            self._refresh_gauges()
            await self._sleep(pause, wait_for_transport)

    async def _dispatch(self) -> tuple[float, bool]:
        """Start deliveries while there is room; return how long to sleep, and whether
        to wait for the transport to become usable."""
        while len(self._active) < self.active_limit and not self._stopping:
            blocked = self.transport.blocked()
            daily_wait = self.daily.wait_time(1) if self.transport.rate_limited else 0.0
            if blocked is not None:
                self._note_pause(blocked.reason, blocked.detail)
                return blocked.seconds or RESCAN_INTERVAL, True
            if daily_wait > 0:
                # Exchange Online's daily budget is spent: mail waits, loudly (an operator
                # who expected it to flow must see why it does not).
                detail = f"{self.daily.limit} recipients in 24 h; room again in {daily_wait:.0f}s"
                self._note_pause(DAILY_LIMIT, f"daily recipient limit reached ({detail})")
                return daily_wait, False
            self._note_pause(None, "")
            if self.transport.rate_limited:
                wait = self.rate.wait_time(1)
                if wait > 0:
                    return wait, False
            queue_id = await self._next_queue_id()
            if queue_id is None:
                return self._idle_time(), False
            await self._start(queue_id)
        return RESCAN_INTERVAL, False  # full: a finishing delivery wakes us

    async def _sleep(self, pause: float, wait_for_transport: bool) -> None:
        timeout = max(0.0, min(pause, RESCAN_INTERVAL))
        waits = {asyncio.ensure_future(self._wakeup.wait())}
        if wait_for_transport:
            waits.add(asyncio.ensure_future(self.transport.wait_until_available()))
        try:
            done, _ = await asyncio.wait(
                waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waits:
                waiter.cancel()
        if wait_for_transport and done and not self._wakeup.is_set():
            # The transport says something changed; never let a transport that keeps
            # saying so turn this loop into a busy one.
            await asyncio.sleep(MIN_SCAN_GAP)

    def _idle_time(self) -> float:
        until_scan = self._scan_due_at - time.monotonic()
        if self._next_deferred is not None:
            until_scan = min(until_scan, self._next_deferred - time.time())
        return max(MIN_SCAN_GAP, until_scan)

    async def _next_queue_id(self) -> str | None:
        # Retries that came due are looked for even while new mail is waiting, and go
        # first: a steady flow of new mail must not starve them.
        if self._scan_needed() and (not self._ready or self._deferred_due()):
            await self._scan()
        if not self._ready:
            return None
        queue_id = next(iter(self._ready))
        del self._ready[queue_id]
        return queue_id

    def _scan_needed(self) -> bool:
        now = time.monotonic()
        if now - self._last_scan < MIN_SCAN_GAP:
            return False
        return self._deferred_due() or now >= self._scan_due_at

    def _deferred_due(self) -> bool:
        return self._next_deferred is not None and self._next_deferred <= time.time()

    async def _scan(self) -> None:
        exclude = set(self._active) | set(self._ready)
        self._finished_during_scan = set()
        try:
            found, next_deferred = await asyncio.to_thread(self._find_due, exclude)
        finally:
            finished, self._finished_during_scan = self._finished_during_scan, None
        self._last_scan = time.monotonic()
        # A message that finished while the scan ran may have been deferred already;
        # taking it now would ignore its next-attempt time.
        found = [q for q in found if q not in finished and q not in self._active]
        self._ready = {**dict.fromkeys(found), **self._ready}
        self._next_deferred = next_deferred
        more_waiting = len(found) >= SCAN_BATCH
        self._scan_due_at = 0.0 if more_waiting else self._last_scan + RESCAN_INTERVAL

    def _find_due(self, exclude: set[str]) -> tuple[list[str], float | None]:
        """In a thread: due ids, and when the next deferred one not among them is due."""
        found = self.spool.due(time.time(), SCAN_BATCH, exclude)
        taken = exclude.union(found)
        upcoming = (
            entry.next_attempt
            for entry in self.spool.entries(("deferred",))
            if entry.queue_id not in taken and entry.next_attempt is not None
        )
        return found, min(upcoming, default=None)

    # --- one message -------------------------------------------------------------------

    async def _start(self, queue_id: str) -> None:
        try:
            claimed = await self._claim_soon(queue_id)
        except CorruptMessage as error:
            log.error("queue file is corrupt; set aside", queue_id=queue_id, error=str(error))
            return
        except OSError as error:
            log.error("cannot read a queued message", queue_id=queue_id, error=str(error))
            return
        if claimed is None:
            return  # somebody else took it (operator) or it is not due any more
        message, submission, original_headers = claimed
        if self.transport.rate_limited:
            wanted = len(submission.recipients)
            wait = self.daily.wait_time(wanted)
            if wait > 0:
                text = f"daily recipient limit ({self.daily.limit}) reached; room in {wait:.0f}s"
                postponed = Attempt.not_attempted(submission.recipients, DAILY_LIMIT, text, wait)
                self._track(message.queue_id, self._conclude(message, postponed, b""))
                return
            self.daily.spend(wanted)
            self.rate.spend(1)
        self._track(message.queue_id, self._deliver(message, submission, original_headers))

    async def _claim_soon(self, queue_id: str) -> tuple | None:
        if _is_small(self.spool, queue_id):
            # A rename and one read of a few KiB: bounded and cheaper than a thread hop,
            # which under load costs more than the work itself.
            return self._claim(queue_id)
        # Shielded: if stop() cancels the dispatcher now, the thread still claims the
        # message; stop() then gives it back (_release_interrupted_claim).
        self._claiming = asyncio.ensure_future(asyncio.to_thread(self._claim, queue_id))
        try:
            claimed = await asyncio.shield(self._claiming)
        except asyncio.CancelledError:
            raise  # stop() gives the claimed message back
        except BaseException:
            self._claiming = None
            raise
        self._claiming = None
        return claimed

    async def _release_interrupted_claim(self) -> None:
        claiming, self._claiming = self._claiming, None
        if claiming is None:
            return
        try:
            claimed = await claiming
        except Exception:
            return  # nothing was claimed (or it was set aside as corrupt)
        if claimed is not None:
            self._release_abandoned(claimed[0])

    def _claim(self, queue_id: str) -> tuple[QueuedMessage, Submission, bytes] | None:
        """In a thread: claim, read and prepare one message."""
        message = self.spool.claim(queue_id)
        if message is None:
            return None
        try:
            content = message.read_content()
            mail_from, prepared = self.policy.prepare(message.envelope, content)
        except BaseException:
            self.spool.release_claim(message)
            raise
        submission = Submission(
            queue_id=queue_id,
            mail_from=mail_from,
            recipients=self.policy.upstream_recipients(message.pending_recipients),
            content=prepared,
            mail_options=message.envelope.mail_options,
        )
        return message, submission, headers.header_block(content)

    def _track(self, queue_id: str, work) -> None:
        task = asyncio.create_task(work, name=f"deliver-{queue_id}")
        self._active[queue_id] = task
        task.add_done_callback(lambda done: self._finished(queue_id, done))

    def _finished(self, queue_id: str, task: asyncio.Task) -> None:
        self._active.pop(queue_id, None)
        if self._finished_during_scan is not None:
            self._finished_during_scan.add(queue_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", queue_id=queue_id, error=repr(task.exception()))
        self._wakeup.set()

    async def _deliver(
        self, message: QueuedMessage, submission: Submission, original_headers: bytes
    ) -> None:
        try:
            if submission.recipients:
                attempt = await self.transport.deliver(submission)
            else:
                attempt = Attempt()  # every recipient was settled before a restart
        except asyncio.CancelledError:
            self._release_abandoned(message)
            raise
        except Exception as error:
            log.exception("unexpected delivery error", queue_id=message.queue_id)
            attempt = Attempt.deferred_all(submission.recipients, LOCAL, f"internal error: {error}")
        # Told for the recipients as queued (<postmaster> went to the mailbox).
        attempt = self.policy.envelope_attempt(message.pending_recipients, attempt)
        await self._conclude(message, attempt, original_headers)

    async def _conclude(self, message: QueuedMessage, attempt: Attempt, original: bytes) -> None:
        """Record the outcome; once it is known, even a shutdown does not interrupt that."""
        settling = asyncio.ensure_future(self._settle(message, attempt, original))
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)
        await asyncio.shield(settling)

    def _release_abandoned(self, message: QueuedMessage) -> None:
        try:
            self.spool.release_claim(message)  # a rename and a utime: cheap
        except OSError as error:
            log.error(
                "cannot release a message; it is retried after a restart",
                queue_id=message.queue_id,
                error=str(error),
            )

    async def _settle(self, message: QueuedMessage, attempt: Attempt, original: bytes) -> None:
        decision = await self.recorder.record(
            message, attempt, original, self.settings.retry, self._rng
        )
        if decision is None:
            return
        if decision.action == RELEASED:
            self._scan_due_at = 0.0  # it is queued again: find it once unblocked
        elif decision.next_attempt is not None:
            # Come back for it when it is due (the periodic scan is only a safety net).
            self._next_deferred = min(self._next_deferred or math.inf, decision.next_attempt)

    # --- pauses and gauges --------------------------------------------------------

    def _note_pause(self, reason: str | None, detail: str) -> None:
        """One log line when deliveries pause and one when they resume."""
        if reason == self._paused:
            return
        if reason is None:
            log.info("deliveries resumed", after=self._paused)
        else:
            log.warning("deliveries paused", reason=reason, detail=detail)
        self._paused = reason

    def _refresh_gauges(self) -> None:
        self.metrics.upstream_circuit_open.set(1 if self.circuit_open else 0)
        self.metrics.rate_limit_tokens.set(self.rate.remaining())
        self.metrics.daily_recipients_used.set(self.daily.used())


def _is_small(spool: Spool, queue_id: str) -> bool:
    """Whether the queued file is small enough to claim on the event loop."""
    for state in ("incoming", "deferred"):
        try:
            return os.stat(spool.path(state, queue_id)).st_size <= INLINE_CLAIM_LIMIT
        except FileNotFoundError:
            continue
    return True  # gone: claim() finds nothing, at once

"""Which message goes next: new mail at once, deferred mail when due, within the limits.

The queue lives on disk; the scheduler keeps only a bounded set of messages in
flight (``active``) and bounded lanes of ids to take next (``relayd.delivery.ready``:
new mail oldest first and due retries, taking turns), filled by the listener's
``notify`` (no directory scan for new mail) and by scans of the spool.

Before it claims a message it asks whether the upstream may be used now: not while
the transport is paused (throttling, unreachable, no token, the account refused),
not beyond the rate limit or the daily recipient budget. Excess mail therefore waits
in the spool; it is never sent only to be refused. A claimed message reserves its
share of both limits; after the attempt, whatever the upstream never counted (the
attempt's ``Usage``) is given back.

Each claimed message is delivered by a task, and its ``Attempt`` settled: the spool
moves it (delivered, deferred until when, failed, released), metrics and one log
line record it, and recipients that failed for good get a DSN (never for a DSN).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Callable

import structlog

from relayd.config import Settings
from relayd.delivery import dsn
from relayd.delivery.claims import CLAIM_BATCH, Claims
from relayd.delivery.giveway import ListenerFirst
from relayd.delivery.limits import Reservation, SendingBudget
from relayd.delivery.outcome import (
    FAIL_REASONS,
    RELEASED,
)
from relayd.delivery.policy import SenderPolicy
from relayd.delivery.ready import MIN_SCAN_GAP, RESCAN_INTERVAL, ReadySource
from relayd.delivery.recorder import OutcomeRecorder
from relayd.ops.metrics import Metrics
from relayd.queue.model import CorruptMessage, QueuedMessage
from relayd.queue.spool import Spool
from relayd.transports.base import (
    DAILY_LIMIT,
    DEFER_REASONS,
    LOCAL,
    PAUSE_REASONS,
    Attempt,
    Submission,
    Transport,
)

log = structlog.get_logger("relayd.scheduler")

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
        owns: Callable[[str, str], bool] | None = None,
        on_new_message: Callable[[str], None] | None = None,
        mailbox: str | None = None,
        listener_first: ListenerFirst | None = None,
    ) -> None:
        """``owns``, ``on_new_message`` and ``mailbox`` are for one route of several
        (``relayd.delivery.routing``): which queued ids are this route's, where a DSN
        it queues is announced (the route of the DSN's null sender), and the route's
        name in log lines; ``listener_first`` is shared by the routes."""
        self.spool = spool
        self.transport = transport
        self.metrics = metrics
        self.mailbox = mailbox
        self._log = log.bind(mailbox=mailbox) if mailbox else log
        self.listener_first = listener_first or ListenerFirst()
        self._rng = rng or random.Random()  # noqa: S311 (retry jitter, not a secret)
        upstream = settings.upstream
        self.budget = SendingBudget(upstream.rate_limit_per_minute, upstream.daily_recipient_limit)
        self.rate, self.daily = self.budget.rate, self.budget.daily
        self._fqdn = settings.hostname  # resolved once: getfqdn() may block on DNS
        reporter = self._dsn_reporter(settings)
        announce = on_new_message or self.notify
        self.recorder = OutcomeRecorder(spool, metrics, announce, reporter)
        self._apply_settings(settings)
        self._active: dict[str, asyncio.Task] = {}
        self._settling: set[asyncio.Task] = set()
        self._ready = ReadySource(spool, owns)  # the ids to take next, bounded and fair
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.claims = Claims(spool, lambda: self.policy)
        self._stopping = False
        self._paused: str | None = None
        self.on_pause: Callable[[str | None, str], None] | None = None  # e.g. status.json
        for reason in DEFER_REASONS:
            metrics.messages_deferred.labels(reason)
        for reason in FAIL_REASONS:
            metrics.messages_failed.labels(reason)
        # The children, looked up once: the gauges are refreshed after every pass.
        self._paused_gauges = {
            reason: metrics.deliveries_paused.labels(reason) for reason in (*PAUSE_REASONS, "other")
        }

    # --- interface -------------------------------------------------------------------

    @property
    def circuit_open(self) -> bool:
        """True while the upstream is paused for a while (throttled, unreachable)."""
        blocked = self.transport.blocked()
        return blocked is not None and blocked.seconds is not None

    @property
    def active_limit(self) -> int:
        concurrency = max(1, self.transport.concurrency)
        if self.listener_first.engaged():
            # Clients are sending and the CPU is short (relayd.delivery.giveway): one
            # connection fewer, nothing read ahead.
            return max(1, concurrency - 1)
        # Twice the transport's concurrency: the next message is read from disk while
        # the previous one is still on the wire.
        return concurrency * 2

    @property
    def paused(self) -> str | None:
        """Why no delivery starts now (a PAUSE_REASONS value), None while they do."""
        return self._paused

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def idle(self) -> bool:
        """Nothing claimed, being delivered or being recorded right now."""
        return not self._active and not self.claims.busy and not self._settling

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    def notify(self, queue_id: str) -> None:
        """A message was committed: take it as soon as there is room."""
        if self._stopping:
            return
        self.listener_first.arrived()
        self._ready.notify(queue_id)
        self._wakeup.set()

    def wake(self) -> None:
        """Rescan the spool now (an operator released, requeued or deleted something)."""
        self._ready.wake()
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
        upstream = settings.upstream
        self.budget.set_limits(upstream.rate_limit_per_minute, upstream.daily_recipient_limit)
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
        await self.claims.release_all()
        pending: set[asyncio.Task] = set(self._active.values())
        if pending:
            log.info("waiting for deliveries in flight", count=len(pending), grace=grace)
            _, pending = await asyncio.wait(pending, timeout=grace)
        self.recorder.close()  # outcomes still failing to be written get one last try
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
            if self.claims.ahead and len(self._active) < self.active_limit:
                # The pass stopped at a pause or a limit, not for want of a free slot:
                # what was claimed ahead goes back, first in line.
                self._ready.lanes.add_incoming(await self.claims.give_back())
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
            claim = await self._next_claim()
            if claim is None:
                return self._ready.idle_time(), False
            await self._start(*claim)
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

    async def _next_queue_id(self) -> str | None:
        # Retries that came due are looked for even while new mail is waiting, and
        # take turns with it (ReadyQueue): a backlog of new mail must not starve them.
        return await self._ready.next(self._active)

    # --- one message -------------------------------------------------------------------

    async def _start(self, queue_id: str, claimed: object) -> None:
        if isinstance(claimed, CorruptMessage):
            log.error("queue file is corrupt; set aside", queue_id=queue_id, error=str(claimed))
            return
        if isinstance(claimed, Exception):
            log.error("cannot read a queued message", queue_id=queue_id, error=str(claimed))
            return
        if not isinstance(claimed, tuple):
            return  # somebody else took it (operator) or it is not due any more
        message, submission, original_headers = claimed
        reserved: Reservation | None = None
        if self.transport.rate_limited:
            wanted = len(submission.recipients)
            wait = self.daily.wait_time(wanted)
            if wait > 0:
                text = f"daily recipient limit ({self.daily.limit}) reached; room in {wait:.0f}s"
                postponed = Attempt.not_attempted(submission.recipients, DAILY_LIMIT, text, wait)
                self._track(message.queue_id, self._conclude(message, postponed, b""))
                return
            reserved = self.budget.reserve(wanted)
        work = self._deliver(message, submission, original_headers, reserved)
        self._track(message.queue_id, work)

    async def _next_claim(self) -> tuple[str, object] | None:
        """The next message to start, claimed in a thread (``relayd.delivery.claims``);
        None when nothing is ready. One thread hop claims up to a full set of delivery
        slots ahead (the ones claimed ahead start as slots free up), so under load a
        hop is shared by several messages instead of costing one per message."""
        if not self.claims.ahead:
            first = await self._next_queue_id()
            if first is None:
                return None
            more = (self._ready.lanes.pop() for _ in range(self._claim_room() - 1))
            await self.claims.claim([first, *itertools.takewhile(bool, more)])
        return self.claims.pop()

    def _claim_room(self) -> int:
        room = self.active_limit
        if self.transport.rate_limited:  # each message spends 1 of rate, 1+ of daily
            room = min(room, self.rate.remaining(), self.daily.remaining())
        return max(1, min(int(room), CLAIM_BATCH))

    def _track(self, queue_id: str, work) -> None:
        task = asyncio.create_task(work, name=f"deliver-{queue_id}")
        self._active[queue_id] = task
        task.add_done_callback(lambda done: self._finished(queue_id, done))

    def _finished(self, queue_id: str, task: asyncio.Task) -> None:
        self._active.pop(queue_id, None)
        self._ready.finished(queue_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", queue_id=queue_id, error=repr(task.exception()))
        self._wakeup.set()

    async def _deliver(
        self,
        message: QueuedMessage,
        submission: Submission,
        original_headers: bytes,
        reserved: Reservation | None = None,
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
        self._give_back(reserved, attempt)
        # Told for the recipients as queued (<postmaster> went to the mailbox).
        attempt = self.policy.envelope_attempt(message.pending_recipients, attempt)
        await self._conclude(message, attempt, original_headers)

    def _give_back(self, reserved: Reservation | None, attempt: Attempt) -> None:
        """Return the budget the upstream never counted (a connection that failed, a
        432, a refused MAIL or DATA command), so mail does not wait behind it."""
        spent = attempt.spent
        if reserved is not None and spent is not None:
            self.budget.give_back(reserved, spent.messages, spent.recipients)

    async def _conclude(self, message: QueuedMessage, attempt: Attempt, original: bytes) -> None:
        """Record the outcome; once it is known, even a shutdown does not interrupt that."""
        settling = asyncio.ensure_future(self._settle(message, attempt, original))
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)
        await asyncio.shield(settling)

    def _release_abandoned(self, message: QueuedMessage) -> None:
        self.claims.release(message)  # a rename and a utime: cheap

    async def _settle(self, message: QueuedMessage, attempt: Attempt, original: bytes) -> None:
        decision = await self.recorder.record(
            message, attempt, original, self.settings.retry, self._rng
        )
        if decision is None:
            return
        if decision.action == RELEASED:
            self._ready.rescan_soon()  # it is queued again: find it once unblocked
        elif decision.next_attempt is not None:
            # Come back for it when it is due (the periodic scan is only a safety net).
            self._ready.come_back_at(decision.next_attempt)

    # --- pauses and gauges --------------------------------------------------------

    def _note_pause(self, reason: str | None, detail: str) -> None:
        """One log line when deliveries pause and one when they resume."""
        if reason == self._paused:
            return
        if reason is None:
            self._log.info("deliveries resumed", after=self._paused)
        else:
            self._log.warning("deliveries paused", reason=reason, detail=detail)
        self._paused = reason
        if self.on_pause is not None:
            self.on_pause(reason, detail)

    def _refresh_gauges(self) -> None:
        paused = self._paused if self._paused in (None, *PAUSE_REASONS) else "other"
        for reason, gauge in self._paused_gauges.items():
            gauge.set(1 if reason == paused else 0)
        self.metrics.upstream_circuit_open.set(1 if self.circuit_open else 0)
        self.metrics.rate_limit_tokens.set(self.rate.remaining())
        self.metrics.daily_recipients_used.set(self.daily.used())

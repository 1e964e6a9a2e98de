"""``upstream.transport: auto``: SMTP first, Microsoft Graph while SMTP AUTH is off.

Many tenants switch SMTP AUTH off (security defaults, or Microsoft's own advice), and
Exchange then answers ``535 5.7.139`` to every sign-in. The same sign-in can send
through Graph (``Mail.Send``), so on that reply this transport moves to Graph, with one
WARNING line and ``relayd_upstream_transport_switches_total{to="graph"}``, and opens an
SMTP session again every ``upstream.smtp_probe_interval`` (1 h) while mail flows; once
one authenticates it moves back. A message too big for Graph goes by SMTP while SMTP
works: it is then tried at once, not after the hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from relayd.config import Settings
from relayd.ops.metrics import Metrics
from relayd.transports.base import AUTH, TOO_BIG, Attempt, Blocked, Submission
from relayd.transports.graph import GraphTransport
from relayd.transports.replies import Kind, classify
from relayd.transports.smtp import SmtpTransport

log = structlog.get_logger("relayd.delivery")

SMTP, GRAPH = "smtp", "graph"


class AutoTransport:
    """SMTP, or Graph while Exchange says SMTP AUTH is disabled."""

    rate_limited = True

    def __init__(
        self,
        smtp: SmtpTransport,
        graph: GraphTransport,
        settings: Settings,
        metrics: Metrics,
        *,
        on_switch: Callable[[str], None] = lambda name: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.smtp, self.graph = smtp, graph
        self.settings, self.metrics = settings, metrics
        self.using = SMTP
        self.probes = 0  # SMTP sessions tried while on Graph
        self._on_switch = on_switch  # the token manager follows: its lead resource
        self._clock = clock
        self._next_probe = float("inf")
        self._probe_lock = asyncio.Lock()
        self._probe_task: asyncio.Task | None = None
        metrics.using_transport(SMTP)

    @property
    def current(self) -> SmtpTransport | GraphTransport:
        return self.graph if self.using == GRAPH else self.smtp

    @property
    def concurrency(self) -> int:
        return self.current.concurrency

    def blocked(self) -> Blocked | None:
        return self.current.blocked()

    async def wait_until_available(self) -> None:
        await self.current.wait_until_available()

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.smtp.reconfigure(settings)
        self.graph.reconfigure(settings)

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe_task
        await self.smtp.close()
        await self.graph.close()

    async def deliver(self, submission: Submission) -> Attempt:
        if self.using == SMTP:
            attempt = await self.smtp.deliver(submission)
            if auth_disabled(attempt):
                self._move_to_graph(attempt.reply)
            if self.using == SMTP or attempt.delivered or attempt.failed:
                return attempt
            # SMTP AUTH is off (found by this attempt or a sibling's): nothing was sent.
        self._probe_when_due()
        attempt = await self.graph.deliver(submission)
        if attempt.hold and attempt.reason == TOO_BIG and await self._smtp_works():
            return await self.smtp.deliver(submission)
        return attempt

    # --- moving ------------------------------------------------------------------------

    def _move_to_graph(self, reply: str) -> None:
        if self.using == GRAPH:
            return
        self.using = GRAPH
        self._next_probe = self._clock() + self.settings.upstream.smtp_probe_interval
        log.warning(
            "SMTP AUTH is disabled for the mailbox; sending through Microsoft Graph until"
            " SMTP works again",
            reply=reply,
            mailbox=self.settings.upstream.mailbox,
            probe_every_seconds=self.settings.upstream.smtp_probe_interval,
        )
        self._switched(GRAPH)

    def _move_to_smtp(self) -> None:
        if self.using == SMTP:
            return
        self.using = SMTP
        self._next_probe = float("inf")
        log.warning("SMTP AUTH works again; sending by SMTP", probes=self.probes)
        self._switched(SMTP)

    def _switched(self, name: str) -> None:
        self.metrics.transport_switches.labels(name).inc()
        self.metrics.using_transport(name)
        self._on_switch(name)

    # --- probing SMTP ------------------------------------------------------------------

    def _probe_when_due(self) -> None:
        running = self._probe_task is not None and not self._probe_task.done()
        if self._clock() >= self._next_probe and not running:
            self._probe_task = asyncio.create_task(self._smtp_works(), name="smtp-probe")

    async def _smtp_works(self) -> bool:
        """One SMTP session now: True (and back to SMTP) when it authenticates."""
        async with self._probe_lock:
            if self.using == SMTP:
                return True
            self.probes += 1
            problem = await self.smtp.probe()
            if problem is None:
                self._move_to_smtp()
                return True
            interval = self.settings.upstream.smtp_probe_interval
            self._next_probe = self._clock() + interval
            log.info(
                "SMTP still refused; mail keeps going through Microsoft Graph",
                reply=problem,
                next_probe_in_seconds=interval,
            )
            return False


def auth_disabled(attempt: Attempt) -> bool:
    """Did Exchange answer 535 5.7.139 (SMTP AUTH disabled for tenant or mailbox)?"""
    code, _, text = attempt.reply.partition(" ")
    if attempt.reason != AUTH or not code.isdigit():
        return False
    return classify(int(code), text) is Kind.AUTH_DISABLED

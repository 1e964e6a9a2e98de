"""Wiring and lifecycle of the daemon (uvicorn's shape: start-up, main loop, shutdown).

Start order: spool recovery → listener → scheduler → READY=1. Signals only set flags; the main
coroutine does the work, so a signal can never interrupt a half-done step.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import structlog

from relayd import config
from relayd import logging as relay_logging
from relayd.config import ConfigError, Settings
from relayd.delivery import build_transport
from relayd.listener import Listener, RelayHandler
from relayd.metrics import Metrics
from relayd.scheduler import Scheduler
from relayd.sdnotify import Notifier
from relayd.spool import Envelope, Spool

log = structlog.get_logger("relayd.app")

CENSUS_INTERVAL = 30.0  # recount the spool from disk to see `relayd queue` changes
GAUGE_INTERVAL = 1.0


class Relay:
    """The running daemon: owns every component and the order they start and stop in."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None = None,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.notifier = notifier or Notifier()
        self.spool = Spool(settings.spool.directory, min_free_space=settings.spool.min_free_space)
        # self.tokens comes from the token module (None with the maildir transport).
        transport = build_transport(settings, self.metrics, getattr(self, "tokens", None))
        self.scheduler = Scheduler(self.spool, transport, settings, self.metrics)
        self.handler = RelayHandler(
            settings.listen,
            self.spool,
            self.metrics,
            hostname=settings.hostname,
            on_queued=self._queued,
            content_policy=self._content_policy,
        )
        self.listener = Listener(self.handler, settings.listen, settings.hostname)
        self.ready = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ---------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, shut down gracefully."""
        self._install_signal_handlers()
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def start(self) -> None:
        started = time.monotonic()
        report = await asyncio.to_thread(self.spool.recover)
        census = self.spool.census()
        log.info(
            "spool recovered",
            directory=str(self.spool.directory),
            **report,
            queued=sum(census.messages[s] for s in ("incoming", "deferred", "hold")),
        )
        await self.listener.start()
        await self.scheduler.start()
        self._tasks.append(asyncio.create_task(self._update_gauges(), name="gauges"))
        self.ready = True
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        log.info(
            "relayd ready",
            listen=f"{self.settings.listen.address}:{self.listener.bound_port}",
            startup_seconds=round(time.monotonic() - started, 3),
        )

    async def shutdown(self) -> None:
        self.notifier.notify("STOPPING=1")
        log.info("shutting down", grace_seconds=self.settings.listen.shutdown_grace)
        await self.listener.stop(self.settings.listen.shutdown_grace)
        await self.scheduler.stop(self.settings.listen.shutdown_grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refresh_gauges()
        log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply what can change safely, keep the rest."""
        if self.config_path is None:
            log.warning("reload ignored: no configuration file (sandbox or defaults)")
            return
        try:
            new = config.load(self.config_path)
        except ConfigError as error:
            log.error("reload refused; keeping the running configuration", error=str(error))
            return
        relay_logging.set_level(new.logging.level)
        self.listener.reconfigure(new.listen)
        self.scheduler.reconfigure(new)
        self.settings = new
        log.info("configuration reloaded", file=str(self.config_path), level=new.logging.level)

    def status_line(self) -> str:
        census = self.spool.census()
        queued = sum(census.messages[s] for s in ("incoming", "active", "deferred"))
        return f"queue {queued}, hold {census.messages['hold']}, failed {census.messages['failed']}"

    # --- internals ---------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _queued(self, queue_id: str) -> None:
        """A message was committed; delivery is started from here."""
        self.scheduler.notify(queue_id)

    def _content_policy(self, envelope: Envelope, content: bytes) -> str | None:
        """End of DATA: the sender policy may refuse a From: it cannot send as."""
        return self.scheduler.policy.refusal(envelope, content)

    async def _update_gauges(self) -> None:
        last_census = time.monotonic()
        while True:
            await asyncio.sleep(GAUGE_INTERVAL)
            if time.monotonic() - last_census >= CENSUS_INTERVAL:
                await asyncio.to_thread(self.spool.take_census)
                last_census = time.monotonic()
            self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        census = self.spool.census()
        for state, count in census.messages.items():
            self.metrics.queue_messages.labels(state).set(count)
        self.metrics.queue_bytes.set(
            sum(size for state, size in census.bytes.items() if state != "failed")
        )
        oldest = census.oldest_received_at
        self.metrics.queue_oldest_age.set(max(0.0, time.time() - oldest) if oldest else 0.0)

"""Wiring and lifecycle of the daemon (uvicorn's shape: start-up, main loop, shutdown).

Start order: health endpoint → spool recovery → listener → READY=1 (the endpoint
comes first so that /healthz answers and /readyz says "recovering" during a long
recovery). Stop order: the listener first, the health endpoint last. Signals only set
flags; the main coroutine does the work, so a signal can never interrupt a half-done
step.
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
from relayd.health import HealthServer, readiness_report
from relayd.listener import Listener, RelayHandler
from relayd.metrics import Metrics
from relayd.sdnotify import Notifier
from relayd.spool import Spool

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
        self.handler = RelayHandler(
            settings.listen,
            self.spool,
            self.metrics,
            hostname=settings.hostname,
            on_queued=self._queued,
        )
        self.listener = Listener(self.handler, settings.listen, settings.hostname)
        self.health = self._health_server(settings) if settings.metrics.enabled else None
        self.ready = False  # listener bound and spool recovered
        self.phase = "starting"  # → recovering → ready → stopping (shown by /readyz)
        _register_secrets(settings)
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
        if self.health is not None:
            await self.health.start()
        self.phase = "recovering"
        report = await asyncio.to_thread(self.spool.recover)
        census = self.spool.census()
        log.info(
            "spool recovered",
            directory=str(self.spool.directory),
            **report,
            queued=sum(census.messages[s] for s in ("incoming", "deferred", "hold")),
        )
        await self.listener.start()
        self._tasks.append(asyncio.create_task(self._update_gauges(), name="gauges"))
        self.ready, self.phase = True, "ready"
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        log.info(
            "relayd ready",
            listen=f"{self.settings.listen.address}:{self.listener.bound_port}",
            startup_seconds=round(time.monotonic() - started, 3),
        )

    async def shutdown(self) -> None:
        self.ready, self.phase = False, "stopping"
        self.notifier.notify("STOPPING=1")
        log.info("shutting down", grace_seconds=self.settings.listen.shutdown_grace)
        await self.listener.stop(self.settings.listen.shutdown_grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refresh_gauges()
        if self.health is not None:
            await self.health.stop()
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
        _register_secrets(new)
        relay_logging.set_level(new.logging.level)
        self.listener.reconfigure(new.listen)
        self.settings = new
        log.info("configuration reloaded", file=str(self.config_path), log_level=new.logging.level)

    def status_line(self) -> str:
        census = self.spool.census()
        held, failed = census.messages["hold"], census.messages["failed"]
        return f"queue {census.pending}, hold {held}, failed {failed}"

    # --- internals ---------------------------------------------------------------

    def _health_server(self, settings: Settings) -> HealthServer:
        return HealthServer(
            settings.metrics.address,
            settings.metrics.port,
            registry=self.metrics.registry,
            readiness=lambda: readiness_report(self),
            before_scrape=self._refresh_gauges_if_recovered,
        )

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _queued(self, queue_id: str) -> None:
        """A message was committed; delivery is started from here."""

    async def _update_gauges(self) -> None:
        last_census = time.monotonic()
        while True:
            await asyncio.sleep(GAUGE_INTERVAL)
            if time.monotonic() - last_census >= CENSUS_INTERVAL:
                await asyncio.to_thread(self.spool.take_census)
                last_census = time.monotonic()
            self._refresh_gauges()

    def _refresh_gauges_if_recovered(self) -> None:
        """Before a scrape: exact queue gauges, but never a half-recovered spool's."""
        if self.phase in ("ready", "stopping"):
            self._refresh_gauges()

    def _refresh_gauges(self) -> None:
        census = self.spool.census()
        for state, count in census.messages.items():
            self.metrics.queue_messages.labels(state).set(count)
        self.metrics.queue_bytes.set(
            sum(size for state, size in census.bytes.items() if state != "failed")
        )
        self.metrics.queue_oldest_age.set(census.oldest_age(time.time()))


def _register_secrets(settings: Settings) -> None:
    """The client secret must never be printed, whatever path a line takes."""
    if settings.oauth.client_secret:
        relay_logging.redactor.register(settings.oauth.client_secret.reveal(), permanent=True)

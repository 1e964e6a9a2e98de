"""Wiring and lifecycle of the daemon (uvicorn's shape: start-up, main loop, shutdown).

Start order: pid file lock → health endpoint → spool recovery → tokens → listener →
scheduler → READY=1. The health endpoint comes before recovery so that /healthz
answers and /readyz says "recovering" during a long recovery. Stop order: the
listener first, then the scheduler (deliveries in flight may finish), the tokens,
the health endpoint last. Signals only set
flags or schedule work on the loop, so a signal never interrupts a half-done step:
SIGTERM/SIGINT stop gracefully, SIGHUP reloads the configuration, SIGUSR1 (sent by
`relayd queue` after a change) rescans the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from relayd import config
from relayd.auth.tokens import TokenManager
from relayd.config import MICROSOFT_TRANSPORTS, ConfigError, Settings
from relayd.delivery.routing import RoutedScheduler
from relayd.ops import logging as relay_logging
from relayd.ops import sdnotify
from relayd.ops.daemon_status import StatusFile
from relayd.ops.health import HealthServer, readiness_report
from relayd.ops.metrics import NOT_USED, MailboxMetrics, Metrics
from relayd.ops.pidfile import PID_FILE_NAME, AlreadyRunning, PidFile
from relayd.ops.reload import merge_reload
from relayd.ops.sdnotify import Notifier
from relayd.queue.model import Envelope
from relayd.queue.spool import Spool
from relayd.smtp.listener import Listener, RelayHandler
from relayd.transports.auto import AutoTransport
from relayd.transports.base import AUTH, Transport
from relayd.transports.graph import GraphTransport
from relayd.transports.maildir import MaildirTransport
from relayd.transports.smtp import SmtpTransport

log = structlog.get_logger("relayd.app")

CENSUS_INTERVAL = 30.0  # recount the spool from disk to see `relayd queue` changes
GAUGE_INTERVAL = 1.0
MIN_DELIVERY_GRACE = 1.0  # in-flight upstream transactions get at least this to finish


class StartupError(Exception):
    """The daemon cannot start (spool in use, port taken); the text says what to fix."""


class Relay:
    """The running daemon: owns every component and the order they start and stop in."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None = None,
        loader: Callable[[Path], Settings] = config.load,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self._load_config = loader  # SIGHUP; the sandbox's keeps the maildir transport
        self.metrics = metrics or Metrics(per_mailbox=bool(settings.routes))
        self.notifier = notifier or Notifier()
        self.spool = Spool(
            settings.spool.directory,
            min_free_space=settings.spool.min_free_space,
            writer_process=True,  # small messages written away from the loop's GIL
        )
        self.handler = RelayHandler(
            settings.listen,
            self.spool,
            self.metrics,
            hostname=settings.hostname,
            on_queued_from=self._queued,
            content_policy=self._content_policy,
        )
        self.listener = Listener(self.handler, settings.listen, settings.hostname)
        # One token manager, transport and scheduler per mailbox (routes by sender).
        self.mailboxes: dict[str, TokenManager | None] = {}
        lanes = {}
        for key, mailbox_settings in config.mailbox_settings(settings).items():
            metrics_of = self.metrics.for_mailbox(key)
            route = key != settings.default_mailbox
            cache_key = _token_cache_key(settings, key)
            tokens = _token_manager(mailbox_settings, metrics_of, config_path, route, cache_key)
            self.mailboxes[key] = tokens
            transport = build_transport(mailbox_settings, metrics_of, tokens)
            lanes[key] = (mailbox_settings, transport, metrics_of)
        self.tokens = self.mailboxes[settings.default_mailbox]  # the default route's
        self.scheduler = RoutedScheduler(self.spool, lanes, settings)
        # Why deliveries wait, for `relayd queue list` / `show` (another process).
        self.status_file = StatusFile(self.spool.directory)
        self.scheduler.set_on_pause(self._deliveries_paused)
        self.health = self._health_server(settings) if settings.metrics.enabled else None
        self.pid_file = PidFile(self.spool.directory / PID_FILE_NAME)
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
        if self.settings.upstream.transport == "maildir":
            log.info(
                "mail goes into a local Maildir, never to Microsoft 365",
                maildir=str(self.settings.upstream.maildir),
                spool=str(self.spool.directory),
                config=self.settings.source,
            )
        await asyncio.to_thread(self._lock_spool)
        await self._start_health()
        self.phase = "recovering"
        report = await asyncio.to_thread(self.spool.recover)
        await self.spool.start_writers()  # after recovery has emptied tmp/
        census = self.spool.census()
        log.info(
            "spool recovered",
            directory=str(self.spool.directory),
            **report,
            queued=sum(census.messages[s] for s in ("incoming", "deferred", "hold")),
        )
        for tokens in self.mailboxes.values():
            if tokens is not None:
                await self._start_tokens(tokens)
        await self._start_listener()
        self.status_file.start()
        await self.scheduler.start()
        self._tasks.append(asyncio.create_task(self._update_gauges(), name="gauges"))
        self.ready, self.phase = True, "ready"
        self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
        self._start_systemd_tasks()
        log.info(
            "relayd ready",
            listen=f"{self.settings.listen.address}:{self.listener.bound_port}",
            startup_seconds=round(time.monotonic() - started, 3),
        )

    async def shutdown(self) -> None:
        self.ready, self.phase = False, "stopping"
        self.notifier.notify("STOPPING=1")
        log.info("shutting down", grace_seconds=self.settings.listen.shutdown_grace)
        # One grace period for both: deliveries go on while the sessions finish, and
        # systemd's TimeoutStopSec= is sized for one grace period, not two.
        grace = self.settings.listen.shutdown_grace
        deadline = time.monotonic() + grace
        await self.listener.stop(grace)
        await self.spool.stop_writers()  # every session has had its reply
        await self.scheduler.stop(max(MIN_DELIVERY_GRACE, deadline - time.monotonic()))
        for tokens in self.mailboxes.values():
            if tokens is not None:
                await tokens.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._refresh_gauges()
        await self.status_file.stop()
        if self.health is not None:
            await self.health.stop()
        self.pid_file.release()
        log.info("stopped")
        self.notifier.close()

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply what can change safely, keep the rest.

        A file that does not load (bad YAML, a bad value) changes nothing at all.
        """
        if self.config_path is None:
            log.warning("reload ignored: no configuration file (sandbox or defaults)")
            return
        try:
            loaded = self._load_config(self.config_path)
        except ConfigError as error:
            log.error("reload refused; keeping the running configuration", error=str(error))
            return
        new, kept = merge_reload(self.settings, loaded)
        if kept:
            log.warning("these settings need a restart; keeping the running values", keys=kept)
        _register_secrets(new)
        relay_logging.set_level(new.logging.level)
        self.listener.reconfigure(new.listen)
        self.scheduler.reconfigure(config.mailbox_settings(new))
        self.settings = new
        log.info("configuration reloaded", file=str(self.config_path), log_level=new.logging.level)

    def rescan(self) -> None:
        """SIGUSR1 (from `relayd queue`): the operator changed the spool; look again."""
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.create_task(self._rescan(), name="rescan"))

    def mailbox_report(self) -> dict[str, dict[str, object]]:
        """Every mailbox's auth state, circuit and pause (/readyz), with routes only."""
        if not self.settings.routes:
            return {}
        report = self.scheduler.report()
        for key, tokens in self.mailboxes.items():
            report[key] = {"auth": tokens.state if tokens is not None else None, **report[key]}
        return report

    def status_line(self) -> str:
        census = self.spool.census()
        held, failed = census.messages["hold"], census.messages["failed"]
        auth = self.tokens.state if self.tokens is not None else "n/a"
        if self.settings.routes:  # every mailbox's, the default first
            states = [f"{self.settings.default_mailbox} {auth}"] + [
                f"{key} {tokens.state if tokens is not None else 'n/a'}"
                for key, tokens in self.mailboxes.items()
                if key != self.settings.default_mailbox
            ]
            auth = ", ".join(states)
        return f"queue {census.pending}, hold {held}, failed {failed}, auth {auth}"

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
        loop.add_signal_handler(signal.SIGUSR1, self.rescan)

    def _lock_spool(self) -> None:
        """Before recovery: recovery moves active/ back, which must never happen under
        another daemon's feet."""
        directory = self.spool.directory
        try:
            self.spool.ensure_layout()
            problem = self.spool.exposure()  # others could plant links or FIFOs in it
            if problem:
                raise ConfigError(self.settings.source, "spool.directory", problem)
            self.pid_file.acquire()
        except AlreadyRunning as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            raise StartupError(
                f"spool.directory: cannot use {directory}: {_os_reason(error, directory)}"
            ) from None

    async def _start_health(self) -> None:
        """A busy metrics port is one line, whatever server raised it and how."""
        if self.health is None:
            return
        metrics = self.settings.metrics
        try:
            await self.health.start()
        except OSError as error:
            where = f"{metrics.address}:{metrics.port}"
            raise StartupError(
                f"metrics.address/port: cannot listen on {where}: {_os_reason(error)}"
            ) from None

    async def _start_tokens(self, tokens: TokenManager) -> None:
        try:
            await tokens.start()
        except OSError as error:
            path = tokens.store.cache_path
            key = tokens.cache_setting
            raise StartupError(f"{key}: cannot use {path}: {_os_reason(error, path)}") from None

    async def _start_listener(self) -> None:
        listen = self.settings.listen
        try:
            await self.listener.start()
        except OSError as error:
            where = f"{listen.address}:{listen.port}"
            raise StartupError(
                f"cannot listen on {where} (listen.address/port): {_os_reason(error)}"
            ) from None

    def _start_systemd_tasks(self) -> None:
        if not self.notifier.enabled:
            return
        status = sdnotify.send_status(self.notifier, self.status_line)
        self._tasks.append(asyncio.create_task(status, name="sd-status"))
        interval = self.notifier.watchdog_interval()
        if interval:
            watchdog = sdnotify.send_watchdog(self.notifier, interval)
            self._tasks.append(asyncio.create_task(watchdog, name="sd-watchdog"))

    async def _rescan(self) -> None:
        census = await asyncio.to_thread(self.spool.take_census)
        self._refresh_gauges()
        self.scheduler.wake()
        log.info("spool rescanned on request", **census.messages)

    def _deliveries_paused(self, mailbox: str, reason: str | None, detail: str) -> None:
        """A route's scheduler paused or resumed deliveries (reason None): record it."""
        tokens = self.mailboxes.get(mailbox)
        advice = tokens.advice() if reason == AUTH and tokens is not None else None
        if mailbox == self.settings.default_mailbox:
            self.status_file.update(reason, detail, advice)
        if self.settings.routes:
            self.status_file.update_mailbox(mailbox, reason, detail, advice)

    def _queued(self, queue_id: str, sender: str) -> None:
        """A message was committed; delivery is started from here, by its route."""
        self.scheduler.notify_from(queue_id, sender)

    def _content_policy(self, envelope: Envelope, content: bytes) -> str | None:
        """End of DATA: the sender policy of the message's route may refuse a From: it
        cannot send as."""
        return self.scheduler.policy_for(envelope).refusal(envelope, content)

    async def _update_gauges(self) -> None:
        """Refresh the queue gauges every second and recount the spool every 30 s.

        A failure (an unreadable state directory, say) is logged once and retried: the
        gauges must not stop for good because of one error.
        """
        last_census = time.monotonic()
        failing = False
        while True:
            await asyncio.sleep(GAUGE_INTERVAL)
            try:
                due = time.monotonic() - last_census >= CENSUS_INTERVAL
                if due or self.spool.recount_wanted:
                    last_census = time.monotonic()  # a failing recount waits its turn too
                    await asyncio.to_thread(self.spool.take_census)
                self._refresh_gauges()
            except Exception as error:
                if not failing:
                    log.error(
                        "cannot update the queue gauges; retrying",
                        error=str(error) or type(error).__name__,
                        retry_in=CENSUS_INTERVAL,
                    )
                failing = True
                continue
            if failing:
                log.info("queue gauges updated again")
                failing = False

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


def _token_manager(
    settings: Settings,
    metrics: Metrics | MailboxMetrics,
    config_path: Path | None,
    route: bool,
    cache_key: str,
) -> TokenManager | None:
    """The mailbox's token manager; None for the maildir transport (signs in nowhere)."""
    if settings.upstream.transport not in MICROSOFT_TRANSPORTS:
        metrics.set_auth_state(NOT_USED)
        return None
    return TokenManager(
        settings,
        metrics,  # type: ignore[arg-type]
        config_path=config_path,
        login_mailbox=settings.upstream.mailbox if route else None,
        cache_setting=cache_key,
    )


def _token_cache_key(settings: Settings, mailbox: str) -> str:
    """The setting that names a mailbox's token cache, for a start-up error."""
    for index, route in enumerate(settings.routes):
        if route.key == mailbox.strip().lower():
            return f"routes[{index}].token_cache"
    return "oauth.token_cache"


def build_transport(settings: Settings, metrics: Metrics, tokens: TokenManager | None) -> Transport:
    """The transport ``upstream.transport`` names, each with its resource's tokens."""
    choice = settings.upstream.transport
    if choice == "maildir":
        return MaildirTransport(settings)
    assert tokens is not None, "Microsoft 365 transports need the token manager"
    if choice == "smtp":
        return SmtpTransport(settings, metrics, tokens.source("smtp"))
    large = tokens.source("graph_large") if tokens.has("graph_large") else None
    graph = GraphTransport(settings, metrics, tokens.source("graph"), large)
    if choice == "graph":
        metrics.using_transport("graph")
        return graph
    smtp = SmtpTransport(settings, metrics, tokens.source("smtp"))
    return AutoTransport(smtp, graph, settings, metrics, on_switch=tokens.lead_with)


def run(relay: Relay) -> None:
    """Serve on uvloop when it is installed, else on asyncio's own loop.

    uvloop's loop and transports cut the listener's CPU per accepted message by about
    a tenth (bench/README.md); relayd uses nothing that only one of the two loops has.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(relay.run())
        return
    uvloop.run(relay.run())


def _register_secrets(settings: Settings) -> None:
    """The client secret must never be printed, whatever path a line takes."""
    if settings.oauth.client_secret:
        relay_logging.redactor.register(settings.oauth.client_secret.reveal(), permanent=True)


def _os_reason(error: OSError, named: Path | None = None) -> str:
    """The system's words for an OSError, without Python's "[Errno 98]" decoration;
    with the path, unless it is the one the message names already."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.filename and str(error.filename) != str(named):
        return f"{reason} ({error.filename})"
    return reason

"""Several mailboxes: one scheduler per route, each message to its route's.

A route (``relayd.config.routes``) is a mailbox with its own tokens, transport,
circuit breaker and limits. Each route gets a whole ``Scheduler`` of its own: its own
ready lanes (oldest first within the route), its own delivery slots, rate limit and
daily budget, its own pauses. A route paused by a revoked token or by throttling
therefore holds back only its own mail: the other routes' schedulers never see its
messages, so none of them waits behind it (no head-of-line blocking).

Which route a message belongs to is decided by its envelope sender, looked up in a
``SenderIndex``: the listener tells the sender of each new message; scans of the
spool read the first line of a file whose sender is not known yet (once per message:
the envelope never changes). A file whose sender cannot be read belongs to the
default route, whose scheduler then meets it as it meets any unreadable file.

With one mailbox (no ``routes:``) there is one scheduler that owns everything: no
index, no header reads, exactly the single-mailbox relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping

from relayd.config import Settings
from relayd.config.routes import route_for
from relayd.delivery.giveway import ListenerFirst
from relayd.delivery.policy import SenderPolicy
from relayd.delivery.scheduler import Scheduler
from relayd.ops.metrics import Metrics
from relayd.queue.model import Envelope
from relayd.queue.spool import Spool
from relayd.transports.base import Transport

INDEX_LIMIT = 200_000  # senders kept in memory; beyond, the index starts afresh


class SenderIndex:
    """queue id → envelope sender (lower case), filled by the listener and by reading
    queue files' first lines. A plain dict: safe to share between the event loop
    and the scan threads (single item reads and writes)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._senders: dict[str, str] = {}
        self._reading = threading.Lock()

    def __len__(self) -> int:
        return len(self._senders)

    def remember(self, queue_id: str, sender: str) -> None:
        if len(self._senders) >= INDEX_LIMIT:
            self._senders = {}  # a cache: what is forgotten is read again when needed
        self._senders[queue_id] = sender.strip().lower()

    def known(self, queue_id: str) -> str | None:
        return self._senders.get(queue_id)

    def sender(self, queue_id: str, state: str) -> str | None:
        """Blocking when not known yet (one small read): call it in a thread. One
        reader at a time: the routes' first scans after a start meet the same unknown
        files, and each file is read once instead of once per route."""
        known = self._senders.get(queue_id)
        if known is not None:
            return known
        with self._reading:
            known = self._senders.get(queue_id)
            if known is not None:
                return known
            sender = self.spool.sender(state, queue_id)
            if sender is not None:
                self.remember(queue_id, sender)
            return sender


class Router:
    """Envelope sender → route name (``RouteSettings.key``; the default's otherwise)."""

    def __init__(self, settings: Settings) -> None:
        self.routes = settings.routes
        self.default = settings.default_mailbox

    def mailbox_for(self, sender: str | None) -> str:
        route = route_for(self.routes, sender or "")
        return route.key if route is not None else self.default


class RoutedScheduler:
    """The schedulers of every route, seen by the daemon as one."""

    def __init__(
        self,
        spool: Spool,
        lanes: Mapping[str, tuple[Settings, Transport, Metrics]],
        settings: Settings,
    ) -> None:
        """``lanes``: per route name, its settings (``config.route_settings``), its
        transport and its metrics (labelled with the route's mailbox)."""
        self.spool = spool
        self.router = Router(settings)
        self.index = SenderIndex(spool)
        self._single = len(lanes) == 1
        self.schedulers: dict[str, Scheduler] = {}
        listener_first = ListenerFirst()  # the listener's bursts narrow every route
        for key, (route_settings, transport, metrics) in lanes.items():
            self.schedulers[key] = Scheduler(
                spool,
                transport,
                route_settings,
                metrics,
                owns=None if self._single else self._owner(key),
                on_new_message=None if self._single else self.notify,
                mailbox=None if self._single else key,
                listener_first=listener_first,
            )
        self.default = self.schedulers[self.router.default]
        self._lookups: set[asyncio.Task] = set()

    def _owner(self, key: str) -> Callable[[str, str], bool]:
        def owns(queue_id: str, state: str) -> bool:
            return self.router.mailbox_for(self.index.sender(queue_id, state)) == key

        return owns

    # --- what the daemon asks --------------------------------------------------------

    @property
    def policy(self) -> SenderPolicy:
        """The default route's sender policy."""
        return self.default.policy

    def policy_for(self, envelope: Envelope) -> SenderPolicy:
        return self.scheduler_for(envelope.sender).policy

    def scheduler_for(self, sender: str | None) -> Scheduler:
        return self.schedulers[self.router.mailbox_for(sender)]

    @property
    def idle(self) -> bool:
        return all(scheduler.idle for scheduler in self.schedulers.values()) and not self._lookups

    @property
    def active_count(self) -> int:
        return sum(scheduler.active_count for scheduler in self.schedulers.values())

    @property
    def circuit_open(self) -> bool:
        """The default route's circuit (as /readyz showed it with one mailbox)."""
        return self.default.circuit_open

    def report(self) -> dict[str, dict[str, object]]:
        """Per route: whether its circuit is open and why its deliveries wait."""
        return {
            key: {
                "circuit": "open" if scheduler.circuit_open else "closed",
                "paused": scheduler.paused,
                "in_flight": scheduler.active_count,
            }
            for key, scheduler in self.schedulers.items()
        }

    def set_on_pause(self, hook: Callable[[str, str | None, str], None]) -> None:
        """``hook(route, reason, detail)`` whenever a route pauses or resumes."""
        for key, scheduler in self.schedulers.items():
            scheduler.on_pause = _for_route(hook, key)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.start()

    async def stop(self, grace: float) -> None:
        for task in list(self._lookups):
            task.cancel()
        await asyncio.gather(*(s.stop(grace) for s in self.schedulers.values()))

    def notify_from(self, queue_id: str, sender: str) -> None:
        """The listener committed a message from ``sender``: its route takes it."""
        if not self._single:
            self.index.remember(queue_id, sender)
        self.scheduler_for(sender).notify(queue_id)

    def notify(self, queue_id: str) -> None:
        """A message was committed by someone who did not say its sender (a DSN): it is
        looked up (in a thread) before its route is told."""
        if self._single:
            self.default.notify(queue_id)
            return
        known = self.index.known(queue_id)
        if known is not None:
            self.scheduler_for(known).notify(queue_id)
            return
        task = asyncio.get_running_loop().create_task(self._look_up(queue_id))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _look_up(self, queue_id: str) -> None:
        with contextlib.suppress(Exception):
            sender = await asyncio.to_thread(self.index.sender, queue_id, "incoming")
            self.scheduler_for(sender).notify(queue_id)
            return
        self.default.notify(queue_id)

    def wake(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.wake()

    def reconfigure(self, settings: Mapping[str, Settings]) -> None:
        """SIGHUP: each route's new settings (``config.mailbox_settings``)."""
        for key, scheduler in self.schedulers.items():
            if key in settings:
                scheduler.reconfigure(settings[key])


def _for_route(
    hook: Callable[[str, str | None, str], None], key: str
) -> Callable[[str | None, str], None]:
    return lambda reason, detail: hook(key, reason, detail)

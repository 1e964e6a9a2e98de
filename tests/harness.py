"""In-process delivery set-ups: a real spool and Scheduler over a chosen transport,
optionally behind the real listener (everything `relayd serve` runs, minus the token
module and the process around it)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relayd.config import Settings
from relayd.delivery.scheduler import Scheduler
from relayd.ops.metrics import Metrics
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from relayd.smtp.listener import Listener, RelayHandler
from relayd.transports.base import Transport
from relayd.transports.smtp import SmtpTransport
from tests.fakes.hostile import HostileUpstream
from tests.fakes.tokens import StandInTokens
from tests.helpers import deep_merge, load_settings, make_message

# Retries in tenths of a second, so outage and retry tests finish in seconds.
FAST_RETRY = {"min_delay": "0.1s", "max_delay": "0.2s", "max_age": "1h"}
HOSTILE_TIMEOUT = 0.5  # upstream.timeout against the hostile upstream; every stall outlasts it


class Harness:
    """A spool, metrics and a Scheduler feeding ``transport``."""

    def __init__(
        self, settings: Settings, transport: Callable[[Settings, Metrics], Transport] | Any
    ) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool.directory)
        self.spool.recover()
        self.metrics = Metrics(process=False)
        self.transport = transport(settings, self.metrics) if callable(transport) else transport
        self.scheduler = Scheduler(self.spool, self.transport, settings, self.metrics)

    async def start(self) -> Harness:
        await self.scheduler.start()
        return self

    async def stop(self) -> None:
        await self.scheduler.stop(1)

    async def queue(
        self,
        recipients: tuple[str, ...] = ("user@example.org",),
        sender: str = "app@example.com",
        *,
        content: bytes | None = None,
        notify: bool = True,
    ) -> str:
        """Commit a message to the spool as the listener would, and tell the scheduler."""
        queue_id = new_queue_id()
        envelope = Envelope(sender=sender, recipients=recipients, received_at=time.time())
        if content is None:
            content = make_message(sender=sender or "app@example.com", recipients=recipients)
        await self.spool.commit(queue_id, envelope, content)
        if notify:
            self.scheduler.notify(queue_id)
        return queue_id

    async def queue_many(self, count: int, **kwargs: Any) -> list[str]:
        return [await self.queue(**kwargs) for _ in range(count)]

    def settled(self, queue_id: str, state: str | None = None) -> bool:
        """``queue_id`` is in ``state`` (None: gone) and nothing is being delivered.

        Looked at twice: one listing can miss a file that moves while it is read (from
        a state not listed yet to one already listed, say deferred/ -> active/ as a
        retry is claimed), and once is enough for ``eventually`` to stop waiting."""
        return all(
            self.scheduler.active_count == 0 and self.state_of(queue_id) == state for _ in range(2)
        )

    def state_of(self, queue_id: str) -> str | None:
        for entry in self.spool.entries():
            if entry.queue_id == queue_id:
                return entry.state
        return None

    def queued(self) -> int:
        """Messages still to be delivered (incoming, active, deferred), from the spool's
        counters: a directory listing can miss a file that moves while it is read."""
        census = self.spool.census()
        return sum(census.messages[state] for state in ("incoming", "active", "deferred"))

    def drained(self) -> bool:
        """Nothing left to deliver and nothing in flight."""
        return self.scheduler.idle and self.queued() == 0

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


class InProcessRelay(Harness):
    """The Harness behind the real listener, wired as relayd.app wires it."""

    def __init__(
        self, settings: Settings, transport: Callable[[Settings, Metrics], Transport]
    ) -> None:
        super().__init__(settings, transport)
        self.handler = RelayHandler(
            settings.listen,
            self.spool,
            self.metrics,
            hostname="relay.test",
            on_queued=self.scheduler.notify,
            content_policy=lambda envelope, content: self.scheduler.policy.refusal(
                envelope, content
            ),
        )
        self.listener = Listener(self.handler, settings.listen, "relay.test")

    @property
    def port(self) -> int:
        return self.listener.bound_port

    async def start(self) -> InProcessRelay:
        await self.listener.start()
        await self.scheduler.start()
        return self

    async def stop(self) -> None:
        await self.listener.stop(1)
        await super().stop()


class SmtpHarnesses:
    """Builds Harnesses whose SmtpTransport delivers to ``fake`` (the fake Exchange or
    the hostile upstream: anything with ``relay_config``); ``stop`` stops them all."""

    def __init__(
        self, tmp_path: Path, fake: Any, tokens: StandInTokens, ca_file: Path, timeout: float
    ) -> None:
        self.tmp_path, self.fake, self.tokens, self.ca_file = tmp_path, fake, tokens, ca_file
        self.timeout = timeout
        self.harnesses: list[Harness] = []

    def __call__(self, retry: dict | None = None, **upstream: object) -> Harness:
        upstream = {
            "rate_limit_per_minute": 0,
            "timeout": f"{self.timeout}s",
            "throttle_pause": "0.3s",
            **upstream,
        }
        overrides = deep_merge(
            self.fake.relay_config(self.ca_file, **upstream), {"retry": retry or FAST_RETRY}
        )
        settings = load_settings(self.tmp_path, overrides)
        tokens = self.tokens
        harness = Harness(settings, lambda s, metrics: SmtpTransport(s, metrics, tokens))
        self.harnesses.append(harness)
        return harness

    async def stop(self) -> None:
        for harness in self.harnesses:
            await harness.stop()


@pytest.fixture
async def through_hostile(
    tmp_path: Path, hostile: HostileUpstream, standin_tokens: StandInTokens, ca_file: Path
) -> AsyncIterator[SmtpHarnesses]:
    """Harnesses whose SmtpTransport delivers to tests/fakes/hostile.py."""
    harnesses = SmtpHarnesses(tmp_path, hostile, standin_tokens, ca_file, HOSTILE_TIMEOUT)
    yield harnesses
    await harnesses.stop()

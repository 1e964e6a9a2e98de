"""`relayd serve` in front of the fake Microsoft 365, for tests that need the whole path.

``serve_config`` writes a configuration that delivers to a fake Exchange with tokens
from a fake Entra ID, and signs in first (the token cache then holds a refresh token,
as `relayd auth login` leaves it). The ``upstream`` and ``serve`` fixtures build on it
(tests/conftest.py imports them); the soak (tests/soak.py) uses it directly.
"""

from __future__ import annotations

import collections
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relayd import config
from relayd.queue.model import PENDING_STATES
from tests.auth_helpers import auth_overrides, sign_in
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange, ReceivedMessage
from tests.fakes.graph import FakeGraph
from tests.harness import FAST_RETRY
from tests.helpers import RelayProcess, deep_merge, eventually, scrape, write_config

MESSAGE_ID = re.compile(rb"^Message-ID: (\S+)\r\n", re.MULTILINE | re.IGNORECASE)


def serve_config(
    tmp_path: Path,
    entra: FakeEntra,
    exchange: FakeExchange,
    ca_file: Path,
    overrides: dict | None = None,
    **upstream_settings: Any,
) -> Path:
    """A relayd config delivering to ``exchange`` (rate limit off, fast retries), after
    a sign-in through ``entra``; ``overrides`` are merged over it."""
    settings = {"rate_limit_per_minute": 0, "throttle_pause": "0.5s", **upstream_settings}
    document = {
        "upstream": exchange.relay_config(ca_file, **settings)["upstream"],
        "oauth": auth_overrides(tmp_path, entra, ca_file)["oauth"],
        "retry": FAST_RETRY,
    }
    path = write_config(tmp_path, deep_merge(document, overrides or {}))
    assert sign_in(config.load(path), ca_file).ok
    return path


class Served:
    """Starts `relayd serve` processes against the fixtures' fakes; kills them at the end."""

    def __init__(
        self, tmp_path: Path, entra: FakeEntra, exchange: FakeExchange, ca_file: Path
    ) -> None:
        self.tmp_path, self.entra, self.exchange, self.ca_file = tmp_path, entra, exchange, ca_file
        self.processes: list[RelayProcess] = []

    def __call__(self, overrides: dict | None = None, **upstream_settings: Any) -> RelayProcess:
        path = serve_config(
            self.tmp_path, self.entra, self.exchange, self.ca_file, overrides, **upstream_settings
        )
        return self.restart(path)

    def restart(self, config_path: Path) -> RelayProcess:
        """Another `relayd serve` on the same configuration (and spool)."""
        relay = RelayProcess(config_path).start()
        self.processes.append(relay)
        return relay

    def kill_all(self) -> None:
        for relay in self.processes:
            relay.kill()


@pytest.fixture
async def upstream(ca: trustme.CA, entra: FakeEntra) -> AsyncIterator[FakeExchange]:
    """The fake Exchange, accepting exactly the access tokens the fake Entra ID issued."""
    fake = FakeExchange(ca, validator=entra.is_valid_access_token, mailbox=MAILBOX)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def graph_api(ca: trustme.CA, entra: FakeEntra) -> AsyncIterator[FakeGraph]:
    """The fake Microsoft Graph, accepting the fake Entra ID's Graph tokens only."""
    fake = await FakeGraph(ca, grant=entra.token_grant, mailbox=MAILBOX).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def serve(
    tmp_path: Path, entra: FakeEntra, upstream: FakeExchange, ca_file: Path
) -> AsyncIterator[Served]:
    """``serve(overrides, **upstream_settings)`` starts `relayd serve` after a sign-in."""
    served = Served(tmp_path, entra, upstream, ca_file)
    yield served
    served.kill_all()


# --- what arrived and what is left -------------------------------------------------------


def arrivals(messages: list[ReceivedMessage]) -> collections.Counter[bytes]:
    """How often each Message-ID reached the fake Exchange."""
    return collections.Counter(MESSAGE_ID.search(m.content).group(1) for m in messages)


def message_id_of(content: bytes) -> bytes:
    return MESSAGE_ID.search(content).group(1)


def waiting_and_failed(relay: RelayProcess) -> tuple[float, float]:
    """(messages still waiting for delivery, messages failed for good) from a scrape."""
    metrics = scrape(relay.metrics_port)
    waiting = sum(metrics.value("relayd_queue_messages", state=s) for s in PENDING_STATES)
    failed = sum(
        value
        for (name, _), value in metrics.samples.items()
        if name == "relayd_messages_failed_total"
    )
    return waiting, failed


async def until_delivered(
    relay: RelayProcess, exchange: FakeExchange, count: int, timeout: float = 30.0
) -> None:
    """Until ``count`` messages reached the fake and nothing waits in the relay's queue."""
    await eventually(
        lambda: len(exchange.messages) >= count and waiting_and_failed(relay)[0] == 0,
        timeout,
        f"{count} messages delivered and the queue empty",
        interval=0.1,
    )

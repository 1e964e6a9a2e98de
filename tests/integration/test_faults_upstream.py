"""Fault matrix, upstream side: `relayd serve` (a subprocess, signed in through the fake
Entra ID with real MSAL) delivering to the fake Exchange Online while it is down,
flapping, slow or throttling, and while the token endpoint is down.

Everywhere: nothing is lost or failed, and once the fault ends every message arrives
exactly once. While the upstream is unusable the circuit breaker lets one probe
through per configured pause, so the connection attempts the fake counts during an
outage stay under a bound computed from that pause and the outage's length (a slow
machine only makes fewer attempts; nothing here asserts a speed).

The rest of the matrix: SIGKILL in test_faults_kill.py, spool trouble in
test_faults_spool.py, revocation and a new `relayd auth login` (with the auth gauges)
in test_observability.py; ECONNREFUSED outages in test_serve_exchange.py and
test_smtp_delivery.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
import structlog.testing

from relayd import config
from relayd.ops.auth_states import AUTH_STATES
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import SERVICE_UNAVAILABLE, TOO_MANY_CONNECTIONS, FakeExchange
from tests.fakes.hostile import (
    ENDLESS,
    ENDLESS_LIMIT,
    GARBAGE,
    HANG_UP,
    HUGE,
    HostileUpstream,
)
from tests.harness import HOSTILE_TIMEOUT, Harness
from tests.helpers import (
    RelayProcess,
    eventually,
    numbered_message,
    scrape,
    send_messages,
)
from tests.serving import Served, arrivals, until_delivered, waiting_and_failed

COUNT = 20  # messages sent while each fault lasts
OUTAGE = 1.5  # seconds each fault lasts (minutes or hours in production; the same logic)
UPSTREAM_TIMEOUT = 1.0  # upstream.timeout; the slow upstream answers slower than this
SENDER = "app@example.com"


@dataclass(frozen=True)
class Fault:
    start: Callable[[FakeExchange], None]
    reason: str  # relayd_messages_deferred_total{reason} the fault must show up as
    throttled: bool  # the pause between probes: upstream.throttle_pause, else retry.min_delay


def _slow(fake: FakeExchange) -> None:
    fake.reply_delay = UPSTREAM_TIMEOUT * 1.5  # the greeting too


FAULTS = {
    # Accepts and hangs up before the greeting: like a refused connection to relayd,
    # but the fake can count every attempt.
    "down": Fault(lambda fake: fake.drop("connect"), "connection", throttled=False),
    "slow": Fault(_slow, "timeout", throttled=False),
    "421": Fault(lambda fake: fake.fail("connect", SERVICE_UNAVAILABLE), "throttled", True),
    "432 4.3.2": Fault(lambda fake: fake.fail("auth", TOO_MANY_CONNECTIONS), "throttled", True),
}


def batch(count: int, tag: str) -> list[tuple[str, list[str], bytes]]:
    return [(SENDER, ["user@example.org"], numbered_message(n, 1024, tag)) for n in range(count)]


async def deliver(relay: RelayProcess, upstream: FakeExchange, count: int, tag: str) -> None:
    """Send ``count`` messages (each must get a 250) and wait until all have arrived."""
    arrived = len(upstream.messages)
    replies = await send_messages(relay.port, batch(count, tag))
    assert all(reply.startswith("2.0.0 Ok: queued as") for reply in replies), replies
    await until_delivered(relay, upstream, arrived + count)


def check_nothing_lost_or_failed(relay: RelayProcess, upstream: FakeExchange, total: int) -> None:
    counts = arrivals(upstream.messages)
    assert len(counts) == total, f"{total - len(counts)} messages never arrived"
    assert set(counts.values()) == {1}, "a message arrived twice"
    assert waiting_and_failed(relay) == (0, 0)
    assert list((Path(relay.config["spool"]["directory"]) / "failed").iterdir()) == []


def deferred(relay: RelayProcess, reason: str) -> float:
    return scrape(relay.metrics_port).value("relayd_messages_deferred_total", reason=reason)


@pytest.mark.parametrize("name", list(FAULTS))
async def test_upstream_fault_loses_nothing_and_is_probed_once_per_pause(
    name: str, serve: Served, upstream: FakeExchange
) -> None:
    fault = FAULTS[name]
    relay = serve(timeout=f"{UPSTREAM_TIMEOUT}s")
    settings = config.load(relay.config_path)
    await deliver(relay, upstream, 1, "warm-up")  # the pool now holds a session
    # The upstream restarts into the fault: open sessions are cut, new ones meet it.
    await upstream.go_down()
    fault.start(upstream)
    await upstream.come_up()
    before, started = upstream.stats.connections_total, time.monotonic()

    replies = await send_messages(relay.port, batch(COUNT, "fault"))
    await asyncio.sleep(OUTAGE)
    attempts, outage = upstream.stats.connections_total - before, time.monotonic() - started
    assert upstream.messages[1:] == []  # nothing got through the fault
    upstream.clear()
    await until_delivered(relay, upstream, 1 + COUNT)

    assert all(reply.startswith("2.0.0 Ok: queued as") for reply in replies), replies
    check_nothing_lost_or_failed(relay, upstream, 1 + COUNT)
    assert deferred(relay, fault.reason) >= 1  # the fault was met and understood
    pause = settings.upstream.throttle_pause if fault.throttled else settings.retry.min_delay
    # The first wave may use every pool slot; after that one probe per pause, at most.
    bound = settings.upstream.max_connections + math.floor(outage / pause) + 1
    unthrottled = COUNT * math.ceil(outage / settings.retry.min_delay)
    print(
        f"\n{name}: {attempts} connection attempts in a {outage:.1f}s outage (bound {bound},"
        f" pause {pause}s); each message retried every retry.min_delay on its own:"
        f" ~{unthrottled}"
    )
    assert 1 <= attempts <= bound


async def test_flapping_upstream_loses_nothing_and_reconnects_only_to_replace(
    serve: Served, upstream: FakeExchange
) -> None:
    relay = serve()
    max_connections = config.load(relay.config_path).upstream.max_connections
    await deliver(relay, upstream, 1, "warm-up")
    # The upstream restarts flapping: every third connection is cut at the end of DATA.
    await upstream.go_down()
    upstream.drop_every = 3
    upstream.reply_delay = 0.01  # deliveries overlap, so the pool opens all its sessions
    await upstream.come_up()
    connections, drops = upstream.stats.connections_total, upstream.stats.dropped

    replies = await send_messages(relay.port, batch(2 * COUNT, "flapping"), connections=4)
    await until_delivered(relay, upstream, 1 + 2 * COUNT)

    assert all(reply.startswith("2.0.0 Ok: queued as") for reply in replies), replies
    opened = upstream.stats.connections_total - connections
    dropped = upstream.stats.dropped - drops
    print(f"\nflapping: {dropped} connections dropped, {opened} opened for {2 * COUNT} messages")
    assert dropped >= 1
    # Sessions are reused; a new one only replaces one the server cut (no reconnect storm).
    assert opened <= max_connections + dropped
    assert deferred(relay, "connection") == dropped  # each cut message was retried
    check_nothing_lost_or_failed(relay, upstream, 1 + 2 * COUNT)


def auth_state(relay: RelayProcess) -> str:
    metrics = scrape(relay.metrics_port)
    (state,) = [s for s in AUTH_STATES if metrics.value("relayd_auth_state", state=s) == 1]
    return state


async def test_token_endpoint_down_then_back_deliveries_resume_by_themselves(
    serve: Served, upstream: FakeExchange, entra: FakeEntra
) -> None:
    entra.access_token_lifetime = 4  # renewed every 2 s: an Entra ID outage soon shows
    relay = serve()
    await deliver(relay, upstream, 1, "warm-up")

    entra.down = True
    await eventually(lambda: auth_state(relay) == "unavailable", 20, interval=0.1)
    replies = await send_messages(relay.port, batch(COUNT, "no-token"))
    await asyncio.sleep(1)  # held back: no access token to authenticate with
    assert upstream.messages[1:] == []
    renewals = entra.requests["token:refresh_token"]

    entra.down = False  # nobody signs in or restarts anything
    await until_delivered(relay, upstream, 1 + COUNT)

    assert all(reply.startswith("2.0.0 Ok: queued as") for reply in replies), replies
    assert entra.requests["token:refresh_token"] > renewals
    assert auth_state(relay) in ("ok", "refreshing")
    assert relay.process.poll() is None  # the same process throughout
    check_nothing_lost_or_failed(relay, upstream, 1 + COUNT)


# --- the hostile upstream -------------------------------------------------------------
#
# SmtpTransport + Scheduler in this process (as test_smtp_delivery.py runs them),
# delivering to tests/fakes/hostile.py: an upstream that answers the final dot late,
# refuses the DATA command, hangs up after the dot, talks garbage or never stops
# talking, and stalls in the TLS handshake.

SLOW_WINDOW = 6.0  # how long the slow final-reply test watches for copies


async def settled_within(h: Harness, queue_id: str, seconds: float, state: str | None = None):
    with contextlib.suppress(AssertionError):
        await eventually(lambda: h.settled(queue_id, state), seconds)


async def test_slow_final_reply_is_waited_for_and_the_message_sent_once(
    through_hostile, hostile: HostileUpstream
) -> None:
    # The reply to the final dot takes four times upstream.timeout (a busy Exchange,
    # a big message). RFC 5321 §4.5.3.2.6: wait for it (10 minutes by default).
    hostile.final_reply_delay = 4 * HOSTILE_TIMEOUT
    h = await through_hostile().start()
    started = time.monotonic()
    queue_id = await h.queue()
    await settled_within(h, queue_id, SLOW_WINDOW)
    copies = len(hostile.messages)
    print(
        f"\nfinal reply after {hostile.final_reply_delay}s, upstream.timeout"
        f" {HOSTILE_TIMEOUT}s: {copies} copies sent upstream in"
        f" {time.monotonic() - started:.1f}s"
    )
    assert h.settled(queue_id), "the message was never delivered"
    assert copies == 1
    assert h.metric("relayd_messages_deferred_total", reason="timeout") == 0


@pytest.mark.parametrize(
    "refusal",
    ["451 4.3.2 Please try again later", "554 5.5.1 Error: no valid recipients"],
)
async def test_refused_data_command_never_poisons_the_next_message(
    through_hostile, hostile: HostileUpstream, refusal: str
) -> None:
    hostile.refuse_data = refusal  # answered instead of 354: the transaction stays open
    h = await through_hostile(max_connections=1).start()
    first = await h.queue(sender="")  # no DSN for the 554 case: one message to follow
    refused = "failed" if refusal.startswith("5") else "deferred"
    await eventually(lambda: h.settled(first, refused), 5)
    hostile.refuse_data = None
    second = await h.queue(sender="")
    await eventually(lambda: h.settled(second), 5)
    assert hostile.connections == 1  # the same session carried the next message ...
    assert hostile.nested_mail == 0  # ... after an RSET, not into a 503 nested MAIL
    assert hostile.resets >= 1
    assert [m.recipients for m in hostile.messages][-1] == ("user@example.org",)
    assert h.metric("relayd_messages_failed_total", reason="rejected") == (
        1 if refusal.startswith("5") else 0
    )


async def test_drop_after_the_dot_is_counted_as_ambiguous_and_retried(
    through_hostile, hostile: HostileUpstream
) -> None:
    hostile.drop_after_dot = True
    h = await through_hostile().start()
    with structlog.testing.capture_logs() as logs:
        queue_id = await h.queue()
        await eventually(lambda: h.metric("relayd_upstream_ambiguous_total") == 1, 5)
        hostile.behave()
        await eventually(lambda: h.settled(queue_id), 5)
    assert len(hostile.messages) == 2  # the copy that may have gone, and the retry
    (warning,) = [e for e in logs if "may have been delivered" in e["event"]]
    assert warning["queue_id"] == queue_id
    assert h.metric("relayd_messages_delivered_total") == 1


@pytest.mark.parametrize(
    ("stage", "mode"),
    [
        ("greeting", GARBAGE),
        ("ehlo", ENDLESS),
        ("mail", GARBAGE),
        ("mail", ENDLESS),
        ("mail", HANG_UP),
        ("rcpt", GARBAGE),
        ("rcpt", HUGE),
        ("rcpt", HANG_UP),
        ("data", GARBAGE),
        ("data", HANG_UP),
        ("dot", GARBAGE),
        ("dot", ENDLESS),
        ("dot", HUGE),
    ],
)
@pytest.mark.parametrize("pipelining", [False, True], ids=["one at a time", "pipelined"])
async def test_garbage_and_endless_replies_end_in_a_deferral(
    through_hostile, hostile: HostileUpstream, stage: str, mode: str, pipelining: bool
) -> None:
    # Pipelined (RFC 2920), MAIL, RCPT and DATA went in one write: what any of their
    # replies does to the session must mean what it means one command at a time.
    hostile.pipelining = pipelining
    hostile.misreply[stage] = mode
    h = await through_hostile().start()
    started = time.monotonic()
    queue_id = await h.queue(sender="app@example.com")
    await eventually(
        lambda: h.scheduler.active_count == 0 and h.state_of(queue_id) == "deferred", 5
    )
    elapsed = time.monotonic() - started
    print(f"\n{mode} reply at {stage}: deferred after {elapsed:.2f}s, {hostile.sent_bytes} bytes")
    # Never a bounce for what the upstream could not say; relayd hung up on the flood
    # (aiosmtplib keeps at most 32 KiB of one reply) long before the fake's own bound.
    assert h.metric("relayd_dsn_sent_total") == 0
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0
    assert hostile.sent_bytes < ENDLESS_LIMIT
    hostile.behave()
    await eventually(lambda: h.settled(queue_id), 5)  # a fresh session, not the confused one
    assert hostile.messages[-1].recipients == ("user@example.org",)


async def test_tls_handshake_stall_is_bounded_by_the_timeout(
    through_hostile, hostile: HostileUpstream
) -> None:
    hostile.tls_stall = True
    h = await through_hostile().start()
    started = time.monotonic()
    queue_id = await h.queue()
    await eventually(lambda: h.metric("relayd_messages_deferred_total", reason="timeout") == 1, 5)
    assert time.monotonic() - started < HOSTILE_TIMEOUT + 2
    hostile.behave()
    await eventually(lambda: h.settled(queue_id), 5)
    assert len(hostile.messages) == 1

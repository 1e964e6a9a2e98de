"""The scheduler over a real spool, with a scripted transport standing in for the upstream."""

from __future__ import annotations

import asyncio
import email
import threading
import time
from collections.abc import AsyncIterator, Callable
from email import policy as email_policy
from pathlib import Path

import pytest
import structlog
import structlog.testing

from relayd.delivery import ready
from relayd.delivery.ready import ReadyQueue
from relayd.queue.model import new_queue_id
from relayd.transports.base import (
    AUTH,
    DAILY_LIMIT,
    NOTHING,
    TEMPORARY,
    THROTTLED,
    Attempt,
    Blocked,
    Submission,
)
from tests.harness import FAST_RETRY, Harness
from tests.helpers import eventually, load_settings

Step = Callable[[Submission], Attempt]


def delivered(submission: Submission) -> Attempt:
    return Attempt(delivered=submission.recipients, reply="250 2.0.0 OK <id@upstream>")


def temporary(submission: Submission) -> Attempt:
    return Attempt.deferred_all(submission.recipients, TEMPORARY, "451 4.7.500 Server busy")


def half(submission: Submission) -> Attempt:
    """a@ delivered, b@ deferred."""
    return Attempt(
        delivered=("a@example.org",),
        deferred=("b@example.org",),
        reason=TEMPORARY,
        reply="451 try later",
    )


def rejected(submission: Submission) -> Attempt:
    reply = "550 5.1.10 RESOLVER.ADR.RecipientNotFound"
    return Attempt(failed=tuple((r, reply) for r in submission.recipients), reply=reply)


class ScriptedTransport:
    """A Transport whose answers a test chooses: the next step, else ``default``."""

    def __init__(self, *, rate_limited: bool = False, concurrency: int = 2) -> None:
        self.rate_limited = rate_limited
        self.concurrency = concurrency
        self.calls: list[Submission] = []
        self.script: list[Step] = []
        self.default: Step = delivered
        self.block: Blocked | None = None
        self.available = asyncio.Event()
        self.gate: asyncio.Event | None = None  # when set up, deliveries wait for it
        self.delay = 0.0  # seconds each delivery takes
        self.closed = False

    def blocked(self) -> Blocked | None:
        return self.block

    async def wait_until_available(self) -> None:
        await self.available.wait()

    async def deliver(self, submission: Submission) -> Attempt:
        self.calls.append(submission)
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        step = self.script.pop(0) if self.script else self.default
        return step(submission)

    def reconfigure(self, settings: object) -> None:
        pass

    async def close(self) -> None:
        self.closed = True

    def to(self, recipient: str) -> list[Submission]:
        return [call for call in self.calls if recipient in call.recipients]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    """Harnesses over a ScriptedTransport, with fast retries; stopped at the end."""
    harnesses: list[Harness] = []

    def build(transport: ScriptedTransport | None = None, **overrides: dict) -> Harness:
        settings = load_settings(tmp_path, {"retry": FAST_RETRY, **overrides})
        harness = Harness(settings, transport or ScriptedTransport())
        harnesses.append(harness)
        return harness

    yield build
    for harness in harnesses:
        await harness.stop()


async def test_new_message_is_delivered_and_forgotten(make) -> None:
    h = make()
    await h.scheduler.start()
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id))
    assert [c.queue_id for c in h.transport.calls] == [queue_id]
    assert h.metric("relayd_messages_delivered_total") == 1


async def test_messages_already_queued_are_found_at_start(make) -> None:
    h = make()
    ids = [await h.queue(notify=False) for _ in range(3)]
    await h.scheduler.start()
    await eventually(h.drained)
    assert sorted(c.queue_id for c in h.transport.calls) == sorted(ids)


async def test_temporary_failure_is_retried_after_the_delay(make) -> None:
    h = make()
    h.transport.script = [temporary]
    await h.scheduler.start()
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id))
    assert len(h.transport.calls) == 2
    assert h.metric("relayd_messages_deferred_total", reason=TEMPORARY) == 1
    assert h.metric("relayd_messages_delivered_total") == 1


async def test_permanent_failure_is_kept_and_the_sender_gets_one_dsn(make) -> None:
    h = make()
    h.transport.script = [rejected]
    await h.scheduler.start()
    queue_id = await h.queue(sender="app@example.com")
    await eventually(lambda: len(h.transport.to("app@example.com")) == 1)
    await eventually(lambda: h.settled(queue_id, "failed"))  # the DSN is queued first
    _, failed = h.spool.find(queue_id)
    assert failed.state.failed_recipients[0][0] == "user@example.org"
    dsn = h.transport.to("app@example.com")[0]
    assert dsn.mail_from == ""  # the null reverse-path: no DSN about this DSN
    report = email.message_from_bytes(dsn.content, policy=email_policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "user@example.org" in dsn.content.decode()
    assert h.metric("relayd_dsn_sent_total") == 1
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 1
    await asyncio.sleep(0.3)
    assert len(h.transport.calls) == 2  # the message once, its DSN once


async def test_failing_dsn_does_not_produce_another(make) -> None:
    h = make()
    h.transport.default = rejected
    await h.scheduler.start()
    await h.queue(sender="app@example.com")
    await eventually(lambda: h.metric("relayd_messages_failed_total", reason="rejected") == 2)
    await asyncio.sleep(0.3)
    assert len(h.transport.calls) == 2 and h.metric("relayd_dsn_sent_total") == 1


async def test_null_sender_gets_no_dsn(make) -> None:
    h = make()
    h.transport.script = [rejected]
    await h.scheduler.start()
    queue_id = await h.queue(sender="")
    await eventually(lambda: h.settled(queue_id, "failed"))
    await asyncio.sleep(0.3)
    assert len(h.transport.calls) == 1 and h.metric("relayd_dsn_sent_total") == 0


async def test_partial_refusal_delivers_the_others_and_reports_only_the_refused(make) -> None:
    h = make()

    def one_refused(submission: Submission) -> Attempt:
        return Attempt(
            delivered=("good@example.org",),
            failed=(("bad@example.org", "550 5.1.10 not found"),),
            reply="250 2.0.0 OK",
        )

    h.transport.script = [one_refused]
    await h.scheduler.start()
    queue_id = await h.queue(recipients=("good@example.org", "bad@example.org"))
    await eventually(lambda: len(h.transport.to("app@example.com")) == 1)
    await eventually(lambda: h.settled(queue_id, "failed"))
    dsn = h.transport.to("app@example.com")[0].content.decode()
    assert "Final-Recipient: rfc822; bad@example.org" in dsn
    assert "Final-Recipient: rfc822; good@example.org" not in dsn
    _, kept = h.spool.find(queue_id)
    assert kept.state.done_recipients == ("good@example.org",)


async def test_deferred_recipients_are_retried_alone(make) -> None:
    h = make()
    h.transport.script = [half]
    await h.scheduler.start()
    queue_id = await h.queue(recipients=("a@example.org", "b@example.org"))
    await eventually(lambda: h.settled(queue_id))
    assert h.transport.calls[1].recipients == ("b@example.org",)


async def test_held_message_is_never_attempted(make) -> None:
    h = make()
    queue_id = await h.queue(notify=False)
    h.spool.move(queue_id, "incoming", "hold")
    await h.scheduler.start()
    h.scheduler.notify(queue_id)
    h.scheduler.wake()
    await asyncio.sleep(0.3)
    assert h.transport.calls == [] and h.state_of(queue_id) == "hold"


async def test_message_expires_after_max_age(make) -> None:
    h = make(retry={"min_delay": "0.05s", "max_delay": "0.1s", "max_age": "0.4s"})
    h.transport.default = temporary
    await h.scheduler.start()
    queue_id = await h.queue(sender="app@example.com")
    await eventually(lambda: h.settled(queue_id, "failed"))
    assert h.metric("relayd_messages_failed_total", reason="expired") == 1
    await eventually(lambda: len(h.transport.to("app@example.com")) >= 1)
    assert "Status: 5.4.7" in h.transport.to("app@example.com")[0].content.decode()


async def test_auth_deferrals_never_expire(make) -> None:
    h = make(retry={"min_delay": "0.05s", "max_delay": "0.1s", "max_age": "0.2s"})

    def auth_refused(submission: Submission) -> Attempt:
        return Attempt.deferred_all(submission.recipients, AUTH, "535 5.7.3 unsuccessful")

    h.transport.default = auth_refused
    await h.scheduler.start()
    queue_id = await h.queue()
    await eventually(lambda: len(h.transport.calls) >= 6)
    assert h.state_of(queue_id) in ("deferred", "active")
    assert h.metric("relayd_messages_failed_total", reason="expired") == 0
    assert h.metric("relayd_dsn_sent_total") == 0


async def test_stop_gives_abandoned_messages_back_untouched(make) -> None:
    h = make()
    h.transport.gate = asyncio.Event()  # the upstream never answers
    await h.scheduler.start()
    queue_id = await h.queue()
    await eventually(lambda: len(h.transport.calls) == 1)
    assert h.state_of(queue_id) == "active"
    await h.scheduler.stop(0.1)
    assert h.state_of(queue_id) == "incoming"
    _, message = h.spool.find(queue_id)
    assert message.state.attempts == 0 and h.transport.closed


async def test_stop_lets_transactions_in_flight_finish(make) -> None:
    h = make()
    h.transport.gate = asyncio.Event()
    await h.scheduler.start()
    queue_id = await h.queue()
    await eventually(lambda: len(h.transport.calls) == 1)
    stopping = asyncio.ensure_future(h.scheduler.stop(5))
    await asyncio.sleep(0.05)
    h.transport.gate.set()
    await stopping
    assert h.state_of(queue_id) is None


async def test_rate_limit_keeps_the_excess_in_the_spool(make) -> None:
    h = make(ScriptedTransport(rate_limited=True), upstream={"rate_limit_per_minute": 3})
    await h.scheduler.start()
    await h.queue_many(5)
    await eventually(lambda: len(h.transport.calls) == 3)
    await asyncio.sleep(0.3)
    assert len(h.transport.calls) == 3
    census = h.spool.census()
    assert census.messages["incoming"] == 2 and census.messages["deferred"] == 0
    assert h.metric("relayd_rate_limit_tokens") == 0


async def test_rate_limit_off_with_zero(make) -> None:
    h = make(ScriptedTransport(rate_limited=True), upstream={"rate_limit_per_minute": 0})
    await h.scheduler.start()
    await h.queue_many(40)
    await eventually(lambda: len(h.transport.calls) == 40)


async def test_daily_budget_postpones_without_counting_an_attempt(make) -> None:
    transport = ScriptedTransport(rate_limited=True)
    h = make(transport, upstream={"rate_limit_per_minute": 0, "daily_recipient_limit": 3})
    await h.scheduler.start()
    first = await h.queue(recipients=("a@x.org", "b@x.org"))
    await eventually(lambda: h.settled(first))
    second = await h.queue(recipients=("c@x.org", "d@x.org"))
    await eventually(lambda: h.settled(second, "deferred"))
    _, waiting = h.spool.find(second)
    assert waiting.state.attempts == 0 and len(transport.calls) == 1
    (entry,) = [e for e in h.spool.entries(("deferred",)) if e.queue_id == second]
    assert entry.next_attempt is not None and entry.next_attempt > time.time() + 3600
    assert h.metric("relayd_messages_deferred_total", reason=DAILY_LIMIT) == 1
    assert h.metric("relayd_daily_recipients_used") == 2


async def test_spent_daily_budget_is_logged_once_as_a_pause(make) -> None:
    transport = ScriptedTransport(rate_limited=True)
    h = make(transport, upstream={"rate_limit_per_minute": 0, "daily_recipient_limit": 1})
    with structlog.testing.capture_logs() as logs:
        await h.scheduler.start()
        first = await h.queue()
        await eventually(lambda: h.settled(first))
        await h.queue()
        await asyncio.sleep(0.3)  # several dispatch rounds while the budget is spent
    pauses = [entry for entry in logs if entry["event"] == "deliveries paused"]
    assert [entry["reason"] for entry in pauses] == [DAILY_LIMIT]
    assert "daily recipient limit reached" in pauses[0]["detail"]
    assert len(transport.calls) == 1


async def test_paused_upstream_claims_nothing_until_it_resumes(make) -> None:
    h = make()
    h.transport.block = Blocked(THROTTLED, 0.3, "paused")
    await h.scheduler.start()
    queue_id = await h.queue()
    await asyncio.sleep(0.1)
    assert h.scheduler.circuit_open and h.transport.calls == []
    assert h.state_of(queue_id) == "incoming"
    assert h.metric("relayd_upstream_circuit_open") == 1
    h.transport.block = None
    await eventually(lambda: h.settled(queue_id), 5)
    assert h.metric("relayd_upstream_circuit_open") == 0


async def test_waiting_for_auth_resumes_when_the_token_is_back(make) -> None:
    h = make()
    h.transport.block = Blocked(AUTH, None, "auth state reauth_required")
    await h.scheduler.start()
    queue_id = await h.queue()
    await asyncio.sleep(0.2)
    assert h.transport.calls == [] and not h.scheduler.circuit_open
    h.transport.block = None
    h.transport.available.set()
    await eventually(lambda: h.settled(queue_id), 2)


async def test_corrupt_queue_file_is_set_aside_and_the_rest_flows(make) -> None:
    h = make()
    bad_id = new_queue_id()
    (h.spool.path("incoming", bad_id)).write_bytes(b"not a queue file\n")
    good = await h.queue(notify=False)
    await h.scheduler.start()
    await eventually(lambda: h.settled(good))
    assert (h.spool.path("corrupt", bad_id)).exists()


async def test_active_set_stays_bounded(make) -> None:
    h = make(ScriptedTransport(concurrency=2))
    h.transport.gate = asyncio.Event()
    await h.scheduler.start()
    await h.queue_many(10)
    await eventually(lambda: len(h.transport.calls) == 4)
    await asyncio.sleep(0.1)
    assert h.scheduler.active_count == 4 and h.spool.census().messages["incoming"] == 6
    h.transport.gate.set()
    await eventually(h.drained)


async def test_reconfigure_applies_a_new_rate_limit(make) -> None:
    h = make(ScriptedTransport(rate_limited=True), upstream={"rate_limit_per_minute": 1})
    await h.scheduler.start()
    await h.queue_many(3)
    await eventually(lambda: len(h.transport.calls) == 1)
    h.scheduler.reconfigure(
        load_settings(
            h.settings.spool.directory.parent,
            {"retry": FAST_RETRY, "upstream": {"rate_limit_per_minute": 0}},
        )
    )
    await eventually(lambda: len(h.transport.calls) == 3)


async def test_stop_during_a_claim_gives_the_message_back(make) -> None:
    h = make()
    claim = h.spool.claim
    claiming = threading.Event()

    def slow_claim(queue_id: str):
        claiming.set()
        time.sleep(0.3)  # in the claim thread: stop() arrives meanwhile
        return claim(queue_id)

    h.spool.claim = slow_claim
    queue_id = await h.queue(notify=False)  # every claim runs in a thread
    await h.scheduler.start()
    await asyncio.to_thread(claiming.wait, 5)
    await h.scheduler.stop(1)
    await asyncio.sleep(0.4)  # long enough for an orphaned claim thread to finish
    assert h.state_of(queue_id) == "incoming" and h.transport.calls == []


async def defer_one(h: Harness) -> str:
    """A message that is deferred once (due again 0.1-0.2 s later) while deliveries wait."""
    h.transport.script = [temporary]
    h.transport.gate = asyncio.Event()
    await h.scheduler.start()
    retried = await h.queue()
    await eventually(lambda: len(h.transport.calls) == 1)
    h.transport.gate.set()
    await eventually(lambda: h.state_of(retried) == "deferred")
    h.transport.gate.clear()
    return retried


async def test_due_retries_are_not_starved_by_new_mail(make) -> None:
    h = make(ScriptedTransport(concurrency=1))
    retried = await defer_one(h)
    newer = await h.queue_many(30)  # a backlog of new mail, already notified
    await asyncio.sleep(0.3)  # the retry comes due (retry.max_delay 0.2s)
    h.transport.gate.set()
    await eventually(lambda: h.settled(retried), 10)
    order = [call.queue_id for call in h.transport.calls]
    assert order.index(retried, 1) < len(order) - 1  # not left until the backlog was gone
    await eventually(h.drained)
    assert set(newer) <= {call.queue_id for call in h.transport.calls}


# --- the ready lanes (relayd.delivery.ready) ------------------------------------------


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> int:
    """Scans of 5 ids and at most 10 new-mail ids in memory: a backlog in a few ids."""
    monkeypatch.setattr(ready, "SCAN_BATCH", 5)
    monkeypatch.setattr(ready, "READY_LIMIT", 10)
    return 5


async def test_due_retry_takes_turns_with_a_backlog_on_disk_oldest_first(
    make, small_batches: int
) -> None:
    h = make(ScriptedTransport(concurrency=1))
    retried = await defer_one(h)
    backlog = [await h.queue(notify=False) for _ in range(6 * small_batches)]  # on disk only
    h.scheduler.wake()
    await asyncio.sleep(0.3)  # the retry comes due while the backlog waits
    h.transport.gate.set()
    await eventually(h.drained, 10)
    order = [call.queue_id for call in h.transport.calls[1:]]
    assert [q for q in order if q != retried] == sorted(backlog)  # first in, first out
    # Taken in turn with the backlog: among the first few, not after a scan batch or all.
    assert order.index(retried) <= 3


async def test_ready_list_stays_within_its_bound(
    make, small_batches: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ready, "MIN_SCAN_GAP", 0.002)  # scans as often as they may come
    h = make(ScriptedTransport(concurrency=1))

    def retried_forever(submission: Submission) -> Attempt:
        if "retry@example.org" in submission.recipients:
            return temporary(submission)  # comes due again every 0.1-0.2 s
        return delivered(submission)

    h.transport.default = retried_forever
    h.transport.delay = 0.01  # a backlog builds up while retries keep coming due
    await h.scheduler.start()
    for _ in range(3):
        await h.queue(("retry@example.org",))
    await asyncio.sleep(0.2)
    backlog = [await h.queue() for _ in range(80)]  # notified: 80 new ids for a lane of 10
    largest = 0
    while len(h.transport.to("user@example.org")) < len(backlog):
        largest = max(largest, len(h.scheduler._ready))
        await asyncio.sleep(0.002)
    # At most READY_LIMIT new ids, plus the three retries (their lane holds SCAN_BATCH).
    assert largest <= ready.READY_LIMIT + 3


def test_ready_queue_is_oldest_first_bounded_and_alternates() -> None:
    lanes = ReadyQueue(limit=3, retry_limit=2)
    for queue_id in ("0005", "0001", "0003"):
        assert lanes.add_new(queue_id)
    assert not lanes.add_new("0009")  # full, and the newest: left for a scan
    assert lanes.add_incoming(["0000", "0002"]) == 2  # older ones push the newest out
    lanes.add_retries(["r1", "r2", "r3"])  # room for two
    assert len(lanes) == 5
    taken = [lanes.pop() for _ in range(6)]
    assert taken == ["r1", "0000", "r2", "0001", "0002", None]


# --- counters that count what their names say ------------------------------------------


async def test_a_message_delivered_over_two_attempts_counts_once(make) -> None:
    h = make()
    h.transport.script = [half]
    await h.scheduler.start()
    queue_id = await h.queue(recipients=("a@example.org", "b@example.org"))
    await eventually(lambda: h.settled(queue_id))
    assert len(h.transport.calls) == 2
    assert h.metric("relayd_messages_delivered_total") == 1
    assert h.metric("relayd_recipients_delivered_total") == 2


async def test_a_partly_refused_message_counts_as_failed_not_delivered(make) -> None:
    h = make()
    h.transport.script = [
        lambda s: Attempt(
            delivered=("a@example.org",),
            failed=(("b@example.org", "550 5.1.10 not found"),),
            reply="250 2.0.0 OK",
        )
    ]
    await h.scheduler.start()
    queue_id = await h.queue(recipients=("a@example.org", "b@example.org"), sender="")
    await eventually(lambda: h.settled(queue_id, "failed"))
    assert h.metric("relayd_messages_delivered_total") == 0
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 1
    assert h.metric("relayd_recipients_delivered_total") == 1


# --- budgets spent on nothing ---------------------------------------------------------


async def test_attempts_that_never_reached_the_upstream_give_their_budget_back(make) -> None:
    transport = ScriptedTransport(rate_limited=True)
    h = make(transport, upstream={"rate_limit_per_minute": 2, "daily_recipient_limit": 2})
    unreachable = Attempt.deferred_all(
        ("user@example.org",), "connection", "cannot connect", 0.0
    ).using(NOTHING)
    transport.script = [lambda s: unreachable, lambda s: unreachable]
    await h.scheduler.start()
    ids = [await h.queue(), await h.queue()]
    for queue_id in ids:
        await eventually(lambda q=queue_id: h.settled(q), 5)
    assert len(transport.calls) == 4  # two failed tries and two deliveries, no 60 s wait
    assert h.metric("relayd_daily_recipients_used") == 2
    assert h.metric("relayd_rate_limit_tokens") == 0

"""What each attempt means for the message (settle, retry delays)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from relayd.config import RetrySettings
from relayd.delivery.outcome import (
    AUTH_RECHECK,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    FAILED,
    HELD,
    REJECTED,
    RELEASED,
    retry_delay,
    settle,
)
from relayd.queue.model import DeliveryState, Envelope, QueuedMessage, new_queue_id
from relayd.transports.base import AUTH, CONNECTION, QUOTA, SEND_AS_DENIED, TEMPORARY, Attempt

RETRY = RetrySettings(min_delay=60, max_delay=3600, max_age=5 * 86400)
NOW = 1_700_000_000.0


def message(
    recipients: tuple[str, ...] = ("a@x.org", "b@x.org"),
    *,
    age: float = 10.0,
    state: DeliveryState | None = None,
    sender: str = "app@example.com",
) -> QueuedMessage:
    received = NOW - age
    return QueuedMessage(
        queue_id=new_queue_id(received),
        envelope=Envelope(sender=sender, recipients=recipients, received_at=received),
        state=state or DeliveryState(),
        size=100,
        path=Path("/nonexistent"),
    )


def test_all_delivered() -> None:
    result = settle(
        message(), Attempt(delivered=("a@x.org", "b@x.org"), reply="250 ok"), NOW, RETRY
    )
    assert result.action == DELIVERED
    assert result.state.attempts == 1 and not result.newly_failed


def test_temporary_failure_defers_with_backoff_and_counts_the_attempt() -> None:
    attempt = Attempt.deferred_all(("a@x.org", "b@x.org"), TEMPORARY, "451 4.7.500 busy")
    result = settle(message(age=10), attempt, NOW, RETRY, random.Random(1))
    assert result.action == DEFERRED
    assert result.state.attempts == 1 and result.state.last_error == "451 4.7.500 busy"
    assert NOW + RETRY.min_delay <= result.next_attempt <= NOW + RETRY.min_delay * 1.0001


def test_partial_delivery_remembers_who_is_done_and_reports_who_failed() -> None:
    attempt = Attempt(
        delivered=("a@x.org",),
        failed=(("b@x.org", "550 5.1.10 not found"),),
        reply="250 ok",
    )
    result = settle(message(), attempt, NOW, RETRY)
    assert result.action == FAILED and result.fail_reason == REJECTED
    assert result.state.done_recipients == ("a@x.org",)
    assert result.newly_failed == (("b@x.org", "550 5.1.10 not found"),)


def test_mixed_result_defers_the_rest_and_reports_the_failure_at_once() -> None:
    attempt = Attempt(
        delivered=("a@x.org",),
        failed=(("b@x.org", "550 no"),),
        deferred=("c@x.org",),
        reason=TEMPORARY,
        reply="451 later",
    )
    result = settle(message(("a@x.org", "b@x.org", "c@x.org")), attempt, NOW, RETRY)
    assert result.action == DEFERRED
    assert result.newly_failed == (("b@x.org", "550 no"),)
    assert result.state.failed_recipients == (("b@x.org", "550 no"),)


def test_earlier_failure_makes_the_final_outcome_failed_without_reporting_it_again() -> None:
    earlier = DeliveryState(attempts=1, failed_recipients=(("b@x.org", "550 no"),))
    done = settle(message(state=earlier), Attempt(delivered=("a@x.org",)), NOW, RETRY)
    assert done.action == FAILED and done.newly_failed == ()


def test_too_old_temporary_failure_expires() -> None:
    attempt = Attempt.deferred_all(("a@x.org",), CONNECTION, "connection refused")
    result = settle(message(("a@x.org",), age=RETRY.max_age + 1), attempt, NOW, RETRY)
    assert result.action == FAILED and result.fail_reason == EXPIRED
    assert result.newly_failed[0][0] == "a@x.org"
    assert "gave up after" in result.newly_failed[0][1]


@pytest.mark.parametrize("reason", [AUTH, SEND_AS_DENIED, QUOTA])
def test_relay_own_problems_never_expire_into_a_bounce(reason: str) -> None:
    attempt = Attempt.deferred_all(("a@x.org",), reason, "535 5.7.3 Authentication unsuccessful")
    result = settle(message(("a@x.org",), age=RETRY.max_age * 3), attempt, NOW, RETRY)
    assert result.action == DEFERRED and not result.newly_failed


def test_auth_deferral_is_due_again_at_once_the_transport_holds_it_back() -> None:
    attempt = Attempt.deferred_all(("a@x.org",), AUTH, "535 5.7.3")
    result = settle(message(("a@x.org",), age=86400), attempt, NOW, RETRY)
    assert result.next_attempt == NOW + AUTH_RECHECK


def test_not_attempted_is_released_without_counting() -> None:
    attempt = Attempt.not_attempted(("a@x.org",), AUTH, "no token")
    result = settle(message(("a@x.org",)), attempt, NOW, RETRY)
    assert result.action == RELEASED and result.state.attempts == 0


def test_not_attempted_with_a_wait_is_deferred_without_counting() -> None:
    attempt = Attempt.not_attempted(("a@x.org",), "daily_limit", "budget spent", 300)
    result = settle(message(("a@x.org",)), attempt, NOW, RETRY)
    assert result.action == DEFERRED and result.next_attempt == NOW + 300
    assert result.state.attempts == 0


def test_retry_after_from_a_throttled_upstream_is_respected() -> None:
    attempt = Attempt.deferred_all(("a@x.org",), "throttled", "432 4.3.2", retry_after=900)
    result = settle(message(("a@x.org",)), attempt, NOW, RETRY)
    assert result.next_attempt == NOW + 900


@pytest.mark.parametrize("age", [0, 30, 600, 3000, 10_000, 10**6])
def test_retry_delay_grows_with_age_between_the_bounds(age: float) -> None:
    rng = random.Random(age)
    delays = [retry_delay(age, RETRY, rng) for _ in range(50)]
    assert all(RETRY.min_delay <= d <= RETRY.max_delay for d in delays)
    clamped = min(max(age, RETRY.min_delay), RETRY.max_delay)
    assert all(d >= 0.8 * clamped - 1e-9 or d == RETRY.min_delay for d in delays)
    if clamped > RETRY.min_delay / 0.8:
        assert len(set(delays)) > 1  # jitter spreads them


def test_a_held_attempt_goes_to_hold_with_its_reason_and_never_fails() -> None:
    old = message(age=10 * 86400)  # older than max_age: still no bounce
    attempt = Attempt.held(old.envelope.recipients, "too_big", "held: too large for Graph; fix it")

    decision = settle(old, attempt, NOW, RETRY)

    assert decision.action == HELD and not decision.newly_failed
    assert decision.state.last_error == "held: too large for Graph; fix it"
    assert decision.state.attempts == old.state.attempts + 1

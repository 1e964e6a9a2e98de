"""The circuit breaker, on a clock driven by hand."""

from __future__ import annotations

import pytest

from relayd.transports.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_breaker_trip_pauses_then_probes_until_success(clock: Clock) -> None:
    breaker = CircuitBreaker(clock)
    assert not breaker.is_open and not breaker.probing
    breaker.trip("throttled", 30)
    assert breaker.is_open and breaker.remaining() == 30 and breaker.reason == "throttled"
    clock.now += 30
    assert not breaker.is_open and breaker.probing
    breaker.success()
    assert not breaker.probing and breaker.reason == ""


def test_breaker_failures_double_the_pause_up_to_the_maximum(clock: Clock) -> None:
    breaker = CircuitBreaker(clock)
    pauses = [breaker.failure("connection", 1, 10) for _ in range(6)]
    assert pauses == [1, 2, 4, 8, 10, 10]
    breaker.success()
    assert breaker.failure("connection", 1, 10) == 1


def test_breaker_trip_never_shortens_a_longer_pause(clock: Clock) -> None:
    breaker = CircuitBreaker(clock)
    breaker.trip("quota", 3600)
    breaker.trip("throttled", 60)
    assert breaker.remaining() == 3600


def test_new_breaker_can_start_by_probing(clock: Clock) -> None:
    breaker = CircuitBreaker(clock, start_probing=True)
    assert breaker.probing and not breaker.is_open
    breaker.success()
    assert not breaker.probing


def test_a_session_that_works_does_not_end_a_pause_the_server_asked_for(clock: Clock) -> None:
    # Three sessions open at once; one meets 554 5.2.0 SubmissionQuotaExceeded (or a
    # 432) and trips the breaker, then another finishes its AUTH: the pause stays.
    breaker = CircuitBreaker(clock)
    breaker.trip("quota", 3600)
    breaker.success()
    assert breaker.is_open and breaker.reason == "quota"
    clock.now += 3600
    breaker.success()  # the probe after the pause worked
    assert not breaker.is_open and not breaker.probing and breaker.reason == ""


def test_a_session_that_works_ends_a_pause_failures_caused(clock: Clock) -> None:
    breaker = CircuitBreaker(clock)
    breaker.failure("connection", 60, 3600)
    breaker.success()
    assert not breaker.is_open and breaker.failures == 0

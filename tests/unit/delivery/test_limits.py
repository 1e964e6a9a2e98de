"""Sliding windows, driven by a hand-held clock."""

from __future__ import annotations

import pytest

from relayd.delivery.limits import SendingBudget, SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_window_allows_the_limit_then_waits_for_the_oldest_to_expire(clock: Clock) -> None:
    window = SlidingWindow(3, 60, clock)
    for _ in range(3):
        assert window.wait_time() == 0
        window.spend()
        clock.now += 1
    # Three spent at t=1000, 1001, 1002; now t=1003: the first frees at t=1060.
    assert window.remaining() == 0
    assert window.wait_time() == pytest.approx(57)
    clock.now = 1060
    assert window.wait_time() == 0
    assert window.remaining() == 1


def test_window_never_allows_more_than_the_limit_in_any_window(clock: Clock) -> None:
    window = SlidingWindow(5, 60, clock)
    sent: list[float] = []
    while clock.now < 1300:
        if window.wait_time() == 0:
            window.spend()
            sent.append(clock.now)
        else:
            clock.now += 0.5
    for start in sent:
        assert sum(1 for t in sent if start <= t < start + 60) <= 5
    assert len(sent) >= 25  # and it does not starve either


def test_weighted_request_waits_until_enough_units_are_free(clock: Clock) -> None:
    budget = SlidingWindow(10, 100, clock)
    budget.spend(4)
    clock.now += 10
    budget.spend(5)
    assert budget.used() == 9
    assert budget.wait_time(1) == 0
    assert budget.wait_time(3) == pytest.approx(90)  # the first 4 free at +100
    assert budget.wait_time(7) == pytest.approx(100)  # needs both to free


def test_request_larger_than_the_limit_waits_for_an_empty_window(clock: Clock) -> None:
    budget = SlidingWindow(10, 100, clock)
    assert budget.wait_time(50) == 0  # empty: an oversized message may go
    budget.spend(1)
    assert budget.wait_time(50) == pytest.approx(100)


def test_zero_means_no_limit(clock: Clock) -> None:
    window = SlidingWindow(0, 60, clock)
    for _ in range(1000):
        window.spend()
    assert window.wait_time(10**6) == 0
    assert window.remaining() == float("inf")
    assert window.used() == 0


def test_new_limit_applies_to_what_was_spent(clock: Clock) -> None:
    window = SlidingWindow(10, 60, clock)
    window.spend(5)
    window.set_limit(5)
    assert window.wait_time() == pytest.approx(60)
    window.set_limit(0)
    assert window.wait_time() == 0


def test_refund_gives_back_from_its_own_spend_not_a_later_one(clock: Clock) -> None:
    window = SlidingWindow(2, 60, clock)
    early = window.spend()  # t=1000: a message whose connection failed
    clock.now += 30
    window.spend()  # t=1030: a message Exchange did count
    assert window.wait_time() == pytest.approx(30)
    window.refund(early, 1)
    assert window.wait_time() == 0 and window.used() == 1
    window.spend()  # t=1030 again: both now free at t=1090, not earlier
    clock.now = 1089
    assert window.wait_time() == pytest.approx(1)


def test_refund_after_expiry_or_twice_changes_nothing(clock: Clock) -> None:
    window = SlidingWindow(3, 60, clock)
    spent = window.spend(2)
    window.refund(spent, 1)
    window.refund(spent, 5)  # only what is left of that spend
    assert window.used() == 0
    old = window.spend(3)
    clock.now += 61
    window.spend(1)
    window.refund(old, 3)  # it already left the window
    assert window.used() == 1


def test_budget_keeps_what_the_upstream_counted(clock: Clock) -> None:
    budget = SendingBudget(30, 10, clock)
    reserved = budget.reserve(4)
    budget.give_back(reserved, messages=1, recipients=3)  # one recipient refused at RCPT
    assert budget.rate.used() == 1 and budget.daily.used() == 3
    nothing = budget.reserve(4)
    budget.give_back(nothing, messages=0, recipients=0)  # never reached the upstream
    assert budget.rate.used() == 1 and budget.daily.used() == 3


def test_what_the_upstream_counted_frees_a_window_after_the_attempt_not_the_claim(
    clock: Clock,
) -> None:
    # Three messages reserved at t=1000; Exchange accepted them over the next 2 s (a new
    # connection: TLS and AUTH first) and counts them from then, so relayd must not send
    # the next three before t=1062: at t=1060 Exchange would still count all three.
    budget = SendingBudget(3, 100, clock)
    reserved = [budget.reserve(1) for _ in range(3)]
    clock.now = 1002
    for reservation in reserved:
        budget.give_back(reservation, messages=1, recipients=1)
    clock.now = 1060
    assert budget.rate.wait_time() == pytest.approx(2)
    assert budget.daily.used() == 3
    clock.now = 1062
    assert budget.rate.wait_time() == 0


def test_recount_keeps_an_attempt_that_outlived_the_window(clock: Clock) -> None:
    window = SlidingWindow(3, 60, clock)
    spent = window.spend(1)
    clock.now += 90  # a slow upstream: the spend left the window before the reply
    window.recount(spent, 1)
    assert window.used() == 1

"""What an attempt means for the message: the next step after a transport's ``Attempt``.

Pure functions and values only, so every decision about a message's fate can be
tested without a network: the transport judges the upstream's replies
(``relayd.transports.replies``) and reports an ``Attempt`` recipient by recipient;
``settle`` decides what the spool does next (delivered, deferred until when, failed,
released).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from relayd.config import RetrySettings
from relayd.queue.model import DeliveryState, QueuedMessage, received_at_from_id
from relayd.transports.base import ACCOUNT_REASONS, AUTH, SEND_AS_DENIED, Attempt
from relayd.units import format_duration

REJECTED = "rejected"  # 5xx from the upstream for the message or a recipient
EXPIRED = "expired"  # still undeliverable after retry.max_age
FAIL_REASONS = (REJECTED, EXPIRED)
# Problems of the relay's own making (its token, its Send As rights, its mailbox or
# tenant refused by Exchange: quota, mailbox full, restricted, blocked): an operator
# can fix them, so they wait for as long as it takes and never expire into a bounce
# (the idea of Postfix's smtp_sasl_auth_soft_bounce). Where Postfix would bounce a
# 5xx about its own account, relayd waits: one bounce per queued message would follow.
NEVER_EXPIRE = (AUTH, SEND_AS_DENIED, *ACCOUNT_REASONS)

AUTH_RECHECK = 1.0  # seconds; see settle()

# --- what happens next -----------------------------------------------------------------

DELIVERED, DEFERRED, FAILED, RELEASED = "delivered", "deferred", "failed", "released"
HELD = "held"  # to hold/ for an operator, the reason in last_error (relayd queue show)


@dataclass(frozen=True)
class Settlement:
    """The spool action for a finished attempt and the new delivery state."""

    action: str  # DELIVERED | DEFERRED | FAILED | RELEASED | HELD
    state: DeliveryState
    next_attempt: float | None = None
    newly_failed: tuple[tuple[str, str], ...] = ()  # recipients to tell the sender about
    fail_reason: str = ""


def retry_delay(age: float, retry: RetrySettings, rng: random.Random | None = None) -> float:
    """Postfix's rule: the delay grows with the message's age, between the bounds.

    Jitter (up to 20% shorter) spreads messages deferred together by one outage, so
    they do not all return at the same moment.
    """
    base = min(max(age, retry.min_delay), retry.max_delay)
    jitter = (rng or random).uniform(0.8, 1.0)
    return max(retry.min_delay, base * jitter)


def received_at(message: QueuedMessage) -> float:
    return message.envelope.received_at or received_at_from_id(message.queue_id)


def life_started(message: QueuedMessage) -> float:
    """Where retry.max_age and the backoff count from: the arrival, or the operator's
    requeue of a failed message (`relayd queue retry`, as postsuper -r)."""
    return max(received_at(message), message.state.requeued_at)


def settle(
    message: QueuedMessage,
    attempt: Attempt,
    now: float,
    retry: RetrySettings,
    rng: random.Random | None = None,
) -> Settlement:
    """Decide the message's next state from what the attempt achieved."""
    state = message.state
    if attempt.hold:
        # Not a failure and not a retry: nothing will change until a person acts, so
        # the message waits in hold/ (never expires, never bounces) with the reason.
        state = replace(
            state,
            attempts=state.attempts + (1 if attempt.attempted else 0),
            last_attempt=now,
            last_error=attempt.reply,
            done_recipients=state.done_recipients + attempt.delivered,
        )
        return Settlement(HELD, state)
    if not attempt.attempted:
        if attempt.retry_after > 0:
            return Settlement(DEFERRED, state, now + attempt.retry_after)
        return Settlement(RELEASED, state)
    age = now - life_started(message)
    newly_failed = attempt.failed
    deferred = attempt.deferred
    if deferred and age >= retry.max_age and attempt.reason not in NEVER_EXPIRE:
        gave_up = f"{attempt.reply} (gave up after {format_duration(round(age))} in the queue)"
        newly_failed += tuple((recipient, gave_up) for recipient in deferred)
        deferred = ()
    # Only failures the sender has not been told about yet get a DSN.
    untold = tuple(pair for pair in newly_failed if pair[0] not in state.reported)
    state = replace(
        state,
        attempts=state.attempts + 1,
        last_attempt=now,
        last_error=attempt.reply if (deferred or newly_failed) else "",
        done_recipients=state.done_recipients + attempt.delivered,
        failed_recipients=state.failed_recipients + newly_failed,
        reported=state.reported + tuple(recipient for recipient, _ in untold),
    )
    if deferred:
        if attempt.reason == AUTH:
            # Due again almost at once: the transport's auth pause (or its wait for a
            # new sign-in) is what holds these back, so they go the moment auth works.
            delay = min(retry.min_delay, AUTH_RECHECK)
        else:
            delay = max(retry_delay(age, retry, rng), attempt.retry_after)
        return Settlement(DEFERRED, state, now + delay, untold)
    if state.failed_recipients:
        reason = EXPIRED if len(newly_failed) > len(attempt.failed) else REJECTED
        return Settlement(FAILED, state, None, untold, reason)
    return Settlement(DELIVERED, state, None, untold)

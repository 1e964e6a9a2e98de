"""What a delivery attempt means: reply classes, per-recipient results, the next step.

Pure functions and values only, so every decision about a message's fate can be
tested without a network: ``classify`` turns an upstream reply into a ``Kind``
(RFC 5321 §4.2.1 reply classes refined by Exchange Online's known replies),
``Attempt`` holds what one attempt achieved recipient by recipient, and ``settle``
decides what the spool does next (delivered, deferred until when, failed, released).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from enum import StrEnum

from relayd.config import RetrySettings
from relayd.spool import DeliveryState, QueuedMessage, received_at_from_id
from relayd.units import format_duration

# Label values for relayd_messages_deferred{reason} / relayd_messages_failed{reason}.
TEMPORARY = "temporary"  # 4xx from the upstream
THROTTLED = "throttled"  # 421 / 432 4.3.2: the whole upstream pauses
QUOTA = "quota"  # the mailbox's own submission quota is used up
CONNECTION = "connection"  # cannot connect, or the connection broke
TIMEOUT = "timeout"  # the upstream did not answer in upstream.timeout
AUTH = "auth"  # no token, token refused, SMTP AUTH disabled: never a bounce
SEND_AS_DENIED = "send_as_denied"  # 554 5.2.252 despite the sender policy: a config error
DAILY_LIMIT = "daily_limit"  # the daily recipient budget is spent
LOCAL = "local"  # a local error (maildir not writable, unexpected exception)
DEFER_REASONS = (
    TEMPORARY,
    THROTTLED,
    QUOTA,
    CONNECTION,
    TIMEOUT,
    AUTH,
    SEND_AS_DENIED,
    DAILY_LIMIT,
    LOCAL,
)
REJECTED = "rejected"  # 5xx from the upstream for the message or a recipient
EXPIRED = "expired"  # still undeliverable after retry.max_age
FAIL_REASONS = (REJECTED, EXPIRED)
# Problems of the relay's own making (its token, its mailbox's quota, its Send As
# rights): an operator can fix them, so they wait for as long as it takes and never
# expire into a bounce (the idea of Postfix's smtp_sasl_auth_soft_bounce).
NEVER_EXPIRE = (AUTH, SEND_AS_DENIED, QUOTA)

AUTH_RECHECK = 1.0  # seconds; see settle()

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


class Kind(StrEnum):
    """How relayd treats an upstream reply."""

    ACCEPTED = "accepted"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    THROTTLED = "throttled"
    QUOTA = "quota"
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 (a name) — 535 5.7.3: refresh once, retry
    AUTH_DISABLED = "auth_disabled"  # 535 5.7.139: SMTP AUTH is off for tenant/mailbox
    AUTH = "auth"  # any other authentication problem
    SEND_AS_DENIED = "send_as_denied"


AUTH_KINDS = (Kind.TOKEN_REJECTED, Kind.AUTH_DISABLED, Kind.AUTH)

# RFC 5321 calls some of these replies permanent, but they are about the relay's own
# mailbox (see NEVER_EXPIRE): bouncing would punish the sender for a fixable problem.
_QUOTA_TEXT = re.compile(r"QuotaExceeded", re.IGNORECASE)
_SEND_AS_TEXT = re.compile(r"SendAsDenied|SendOnBehalf|\b5\.7\.60\b", re.IGNORECASE)

AUTH_DISABLED_EXPLANATION = (
    "SMTP AUTH is disabled for the tenant or the mailbox: an Exchange administrator must "
    "run Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false "
    "(security defaults also turn it off); mail waits in the queue until then"
)
SEND_AS_EXPLANATION = (
    "Exchange refused the sender (SendAsDenied): the mailbox has no Send As right for "
    "an address listed in upstream.send_as; grant the right or remove the address; "
    "mail waits in the queue until then"
)


def enhanced_status(message: str, default: str) -> str:
    """ "5.1.1" from "5.1.1 User unknown" (RFC 3463), else ``default``."""
    match = _ENHANCED.match(message or "")
    return match.group(1) if match else default


def classify(code: int, message: str) -> Kind:
    """The treatment of one upstream reply (RFC 5321 §4.2.1 plus Exchange's specifics)."""
    status = enhanced_status(message, "")
    if 200 <= code < 400:
        return Kind.ACCEPTED
    if code == 421 or status == "4.3.2":
        # RFC 5321 §3.8: 421 closes the channel; 432 4.3.2 is Exchange's concurrency
        # and throttling answer. Both concern the whole upstream, not the message.
        return Kind.THROTTLED
    if _QUOTA_TEXT.search(message or ""):
        return Kind.QUOTA
    if code == 535 and status == "5.7.3":
        return Kind.TOKEN_REJECTED
    if code == 535 and status == "5.7.139":
        return Kind.AUTH_DISABLED
    if code in (454, 530, 534, 535, 538):
        # RFC 4954 §6: authentication replies. Never a bounce.
        return Kind.AUTH
    if status == "5.2.252" or _SEND_AS_TEXT.search(message or ""):
        return Kind.SEND_AS_DENIED
    return Kind.TEMPORARY if 400 <= code < 500 else Kind.PERMANENT


def reply_text(code: int, message: str) -> str:
    """One line, bounded, for logs, the spool's last_error and DSNs."""
    text = " ".join(f"{code} {message}".split())
    return text[:500]


@dataclass(frozen=True)
class Attempt:
    """What one delivery attempt achieved, recipient by recipient.

    ``attempted`` is False when the message never reached the upstream (paused for
    throttling, no token, daily budget spent): it goes back to the queue without
    counting as an attempt, after ``retry_after`` seconds when that is set.
    """

    delivered: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (recipient, reply): permanent
    deferred: tuple[str, ...] = ()
    reason: str = ""  # a DEFER_REASONS value when anything is deferred
    reply: str = ""  # what the upstream said (or what went wrong), for logs
    retry_after: float = 0.0  # at least this long before the next attempt
    attempted: bool = True

    @classmethod
    def deferred_all(
        cls, recipients: tuple[str, ...], reason: str, reply: str, retry_after: float = 0.0
    ) -> Attempt:
        return cls(deferred=recipients, reason=reason, reply=reply, retry_after=retry_after)

    @classmethod
    def not_attempted(
        cls, recipients: tuple[str, ...], reason: str, reply: str, retry_after: float = 0.0
    ) -> Attempt:
        return cls(
            deferred=recipients,
            reason=reason,
            reply=reply,
            retry_after=retry_after,
            attempted=False,
        )

    def merge(self, other: Attempt) -> Attempt:
        """Combine the results for two disjoint sets of recipients."""
        return Attempt(
            delivered=self.delivered + other.delivered,
            failed=self.failed + other.failed,
            deferred=self.deferred + other.deferred,
            reason=self.reason or other.reason,
            reply=self.reply or other.reply,
            retry_after=max(self.retry_after, other.retry_after),
            attempted=self.attempted or other.attempted,
        )


# --- what happens next -----------------------------------------------------------------

DELIVERED, DEFERRED, FAILED, RELEASED = "delivered", "deferred", "failed", "released"


@dataclass(frozen=True)
class Settlement:
    """The spool action for a finished attempt and the new delivery state."""

    action: str  # DELIVERED | DEFERRED | FAILED | RELEASED
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


def settle(
    message: QueuedMessage,
    attempt: Attempt,
    now: float,
    retry: RetrySettings,
    rng: random.Random | None = None,
) -> Settlement:
    """Decide the message's next state from what the attempt achieved."""
    state = message.state
    if not attempt.attempted:
        if attempt.retry_after > 0:
            return Settlement(DEFERRED, state, now + attempt.retry_after)
        return Settlement(RELEASED, state)
    age = now - received_at(message)
    newly_failed = attempt.failed
    deferred = attempt.deferred
    if deferred and age >= retry.max_age and attempt.reason not in NEVER_EXPIRE:
        gave_up = f"{attempt.reply} (gave up after {format_duration(round(age))} in the queue)"
        newly_failed += tuple((recipient, gave_up) for recipient in deferred)
        deferred = ()
    state = replace(
        state,
        attempts=state.attempts + 1,
        last_attempt=now,
        last_error=attempt.reply if (deferred or newly_failed) else "",
        done_recipients=state.done_recipients + attempt.delivered,
        failed_recipients=state.failed_recipients + newly_failed,
    )
    if deferred:
        if attempt.reason == AUTH:
            # Due again almost at once: the transport's auth pause (or its wait for a
            # new sign-in) is what holds these back, so they go the moment auth works.
            delay = min(retry.min_delay, AUTH_RECHECK)
        else:
            delay = max(retry_delay(age, retry, rng), attempt.retry_after)
        return Settlement(DEFERRED, state, now + delay, newly_failed)
    if state.failed_recipients:
        reason = EXPIRED if len(newly_failed) > len(attempt.failed) else REJECTED
        return Settlement(FAILED, state, None, newly_failed, reason)
    return Settlement(DELIVERED, state, None, newly_failed)

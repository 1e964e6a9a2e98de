"""What every transport shares: the message as it leaves, what one attempt achieved, and
the protocol the scheduler drives.

A transport is chasquid's courier: ``deliver(submission) -> Attempt``. It never touches
the spool; the scheduler decides what an attempt means for the message
(``relayd.delivery.outcome.settle``). The reason names below are the label values of
``relayd_messages_deferred{reason}``: a transport says why, the scheduler counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from relayd.config import Settings

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
# Label values for relayd_messages_held{reason}: the message waits for an operator.
TOO_BIG = "too_big"  # over Graph's request limit and no other way is open
HELD_REASONS = (TOO_BIG,)
# The relay's own mailbox or tenant may not send now (relayd.transports.replies): the
# whole upstream pauses until a person acts; never a bounce.
MAILBOX_FULL = "mailbox_full"  # 554 5.2.2: the mailbox (its Sent Items) is full
ACCOUNT_RESTRICTED = "account_restricted"  # 550 5.1.8: restricted from sending
TENANT_BLOCKED = "tenant_blocked"  # 5.7.705 / 5.7.708 / 5.7.750: the tenant is blocked
ACCOUNT_REASONS = (QUOTA, MAILBOX_FULL, ACCOUNT_RESTRICTED, TENANT_BLOCKED)
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
    MAILBOX_FULL,
    ACCOUNT_RESTRICTED,
    TENANT_BLOCKED,
)
# Label values of relayd_deliveries_paused{reason}: why no delivery starts right now.
PAUSE_REASONS = (
    THROTTLED,
    CONNECTION,
    TIMEOUT,
    AUTH,
    DAILY_LIMIT,
    *ACCOUNT_REASONS,
)


@dataclass(frozen=True)
class Submission:
    """One message as it leaves: envelope after the sender policy, exact bytes."""

    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    content: bytes
    mail_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Blocked:
    """Why deliveries must wait, and for how long (None: until the state changes)."""

    reason: str
    seconds: float | None
    detail: str


class Transport(Protocol):
    """What the scheduler needs from a transport."""

    rate_limited: bool  # do upstream.rate_limit_per_minute and the daily budget apply?

    @property
    def concurrency(self) -> int:
        """How many deliveries at once make sense."""
        ...

    def blocked(self) -> Blocked | None:
        """Whether new deliveries should wait (paused upstream, no token)."""
        ...

    async def wait_until_available(self) -> None:
        """Return when ``blocked()`` may have changed."""
        ...

    async def deliver(self, submission: Submission) -> Attempt: ...

    def reconfigure(self, settings: Settings) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Usage:
    """What an attempt cost against the upstream's sending limits, as the upstream
    counts them: Exchange counts a message whose content reached it (its DATA got a
    reply, or the connection was lost after the final dot) and each recipient it
    accepted at RCPT. The scheduler gives back the rest of what it reserved."""

    messages: int = 0
    recipients: int = 0


NOTHING = Usage()


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
    # Hold the message (hold/, never expires, never bounces) until an operator releases
    # it; ``reason`` is a HELD_REASONS value and ``reply`` says why and what fixes it.
    hold: bool = False
    # What the upstream counted (Usage); None: all that was reserved, as far as the
    # transport knows. An attempt that was not attempted counted nothing.
    usage: Usage | None = None

    @property
    def spent(self) -> Usage | None:
        """The usage to keep; None: keep everything that was reserved."""
        return NOTHING if not self.attempted else self.usage

    def using(self, usage: Usage) -> Attempt:
        return replace(self, usage=usage)

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

    @classmethod
    def held(cls, recipients: tuple[str, ...], reason: str, reply: str) -> Attempt:
        return cls(deferred=recipients, reason=reason, reply=reply, hold=True)

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
            hold=self.hold or other.hold,
            usage=self.usage if self.usage is not None else other.usage,
        )

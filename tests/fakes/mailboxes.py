"""What Exchange Online keeps per mailbox, for the fake Exchange and the fake Graph.

Which accounts exist (may sign in), which addresses each may send as (Send As
permissions: ``Add-RecipientPermission -Identity shared@ -Trustee mailbox@
-AccessRights SendAs``), how many connections each has open (Exchange allows 3 per
mailbox, not per client), and how fast each may submit.

The message rate is Exchange Online's 30 messages a minute per mailbox, scaled by the
test (``rate_limit(mailbox, 30, per=0.6)``). Learn ("Message storage and concurrent
connection throttling for SMTP Authenticated Submission") says the excess is delayed
and carried over to the following minutes: ``mode="delay"`` holds the final reply
until the window has room. The service description says the client is refused and
must retry: ``mode="refuse"`` answers ``reply`` instead (by default Exchange's
receive-connector words, ``421 4.4.2 Message submission rate ... exceeded``).
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field

RATE_EXCEEDED = (
    "421 4.4.2 Message submission rate for this client has exceeded the configured limit"
)
DELAY, REFUSE = "delay", "refuse"


@dataclass
class RateLimit:
    messages: int
    per: float  # seconds
    mode: str = DELAY
    reply: str = RATE_EXCEEDED
    slots: list[float] = field(default_factory=list)  # submission times taken, sorted


class Mailboxes:
    """Accounts, Send As rights, connections and message rates, keyed by lower-case address."""

    def __init__(self, default: str, send_as: tuple[str, ...] = ()) -> None:
        self.default = default
        self._send_as: dict[str, set[str]] = {}
        self.add(default, *send_as)
        self.open: collections.Counter[str] = collections.Counter()  # connections now
        self.peak: collections.Counter[str] = collections.Counter()  # most at once
        self.rate_refused: collections.Counter[str] = collections.Counter()
        self.rate_delayed: collections.Counter[str] = collections.Counter()
        self.send_as_refused: collections.Counter[str] = collections.Counter()
        self._limits: dict[str, RateLimit] = {}
        self._accepted: dict[str, list[float]] = collections.defaultdict(list)

    # --- accounts and Send As ----------------------------------------------------------

    def add(self, mailbox: str, *send_as: str) -> None:
        """An account that may sign in (and send as itself), with Send As on ``send_as``."""
        self._send_as.setdefault(mailbox.lower(), {mailbox.lower()})
        self.grant_send_as(mailbox, *send_as)

    def knows(self, mailbox: str) -> bool:
        return mailbox.lower() in self._send_as

    def grant_send_as(self, mailbox: str, *addresses: str) -> None:
        self._send_as[mailbox.lower()].update(a.lower() for a in addresses)

    def revoke_send_as(self, mailbox: str, *addresses: str) -> None:
        self._send_as[mailbox.lower()].difference_update(
            a.lower() for a in addresses if a.lower() != mailbox.lower()
        )

    def send_as(self, mailbox: str) -> set[str]:
        """The live set of addresses ``mailbox`` may send as (itself included)."""
        return self._send_as.setdefault(mailbox.lower(), {mailbox.lower()})

    def may_send_as(self, mailbox: str, address: str) -> bool:
        return address.lower() in self._send_as.get(mailbox.lower(), ())

    # --- connections ---------------------------------------------------------------------

    def connected(self, mailbox: str) -> None:
        key = mailbox.lower()
        self.open[key] += 1
        self.peak[key] = max(self.peak[key], self.open[key])

    def disconnected(self, mailbox: str) -> None:
        self.open[mailbox.lower()] -= 1

    # --- message rate ------------------------------------------------------------------

    def rate_limit(
        self,
        mailbox: str,
        messages: int,
        per: float = 60.0,
        *,
        mode: str = DELAY,
        reply: str = RATE_EXCEEDED,
    ) -> None:
        """At most ``messages`` submissions in any ``per`` seconds; 0 lifts the limit."""
        assert mode in (DELAY, REFUSE), mode
        if messages <= 0:
            self._limits.pop(mailbox.lower(), None)
        else:
            self._limits[mailbox.lower()] = RateLimit(messages, per, mode, reply)

    def admit(self, mailbox: str, now: float | None = None) -> float | str:
        """Take a submission slot: seconds to hold the reply (0: at once), or the reply
        to refuse with. A slot taken is kept: Exchange counts the submission."""
        limit = self._limits.get(mailbox.lower())
        now = time.monotonic() if now is None else now
        if limit is None:
            return 0.0
        slots = limit.slots
        start = len(slots) - limit.messages  # the slot that must have left the window
        free_at = slots[start] + limit.per if start >= 0 else now
        if free_at > now and limit.mode == REFUSE:
            self.rate_refused[mailbox.lower()] += 1
            return limit.reply
        slot = max(now, free_at)
        slots.insert(bisect.bisect(slots, slot), slot)
        del slots[: max(0, len(slots) - limit.messages)]  # only the last N matter
        if slot > now:
            self.rate_delayed[mailbox.lower()] += 1
        return slot - now

    def accepted(self, mailbox: str, at: float) -> None:
        self._accepted[mailbox.lower()].append(at)

    def max_in_window(self, mailbox: str, seconds: float) -> int:
        """The most messages ``mailbox`` submitted in any ``seconds`` long stretch."""
        times = sorted(self._accepted.get(mailbox.lower(), ()))
        most, first = 0, 0
        for last, at in enumerate(times):
            while at - times[first] >= seconds:
                first += 1
            most = max(most, last - first + 1)
        return most

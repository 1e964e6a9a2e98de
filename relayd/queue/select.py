"""Which messages a `relayd queue` command acts on: ids (also one per line on standard
input, as with `postsuper -d -`), or every message that matches --state, --sender,
--recipient and --older-than (``--all``: every message the action applies to)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO

from relayd.queue.model import Envelope, QueueEntry

STDIN_MARKER = "-"


@dataclass(frozen=True)
class Filters:
    """Conditions a message must meet; an empty Filters matches everything."""

    states: tuple[str, ...] = ()
    sender: str | None = None
    recipient: str | None = None
    older_than: float | None = None  # seconds since arrival
    # The route a message leaves by (its envelope sender decides: relayd.config.routes).
    mailbox: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.states) or any(
            value is not None
            for value in (self.sender, self.recipient, self.older_than, self.mailbox)
        )

    @property
    def needs_envelope(self) -> bool:
        return any(value is not None for value in (self.sender, self.recipient, self.mailbox))

    def states_or(self, default: Iterable[str]) -> tuple[str, ...]:
        return self.states or tuple(default)

    def matches(
        self,
        entry: QueueEntry,
        envelope: Envelope | None,
        now: float,
        mailbox_of: Callable[[str], str] | None = None,
    ) -> bool:
        """``mailbox_of``: envelope sender → the mailbox it leaves as (for ``mailbox``)."""
        if self.states and entry.state not in self.states:
            return False
        if self.older_than is not None and now - entry.received_at <= self.older_than:
            return False
        if not self.needs_envelope:
            return True
        if envelope is None:  # unreadable: it cannot be said to match an address
            return False
        if self.sender is not None and not address_matches(self.sender, envelope.sender):
            return False
        if self.mailbox is not None:
            leaves_as = mailbox_of(envelope.sender) if mailbox_of else None
            if leaves_as is None or leaves_as != self.mailbox.strip().lower():
                return False
        return self.recipient is None or any(
            address_matches(self.recipient, recipient) for recipient in envelope.recipients
        )


def address_matches(pattern: str, address: str) -> bool:
    """``user@domain`` matches that address, ``@domain`` every address at that domain
    or below it, ``<>`` the null sender (DSNs); letter case never matters."""
    pattern, address = pattern.strip().lower(), address.lower()
    if pattern == "<>":
        return address == ""
    if pattern.startswith("@"):
        domain = address.rpartition("@")[2]
        return domain == pattern[1:] or domain.endswith("." + pattern[1:])
    return address == pattern.strip("<>")


def expand_ids(arguments: Iterable[str], stdin: TextIO) -> list[str]:
    """The ids given, with ``-`` replaced by the ids on standard input: the first word
    of each line, so that `relayd queue list` output can be piped in as it is (its
    heading, its indented "last error" lines and its "--" summary are skipped)."""
    return list(_expanded(arguments, stdin))


def _expanded(arguments: Iterable[str], stdin: TextIO) -> Iterator[str]:
    for argument in arguments:
        if argument != STDIN_MARKER:
            yield argument
            continue
        for line in stdin:
            if _is_listing_decoration(line):
                continue
            yield line.split()[0]


def _is_listing_decoration(line: str) -> bool:
    return not line.strip() or line[0].isspace() or line.startswith(("Queue ID ", "-- "))

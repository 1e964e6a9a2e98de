"""How `relayd queue` shows messages: the listing line, `show`'s fields, ages and sizes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from relayd.queue.model import (
    STATES,
    DeliveryState,
    Envelope,
    QueuedMessage,
    QueueEntry,
    received_at_from_id,
)


@dataclass(frozen=True)
class Listing:
    """One message as `relayd queue list` shows it."""

    entry: QueueEntry
    envelope: Envelope | None
    state: DeliveryState
    mailbox: str | None = None  # the route it leaves by (a relay with routes)

    def as_json(self, now: float) -> dict:
        envelope = self.envelope
        shown = {
            "id": self.entry.queue_id,
            "state": self.entry.state,
            "age": round(now - self.entry.received_at, 3),
            "received_at": iso_time(self.entry.received_at),
            "sender": envelope.sender if envelope else None,
            "recipient_count": len(envelope.recipients) if envelope else None,
            "size": self.entry.size,
            "attempts": self.state.attempts,
            "last_error": self.state.last_error or None,
            "next_attempt": iso_time(self.entry.next_attempt),
        }
        if self.mailbox is not None:
            shown["mailbox"] = self.mailbox
        return shown


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def human_size(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return str(size)


def summary(listings: list[Listing]) -> str:
    if not listings:
        return "-- queue is empty"
    counts = {state: 0 for state in STATES}
    for item in listings:
        counts[item.entry.state] += 1
    size = sum(item.entry.size for item in listings)
    states = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    return f"-- {len(listings)} message(s), {human_size(size)}: {states}"


def state_text(state: str, message: QueuedMessage, now: float) -> str:
    if state != "deferred":
        return {
            "incoming": "incoming (waiting for its first attempt)",
            "active": "active (being delivered right now)",
            "hold": "hold (kept by an operator; `relayd queue release` puts it back)",
            "failed": "failed (delivery gave up; `relayd queue retry` tries again)",
        }[state]
    try:
        due = message.path.stat().st_mtime
    except OSError:
        return "deferred"
    when = "now" if due <= now else f"in {human_age(due - now)}"
    return f"deferred, next attempt {iso_time(due)} ({when})"


def received_text(envelope: Envelope, queue_id: str, now: float) -> str:
    received = envelope.received_at or received_at_from_id(queue_id)
    helo = f", HELO {envelope.helo}" if envelope.helo else ""
    client = envelope.client or "unknown client"
    return f"{iso_time(received)} ({human_age(now - received)} ago) from {client}{helo}"


def attempts_text(state: DeliveryState) -> str:
    if not state.attempts:
        return "0"
    return f"{state.attempts}, last {iso_time(state.last_attempt)}"


def recipient_outcomes(envelope: Envelope, state: DeliveryState) -> list[tuple[str, str]]:
    failed = dict(state.failed_recipients)
    done = set(state.done_recipients)

    def outcome(recipient: str) -> str:
        if recipient in done:
            return "delivered"
        if recipient in failed:
            return f"failed: {failed[recipient]}"
        return "pending"

    return [(recipient, outcome(recipient)) for recipient in envelope.recipients]


def hold_text(previous: str) -> str:
    return "already on hold" if previous == "hold" else f"on hold (was in {previous}/)"


def retry_text(previous: str) -> str:
    return {
        "deferred": "due now",
        "failed": "moved from failed/ to deferred/, due now; retry.max_age counts from now",
        "incoming": "already waiting for its first attempt",
    }[previous]

"""What the spool holds, as the rest of relayd sees it: queue states, ids, envelopes,
delivery state, and the errors the spool raises.

Queue ids sort by arrival time: 13 hex digits of microseconds since the epoch and
6 random hex digits, so a directory listing sorted by name is the arrival order and
a message's age is readable from its name.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from relayd.ops.files import open_regular

QUEUED_STATES = ("incoming", "active", "deferred", "hold")
# Waiting to be delivered: what queue depth and the oldest message's age are about
# (held messages wait for the operator, not for the upstream).
PENDING_STATES = ("incoming", "active", "deferred")
STATES = (*QUEUED_STATES, "failed")
DIRECTORIES = ("tmp", *STATES, "corrupt", "meta")
_QUEUE_ID = re.compile(r"^[0-9A-F]{19}$")


class SpoolError(Exception):
    """The message could not be stored; the client must try again (451)."""


class SpoolFull(SpoolError):
    """Free space is below spool.min_free_space (452 4.3.1)."""


class NotFound(SpoolError):
    """No queued message has that id (or it is in a state that does not allow the action)."""


class InDelivery(NotFound):
    """The message is in active/: a delivery worker owns it until the attempt ends."""


class CorruptMessage(SpoolError):
    """A queue file could not be parsed; it has been moved to corrupt/."""


@dataclass(frozen=True)
class Envelope:
    """What the client said in the SMTP transaction; never changes once committed."""

    sender: str  # "" is the null reverse-path <>
    recipients: tuple[str, ...]
    client: str = ""
    helo: str = ""
    received_at: float = 0.0
    mail_options: tuple[str, ...] = ()  # e.g. BODY=8BITMIME, SMTPUTF8


@dataclass(frozen=True)
class DeliveryState:
    """What delivery has learnt so far; rewritten on every deferral."""

    attempts: int = 0
    last_error: str = ""
    last_attempt: float = 0.0
    done_recipients: tuple[str, ...] = ()
    failed_recipients: tuple[tuple[str, str], ...] = ()  # (recipient, reply)
    # `relayd queue retry` of a failed message starts its life again (postsuper -r):
    # retry.max_age counts from here. 0: from its arrival.
    requeued_at: float = 0.0
    # Recipients whose failure a DSN has already told the sender about: failing again
    # after a requeue sends no second DSN for the same recipient.
    reported: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict) -> DeliveryState:
        return cls(
            attempts=int(data.get("attempts", 0)),
            last_error=str(data.get("last_error", "")),
            last_attempt=float(data.get("last_attempt", 0.0)),
            done_recipients=tuple(data.get("done_recipients", ())),
            failed_recipients=tuple(tuple(pair) for pair in data.get("failed_recipients", ())),
            requeued_at=float(data.get("requeued_at", 0.0)),
            reported=tuple(data.get("reported", ())),
        )


def requeued(state: DeliveryState, now: float) -> DeliveryState:
    """A failed message's state when an operator retries it: its failed recipients are
    tried again, from a fresh start, and count as already told (a DSN went out for
    each, whatever an older relayd recorded)."""
    told = state.reported + tuple(
        recipient for recipient, _ in state.failed_recipients if recipient not in state.reported
    )
    return replace(state, failed_recipients=(), requeued_at=now, reported=told)


@dataclass(frozen=True)
class QueuedMessage:
    """A message as delivery sees it: envelope, state and where its content lives."""

    queue_id: str
    envelope: Envelope
    state: DeliveryState
    size: int
    path: Path
    content_offset: int = field(repr=False, default=0)
    # The content as the claim read it (it reads the whole file to check the CRC-32),
    # kept for small messages so delivery does not open and read the file again.
    content: bytes | None = field(repr=False, compare=False, default=None)

    @property
    def pending_recipients(self) -> tuple[str, ...]:
        settled = set(self.state.done_recipients) | {r for r, _ in self.state.failed_recipients}
        return tuple(r for r in self.envelope.recipients if r not in settled)

    def read_content(self) -> bytes:
        """The exact content bytes (blocking: call it from a thread).

        Opened as every queue file is (no link followed, no blocking on a FIFO)."""
        if self.content is not None:
            return self.content
        fd, info = open_regular(self.path)
        try:
            return os.pread(fd, max(0, info.st_size - self.content_offset), self.content_offset)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class QueueEntry:
    """One line of ``relayd queue list``."""

    queue_id: str
    state: str
    size: int
    received_at: float
    next_attempt: float | None = None


def new_queue_id(now: float | None = None) -> str:
    micros = int((time.time() if now is None else now) * 1_000_000)
    # Uniqueness, not secrecy: the clock plus 24 random bits (no syscall per message).
    return f"{micros:013X}{random.getrandbits(24):06X}"


def received_at_from_id(queue_id: str) -> float:
    return int(queue_id[:13], 16) / 1_000_000


def is_queue_id(name: str) -> bool:
    return bool(_QUEUE_ID.match(name))


def check_queue_id(queue_id: str) -> None:
    """Ids reach paths: anything else (say "../x") is refused before it gets there."""
    if not is_queue_id(queue_id):
        raise NotFound(
            f"{queue_id!r} is not a queue id (19 hex digits, as `relayd queue list` shows)"
        )

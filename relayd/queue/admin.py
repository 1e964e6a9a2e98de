"""`relayd queue …`: list, show, retry, hold, release, delete and purge queued mail.

Postfix's postqueue/postsuper for relayd. Every change is one of spool.py's atomic
renames, so the command and a running daemon never act on the same message at once:
whoever renames a file out of a directory owns it, and a message in active/ belongs to
a delivery worker until its attempt ends. After a change the running daemon is sent
SIGUSR1 to rescan the spool (see relayd.ops.pidfile for how it is found safely).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from relayd import headers
from relayd.config import Settings
from relayd.ops.pidfile import PID_FILE_NAME, signal_daemon
from relayd.queue.model import (
    STATES,
    DeliveryState,
    Envelope,
    NotFound,
    QueuedMessage,
    QueueEntry,
    SpoolError,
    received_at_from_id,
)
from relayd.queue.spool import Spool

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run(settings: Settings, command: Callable[[QueueAdmin], int]) -> int:
    """Open the spool named by ``settings`` and run one command; print errors plainly."""
    try:
        return command(QueueAdmin.for_settings(settings))
    except AdminError as error:
        print(f"relayd: {error}", file=sys.stderr)
        return error.exit_code
    except SpoolError as error:  # NotFound for `show`, a damaged file
        print(f"relayd: {error}", file=sys.stderr)
        return EXIT_FAILED


class AdminError(Exception):
    """The command cannot run at all (no spool, no terminal to confirm on)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Listing:
    """One message as `relayd queue list` shows it."""

    entry: QueueEntry
    envelope: Envelope | None
    state: DeliveryState

    def as_json(self, now: float) -> dict:
        envelope = self.envelope
        return {
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


class QueueAdmin:
    """The queue commands. Each returns the process exit status."""

    def __init__(
        self, spool: Spool, *, out: TextIO | None = None, stdin: TextIO | None = None
    ) -> None:
        self.spool = spool
        self.out = out or sys.stdout
        self.stdin = stdin or sys.stdin

    @classmethod
    def for_settings(cls, settings: Settings) -> QueueAdmin:
        directory = settings.spool.directory
        if not (directory / "incoming").is_dir():
            raise AdminError(
                f"no spool at {directory} (spool.directory in {settings.source});"
                " has relayd run with this configuration yet?"
            )
        act_as_owner(directory)
        return cls(Spool(directory, min_free_space=settings.spool.min_free_space))

    # --- reading -------------------------------------------------------------------

    def listings(self) -> list[Listing]:
        entries = sorted(self.spool.entries(), key=lambda entry: entry.queue_id)
        return [Listing(entry, *self.spool.peek(entry)) for entry in entries]

    def list(self, *, as_json: bool = False) -> int:
        now = time.time()
        listings = self.listings()
        if as_json:
            json.dump([item.as_json(now) for item in listings], self.out, indent=2)
            self.out.write("\n")
            return EXIT_OK
        if listings:
            self._print(f"{'Queue ID':<19}  {'State':<8}  {'Age':>5}  {'Size':>6}  Tries  Sender")
        for item in listings:
            self._print_listing(item, now)
        self._print(_summary(listings))
        return EXIT_OK

    def show(self, queue_id: str) -> int:
        state, message = self.spool.find(queue_id)
        now = time.time()
        envelope, delivery = message.envelope, message.state
        lines = [
            ("Queue ID", message.queue_id),
            ("State", _state_text(state, message, now)),
            ("Received", _received_text(envelope, message.queue_id, now)),
            ("Sender", f"<{envelope.sender}>"),
            ("Size", f"{_human_size(message.size)} ({message.size} bytes)"),
            ("Attempts", _attempts_text(delivery)),
            ("Last error", delivery.last_error or "-"),
            ("Options", " ".join(envelope.mail_options) or "-"),
            ("Recipients", str(len(envelope.recipients))),
        ]
        for label, value in lines:
            self._print(f"{label + ':':<12} {value}")
        for recipient, outcome in _recipient_outcomes(envelope, delivery):
            self._print(f"  {recipient}  {outcome}")
        block = headers.header_block(message.read_content())
        self._print("\n" + block.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n"))
        return EXIT_OK

    # --- changing ------------------------------------------------------------------

    def hold(self, queue_ids: Sequence[str]) -> int:
        return self._each(queue_ids, self.spool.hold, _hold_text)

    def release(self, queue_ids: Sequence[str]) -> int:
        return self._each(queue_ids, self.spool.release, lambda s: f"released to {s}/, due now")

    def retry(self, queue_ids: Sequence[str]) -> int:
        return self._each(queue_ids, self.spool.retry, _retry_text)

    def retry_all(self, *, include_failed: bool = False) -> int:
        count = self.spool.retry_all(include_failed=include_failed)
        what = "deferred and failed" if include_failed else "deferred"
        self._print(f"{count} {what} message(s) due now")
        self._tell_daemon(count)
        return EXIT_OK

    def delete(self, queue_ids: Sequence[str], *, yes: bool = False) -> int:
        described = [f"  {queue_id}  {self._describe(queue_id)}" for queue_id in queue_ids]
        question = f"Delete {len(queue_ids)} message(s) for good?\n" + "\n".join(described)
        if not self._confirmed(question, yes):
            self._print("nothing deleted")
            return EXIT_FAILED
        return self._each(queue_ids, self.spool.delete, lambda s: f"deleted (was in {s}/)")

    def purge_failed(self, *, yes: bool = False) -> int:
        count = sum(1 for _ in self.spool.entries(("failed",)))
        if count == 0:
            self._print("no failed messages")
            return EXIT_OK
        if not self._confirmed(f"Delete all {count} failed message(s) for good?", yes):
            self._print("nothing deleted")
            return EXIT_FAILED
        purged = self.spool.purge_failed()
        self._print(f"{purged} failed message(s) deleted")
        self._tell_daemon(purged)
        return EXIT_OK

    # --- helpers -------------------------------------------------------------------

    def _each(
        self, queue_ids: Sequence[str], action: Callable[[str], str], done: Callable[[str], str]
    ) -> int:
        """Apply ``action`` to every id; report each; exit 1 if any could not be done."""
        status, changed = EXIT_OK, 0
        for queue_id in queue_ids:
            try:
                self._print(f"{queue_id}: {done(action(queue_id))}")
                changed += 1
            except NotFound as error:
                self._print(f"{queue_id}: {error}", error=True)
                status = EXIT_FAILED
        self._tell_daemon(changed)
        return status

    def _describe(self, queue_id: str) -> str:
        try:
            state, message = self.spool.find(queue_id)
        except NotFound as error:
            return f"({error})"
        except SpoolError:
            return "(unreadable queue file)"
        envelope = message.envelope
        return (
            f"{state}, from <{envelope.sender}> to {len(envelope.recipients)} recipient(s),"
            f" {_human_size(message.size)}"
        )

    def _confirmed(self, question: str, yes: bool) -> bool:
        if yes:
            return True
        if not self.stdin.isatty():
            raise AdminError(
                "refusing to delete without confirmation: there is no terminal to ask on;"
                " add --yes to confirm",
                EXIT_USAGE,
            )
        self.out.write(f"{question}\n[y/N] ")
        self.out.flush()
        return self.stdin.readline().strip().lower() in ("y", "yes")

    def _tell_daemon(self, changed: int) -> None:
        if not changed:
            return
        try:
            pid = signal_daemon(self.spool.directory / PID_FILE_NAME)
        except PermissionError:
            self._print(
                "cannot signal the running relayd (it runs as another user);"
                " it sees the change at its next periodic rescan"
            )
            return
        if pid is None:
            self._print("relayd is not running; the change takes effect when it starts")
        else:
            self._print(f"relayd (pid {pid}) told to rescan the queue")

    def _print_listing(self, item: Listing, now: float) -> None:
        entry, envelope = item.entry, item.envelope
        if envelope is None:
            who = "(unreadable queue file)"
        else:
            count = len(envelope.recipients)
            who = f"<{envelope.sender}> -> {count} recipient{'s' if count != 1 else ''}"
        self._print(
            f"{entry.queue_id:<19}  {entry.state:<8}  {_human_age(now - entry.received_at):>5}"
            f"  {_human_size(entry.size):>6}  {item.state.attempts:>5}  {who}"
        )
        if item.state.last_error:
            self._print(f"{'':<21}last error: {item.state.last_error}")

    def _print(self, text: str, *, error: bool = False) -> None:
        print(text, file=sys.stderr if error else self.out)


def act_as_owner(directory: Path) -> None:
    """Run as the spool's owner when started as root (`sudo relayd queue …`).

    Files the command writes (delivery state when a failed message is retried) must
    stay readable by the daemon's user; root-owned 0600 files would not be.
    """
    if os.geteuid() != 0:
        return
    owner = directory.stat()
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


# --- formatting ------------------------------------------------------------------------


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _human_size(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return str(size)


def _summary(listings: list[Listing]) -> str:
    if not listings:
        return "-- queue is empty"
    counts = {state: 0 for state in STATES}
    for item in listings:
        counts[item.entry.state] += 1
    size = sum(item.entry.size for item in listings)
    states = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    return f"-- {len(listings)} message(s), {_human_size(size)}: {states}"


def _state_text(state: str, message: QueuedMessage, now: float) -> str:
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
    when = "now" if due <= now else f"in {_human_age(due - now)}"
    return f"deferred, next attempt {iso_time(due)} ({when})"


def _received_text(envelope: Envelope, queue_id: str, now: float) -> str:
    received = envelope.received_at or received_at_from_id(queue_id)
    helo = f", HELO {envelope.helo}" if envelope.helo else ""
    client = envelope.client or "unknown client"
    return f"{iso_time(received)} ({_human_age(now - received)} ago) from {client}{helo}"


def _attempts_text(state: DeliveryState) -> str:
    if not state.attempts:
        return "0"
    return f"{state.attempts}, last {iso_time(state.last_attempt)}"


def _recipient_outcomes(envelope: Envelope, state: DeliveryState) -> list[tuple[str, str]]:
    failed = dict(state.failed_recipients)
    done = set(state.done_recipients)

    def outcome(recipient: str) -> str:
        if recipient in done:
            return "delivered"
        if recipient in failed:
            return f"failed: {failed[recipient]}"
        return "pending"

    return [(recipient, outcome(recipient)) for recipient in envelope.recipients]


def _hold_text(previous: str) -> str:
    return "already on hold" if previous == "hold" else f"on hold (was in {previous}/)"


def _retry_text(previous: str) -> str:
    return {
        "deferred": "due now",
        "failed": "moved from failed/ to deferred/, due now",
        "incoming": "already waiting for its first attempt",
    }[previous]

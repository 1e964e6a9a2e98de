"""`relayd queue …`: list, show, shape, retry, hold, release, delete and purge queued mail.

Postfix's postqueue/postsuper/postcat/qshape for relayd. Every change is one of
spool.py's atomic renames, so the command and a running daemon never act on the same
message at once: whoever renames a file out of a directory owns it, and a message in
active/ belongs to a delivery worker until its attempt ends. After a change the running
daemon is sent SIGUSR1 to rescan the spool (see relayd.ops.pidfile for how it is found
safely). The messages a change applies to are ids, ids on standard input (``-``), or a
selection (``--all``, ``--state``, ``--sender``, ``--recipient``, ``--older-than``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from relayd import config, headers
from relayd.config import Settings
from relayd.ops.pidfile import PID_FILE_NAME, signal_daemon
from relayd.queue import listing as show_as
from relayd.queue import shape as qshape
from relayd.queue.listing import Listing, human_age, human_size
from relayd.queue.model import PENDING_STATES, STATES, NotFound, QueueEntry, SpoolError
from relayd.queue.select import Filters, expand_ids
from relayd.queue.spool import Spool
from relayd.queue.why import deliveries_note, route_notes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# What each change applies to when only --all or filters say which messages.
DEFAULT_STATES = {
    "hold": ("incoming", "deferred"),
    "release": ("hold",),
    "retry": ("deferred",),
    "delete": ("incoming", "deferred", "hold", "failed"),
}
CONFIRM_LISTED = 20  # a confirmation names at most this many messages


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
class Target:
    """Which messages a change applies to: ``ids`` (``-`` reads them from standard
    input), or every message that ``filters`` match (``everything``: --all)."""

    ids: Sequence[str] = ()
    filters: Filters = field(default_factory=Filters)
    everything: bool = False

    def check(self) -> None:
        selection = self.everything or self.filters.given
        if bool(self.ids) == selection:
            raise AdminError(
                "give message IDs (or - to read them from standard input), or select"
                " messages with --all, --state, --sender, --recipient, --older-than, --mailbox",
                EXIT_USAGE,
            )


class QueueAdmin:
    """The queue commands. Each returns the process exit status."""

    def __init__(
        self,
        spool: Spool,
        *,
        settings: Settings | None = None,
        out: TextIO | None = None,
        stdin: TextIO | None = None,
    ) -> None:
        self.spool = spool
        self.settings = settings
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
        spool = Spool(directory, min_free_space=settings.spool.min_free_space)
        return cls(spool, settings=settings)

    # --- reading -------------------------------------------------------------------

    def listings(self, filters: Filters | None = None) -> list[Listing]:
        filters = filters or Filters()
        now = time.time()
        mailbox_of = self._mailbox_of(filters)
        entries = sorted(self.spool.entries(filters.states_or(STATES)), key=lambda e: e.queue_id)
        found = (self._listing(entry, mailbox_of) for entry in entries)
        return [
            item for item in found if filters.matches(item.entry, item.envelope, now, mailbox_of)
        ]

    def _listing(self, entry: QueueEntry, mailbox_of: Callable[[str], str] | None) -> Listing:
        envelope, state = self.spool.peek(entry)
        routed = mailbox_of(envelope.sender) if mailbox_of and envelope else None
        return Listing(entry, envelope, state, routed)

    def _mailbox_of(self, filters: Filters) -> Callable[[str], str] | None:
        """Sender → the mailbox it leaves as, when the relay has routes (or --mailbox)."""
        settings = self.settings
        if settings is None or not (settings.routes or filters.mailbox):
            return None
        if filters.mailbox is not None:
            known = config.mailbox_settings(settings)
            if filters.mailbox.strip().lower() not in known:
                raise AdminError(
                    f"--mailbox {filters.mailbox}: not a mailbox of {settings.source}"
                    f" (the mailboxes: {', '.join(known)})",
                    EXIT_USAGE,
                )
        return lambda sender: config.mailbox_for_sender(settings, sender)

    def list(self, *, as_json: bool = False, filters: Filters | None = None) -> int:
        now = time.time()
        listings = self.listings(filters)
        if as_json:
            json.dump([item.as_json(now) for item in listings], self.out, indent=2)
            self.out.write("\n")
            return EXIT_OK
        routed = self.settings is not None and bool(self.settings.routes)
        if listings:
            mailbox = f"{'Mailbox':<24}  " if routed else ""
            self._print(
                f"{'Queue ID':<19}  {'State':<8}  {'Age':>5}  {'Size':>6}  Tries  {mailbox}Sender"
            )
        for item in listings:
            self._print_listing(item, now)
        self._print(show_as.summary(listings))
        if any(item.entry.state in PENDING_STATES for item in listings):
            self._print_note(prefix="-- ")
        return EXIT_OK

    def show(self, queue_id: str, *, body: bool = False) -> int:
        state, message = self.spool.find(queue_id)
        now = time.time()
        envelope, delivery = message.envelope, message.state
        lines = [
            ("Queue ID", message.queue_id),
            ("State", show_as.state_text(state, message, now)),
            ("Received", show_as.received_text(envelope, message.queue_id, now)),
            ("Sender", f"<{envelope.sender}>"),
            ("Size", f"{human_size(message.size)} ({message.size} bytes)"),
            ("Attempts", show_as.attempts_text(delivery)),
            ("Last error", delivery.last_error or "-"),
            ("Options", " ".join(envelope.mail_options) or "-"),
            ("Recipients", str(len(envelope.recipients))),
        ]
        if delivery.requeued_at:
            lines.insert(3, ("Requeued", f"{show_as.iso_time(delivery.requeued_at)} (retry)"))
        if self.settings is not None and self.settings.routes:  # the route it leaves by
            mailbox = config.mailbox_for_sender(self.settings, envelope.sender)
            lines.insert(lines.index(("Sender", f"<{envelope.sender}>")) + 1, ("Mailbox", mailbox))
        for label, value in lines:
            self._print(f"{label + ':':<12} {value}")
        for recipient, outcome in show_as.recipient_outcomes(envelope, delivery):
            self._print(f"  {recipient}  {outcome}")
        if state in PENDING_STATES:
            self._print_note(prefix=f"{'Deliveries:':<12} ")
        content = message.read_content()
        self._print("")
        if body:  # the whole message as stored, as postcat -q shows it
            self.out.flush()
            self._write_bytes(content.replace(b"\r\n", b"\n"))
            return EXIT_OK
        block = headers.header_block(content)
        self._print(block.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n"))
        return EXIT_OK

    def shape(self, *, filters: Filters | None = None, by_sender: bool = False) -> int:
        filters = filters or Filters()
        if not filters.states:
            filters = dataclasses.replace(filters, states=PENDING_STATES)
        items = []
        for item in self.listings(filters):
            state = item.state
            settled = set(state.done_recipients) | {r for r, _ in state.failed_recipients}
            envelope = item.envelope
            pending = tuple(r for r in envelope.recipients if r not in settled) if envelope else ()
            items.append((item.entry, envelope, pending))
        for line in qshape.render(qshape.shape(items, time.time(), by_sender=by_sender)):
            self._print(line)
        return EXIT_OK

    # --- changing ------------------------------------------------------------------

    def hold(self, target: Target) -> int:
        return self._change(target, "hold", self.spool.hold, show_as.hold_text)

    def release(self, target: Target) -> int:
        return self._change(
            target, "release", self.spool.release, lambda s: f"released to {s}/, due now"
        )

    def retry(self, target: Target, *, include_failed: bool = False) -> int:
        states = DEFAULT_STATES["retry"] + (("failed",) if include_failed else ())
        return self._change(target, "retry", self.spool.retry, show_as.retry_text, states)

    def delete(self, target: Target, *, yes: bool = False) -> int:
        target.check()
        queue_ids = self._resolve(target, DEFAULT_STATES["delete"])
        if not queue_ids:
            self._print("no message matches")
            return EXIT_OK
        if not self._confirmed(self._deletion_question(queue_ids), yes):
            self._print("nothing deleted")
            return EXIT_FAILED
        return self._each(
            queue_ids, self.spool.delete, lambda s: f"deleted (was in {s}/)", _selected(target)
        )

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

    def _change(
        self,
        target: Target,
        verb: str,
        action: Callable[[str], str],
        done: Callable[[str], str],
        states: Sequence[str] | None = None,
    ) -> int:
        target.check()
        queue_ids = self._resolve(target, states or DEFAULT_STATES[verb])
        if not queue_ids:
            self._print("no message matches")
            return EXIT_OK
        return self._each(queue_ids, action, done, _selected(target))

    def _resolve(self, target: Target, states: Sequence[str]) -> list[str]:
        if target.ids:
            return expand_ids(target.ids, self.stdin)
        filters = target.filters
        if not filters.states:
            filters = dataclasses.replace(filters, states=tuple(states))
        return [item.entry.queue_id for item in self.listings(filters)]

    def _each(
        self,
        queue_ids: Sequence[str],
        action: Callable[[str], str],
        done: Callable[[str], str],
        summarise: bool = False,
    ) -> int:
        """Apply ``action`` to every id; report each (a selection: one summary line and
        the failures); exit 1 if any could not be done."""
        status, outcomes = EXIT_OK, Counter()
        for queue_id in queue_ids:
            try:
                outcome = done(action(queue_id))
            except NotFound as error:
                self._print(f"{queue_id}: {error}", error=True)
                status = EXIT_FAILED
                continue
            outcomes[outcome] += 1
            if not summarise:
                self._print(f"{queue_id}: {outcome}")
        if summarise:
            for outcome, count in outcomes.most_common():
                self._print(f"{count} message(s) {outcome}")
        self._tell_daemon(sum(outcomes.values()))
        return status

    def _deletion_question(self, queue_ids: Sequence[str]) -> str:
        described = [f"  {q}  {self._describe(q)}" for q in queue_ids[:CONFIRM_LISTED]]
        if len(queue_ids) > CONFIRM_LISTED:
            described.append(f"  … and {len(queue_ids) - CONFIRM_LISTED} more")
        return f"Delete {len(queue_ids)} message(s) for good?\n" + "\n".join(described)

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
            f" {human_size(message.size)}"
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

    def _print_note(self, prefix: str) -> None:
        """Why the waiting mail does not move, when the daemon says it is paused."""
        if self.settings is None:
            return
        note = deliveries_note(self.settings, self.spool.directory)
        if note:
            self._print(prefix + note)
        for route_note in route_notes(self.settings, self.spool.directory):
            self._print(prefix + route_note)

    def _print_listing(self, item: Listing, now: float) -> None:
        entry, envelope = item.entry, item.envelope
        if envelope is None:
            who = "(unreadable queue file)"
        else:
            count = len(envelope.recipients)
            who = f"<{envelope.sender}> -> {count} recipient{'s' if count != 1 else ''}"
        if item.mailbox is not None:
            who = f"{item.mailbox:<24}  {who}"
        self._print(
            f"{entry.queue_id:<19}  {entry.state:<8}  {human_age(now - entry.received_at):>5}"
            f"  {human_size(entry.size):>6}  {item.state.attempts:>5}  {who}"
        )
        if item.state.last_error:
            self._print(f"{'':<21}last error: {item.state.last_error}")

    def _print(self, text: str, *, error: bool = False) -> None:
        print(text, file=sys.stderr if error else self.out)

    def _write_bytes(self, data: bytes) -> None:
        buffer = getattr(self.out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:  # a text stream without bytes (a test's StringIO)
            self.out.write(data.decode("utf-8", "replace"))


def _selected(target: Target) -> bool:
    return not target.ids


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

"""The on-disk queue: the only code that creates, moves or removes queue files.

Layout (Postfix's manner: a message's state is the directory it is in)::

    <spool>/tmp/        being written; never delivered; emptied on start
    <spool>/incoming/   committed, never tried yet
    <spool>/active/     claimed by a delivery worker; back to incoming on start
    <spool>/deferred/   waiting for a retry; the file's mtime is the next attempt
    <spool>/hold/       kept by the operator; never tried, never expires
    <spool>/failed/     permanently failed; kept for the operator
    <spool>/corrupt/    could not be parsed; set aside, never deleted
    <spool>/meta/       <id>.json: attempts, last error, recipients already done

A message file is one JSON line (the envelope) followed by the exact content bytes.
It is written under tmp/ and synced, renamed into incoming/ and the directory fsynced
(``commit``); only then may the listener answer 250.  Every later move is a rename,
which is atomic: whoever renames a file out of a directory owns it, so the daemon and
``relayd queue`` never act on the same message at once.  A message in active/ belongs
to a delivery worker and cannot be deleted by an operator.

The pieces: ``model`` (states, ids, envelopes), ``fileformat`` (the file's bytes),
``commit`` (the group commit behind a 250), ``census`` (counts); this module owns every
later move: claims, outcomes, recovery and the operator's actions.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import structlog

from relayd.queue.census import Census, Counts, scan
from relayd.queue.commit import GroupCommit, fsync_directory
from relayd.queue.fileformat import decode_header, envelope_from_header
from relayd.queue.model import (
    DIRECTORIES,
    STATES,
    CorruptMessage,
    DeliveryState,
    Envelope,
    InDelivery,
    NotFound,
    QueuedMessage,
    QueueEntry,
    check_queue_id,
    is_queue_id,
    received_at_from_id,
    requeued,
)

log = structlog.get_logger("relayd.spool")


_OPERATOR_HINTS = {
    ("hold", "retried"): "; release it (relayd queue release ID)",
    ("failed", "held"): "; retry or delete it",
    ("failed", "released"): "; it is not on hold: retry it to try again",
    ("incoming", "released"): "; it is not on hold",
    ("deferred", "released"): "; it is not on hold",
}


class Spool:
    """All queue file operations. Methods are blocking unless marked async."""

    def __init__(self, directory: Path, *, min_free_space: int = 0) -> None:
        self.directory = Path(directory)
        self.min_free_space = min_free_space
        self._state_directories = {name: self.directory / name for name in DIRECTORIES}
        self._counts = Counts()
        self._commit = GroupCommit(self.directory, min_free_space, self._counts)

    # --- set-up ------------------------------------------------------------------

    def path(self, state: str, queue_id: str = "") -> Path:
        directory = self._state_directories.get(state) or self.directory / state
        return directory / queue_id if queue_id else directory

    def ensure_layout(self) -> None:
        for name in DIRECTORIES:
            self.path(name).mkdir(parents=True, exist_ok=True, mode=0o700)

    def recover(self) -> dict[str, int]:
        """Make the spool consistent after any stop, clean or not. Call before serving.

        Half-written files in tmp/ never got a 250 and are removed. Messages that were
        being delivered (active/) go back to be retried: at worst a duplicate, never a
        loss. Stray files with names that are not queue ids are set aside in corrupt/.
        """
        self.ensure_layout()
        report = {"removed_partial": 0, "requeued": 0, "set_aside": 0}
        for entry in os.scandir(self.path("tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                report["removed_partial"] += 1
        for entry in os.scandir(self.path("active")):
            target = "deferred" if self._meta_path(entry.name).exists() else "incoming"
            self._rename(entry.name, "active", target)
            report["requeued"] += 1
        # One pass over the queue both counts it and sets strays aside: with 100,000
        # messages queued, each pass costs a good part of a second before READY=1.
        strays = self._scan()
        for path in strays:
            self._set_aside(path, "file name is not a queue id")
        report["set_aside"] = len(strays)
        fsync_directory(self.path("incoming"))
        return report

    # --- accepting ---------------------------------------------------------------

    def free_space(self) -> int:
        return self._commit.free_space()

    def has_room_for(self, size: int = 0) -> bool:
        """Whether ``size`` more bytes leave at least spool.min_free_space free."""
        return self._commit.has_room_for(size)

    async def commit(self, queue_id: str, envelope: Envelope, content: bytes) -> None:
        """Store a message durably. When this returns, the listener may answer 250."""
        await self._commit.commit(queue_id, envelope, content)

    # --- delivery ----------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: set[str] | None = None) -> list[str]:
        """Up to ``limit`` ids ready for delivery: incoming first (oldest first), then
        deferred messages whose next attempt (mtime) has come."""
        exclude = exclude or set()
        # nsmallest, not a full sort: a scan of 100,000 queued takes about half as long.
        found = heapq.nsmallest(limit, (n for n in self._names("incoming") if n not in exclude))
        if len(found) < limit:
            ready = (
                (mtime, entry.name)
                for entry in self._entries("deferred")
                if entry.name not in exclude and (mtime := entry.stat().st_mtime) <= now
            )
            found += [name for _, name in heapq.nsmallest(limit - len(found), ready)]
        return found

    def next_deferred_time(self) -> float | None:
        """When the earliest deferred message becomes due, or None."""
        times = [entry.stat().st_mtime for entry in self._entries("deferred")]
        return min(times) if times else None

    def claim(self, queue_id: str) -> QueuedMessage | None:
        """Take a message for delivery (incoming/deferred → active).

        Returns None when somebody else took it first (another worker, or an
        operator's hold/delete). A file that cannot be parsed is moved to corrupt/ and
        CorruptMessage is raised.
        """
        active = self.path("active", queue_id)
        for state in ("incoming", "deferred"):
            try:
                os.rename(self.path(state, queue_id), active)
            except FileNotFoundError:
                continue
            try:
                message = self._read_message(active, queue_id)
            except CorruptMessage:
                self._count(state, -1, -_size_or_zero(active), queue_id=queue_id)
                self._set_aside(active, "cannot parse the queue file")
                raise
            # Counted after reading: the file's size is known then, without a stat.
            self._count(state, -1, -message.size, queue_id=queue_id)
            self._count("active", +1, message.size, queue_id=queue_id)
            return message
        return None

    def delivered(self, message: QueuedMessage) -> None:
        """Delivery is complete for every recipient: forget the message."""
        self._remove_meta(message.queue_id)
        os.unlink(self.path("active", message.queue_id))
        self._count("active", -1, -message.size, queue_id=message.queue_id)

    def defer(self, message: QueuedMessage, state: DeliveryState, next_attempt: float) -> None:
        """Put a message back to wait until ``next_attempt`` (a Unix time)."""
        self._write_meta(message.queue_id, state)
        os.utime(self.path("active", message.queue_id), (next_attempt, next_attempt))
        self._rename(message.queue_id, "active", "deferred", message.size)

    def release_claim(self, message: QueuedMessage) -> None:
        """Give a claimed message back untouched (shutdown, paused upstream)."""
        target = "deferred" if self._meta_path(message.queue_id).exists() else "incoming"
        if target == "deferred":
            now = time.time()
            os.utime(self.path("active", message.queue_id), (now, now))
        self._rename(message.queue_id, "active", target, message.size)

    def fail(self, message: QueuedMessage, state: DeliveryState) -> None:
        """Delivery failed permanently: keep it in failed/ for the operator."""
        self._write_meta(message.queue_id, state)
        self._rename(message.queue_id, "active", "failed", message.size)

    # --- operator actions (relayd queue ...) ----------------------------------------

    def entries(self, states: Iterable[str] = STATES) -> Iterator[QueueEntry]:
        for state in states:
            for entry in self._entries(state):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    yield QueueEntry(
                        queue_id=entry.name,
                        state=state,
                        size=stat.st_size,
                        received_at=received_at_from_id(entry.name),
                        next_attempt=stat.st_mtime if state == "deferred" else None,
                    )

    def peek(self, entry: QueueEntry) -> tuple[Envelope | None, DeliveryState]:
        """Envelope and delivery state for `relayd queue list`, reading only the file's
        first line (cheap even for a 35 MiB message). The envelope is None when the
        file cannot be read (gone meanwhile, or damaged)."""
        try:
            with open(self.path(entry.state, entry.queue_id), "rb") as handle:
                header = json.loads(handle.readline(1_000_000))
            envelope: Envelope | None = envelope_from_header(header, entry.queue_id)
        except (OSError, ValueError, CorruptMessage):
            envelope = None
        return envelope, self._read_meta(entry.queue_id)

    def find(self, queue_id: str) -> tuple[str, QueuedMessage]:
        """The state and parsed message for an id, wherever it is."""
        check_queue_id(queue_id)
        for state in STATES:
            path = self.path(state, queue_id)
            with contextlib.suppress(FileNotFoundError):
                return state, self._read_message(path, queue_id)
        raise NotFound(f"no message {queue_id} in the queue")

    def move(self, queue_id: str, source: str, target: str) -> None:
        """Operator move (hold, release, requeue). Raises NotFound if not in ``source``."""
        try:
            size = self.path(source, queue_id).stat().st_size
            if target == "deferred":
                now = time.time()
                os.utime(self.path(source, queue_id), (now, now))
            self._rename(queue_id, source, target, size)
        except FileNotFoundError:
            raise NotFound(f"no message {queue_id} in {source}/") from None

    def delete(
        self, queue_id: str, states: Iterable[str] = ("incoming", "deferred", "hold", "failed")
    ) -> str:
        """Remove a message for good; never one that is being delivered (active/)."""
        check_queue_id(queue_id)
        for state in states:
            path = self.path(state, queue_id)
            try:
                size = path.stat().st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
            self._remove_meta(queue_id)
            self._count(state, -1, -size, queue_id=queue_id)
            return state
        self._refuse(queue_id, "deleted")

    def hold(self, queue_id: str) -> str:
        """Keep a waiting message from delivery until released. Returns its old state."""
        check_queue_id(queue_id)
        if self.path("hold", queue_id).exists():
            return "hold"
        for source in ("incoming", "deferred"):
            with contextlib.suppress(NotFound):
                self.move(queue_id, source, "hold")
                return source
        self._refuse(queue_id, "held")

    def release(self, queue_id: str) -> str:
        """Put a held message back: due now in deferred/ if delivery has tried it
        before (its recipients already done stay done), else in incoming/. Returns
        the state it went to."""
        check_queue_id(queue_id)
        target = "deferred" if self._meta_path(queue_id).exists() else "incoming"
        try:
            self.move(queue_id, "hold", target)
        except NotFound:
            self._refuse(queue_id, "released")
        return target

    def retry(self, queue_id: str) -> str:
        """Make a message due now; returns the state it was in.

        Deferred: its next attempt (mtime) becomes now. Failed: back to deferred, due
        now, with its permanently failed recipients to be tried again (recipients
        already delivered stay done, so nobody gets it twice); its life starts again
        (retry.max_age counts from now, as after Postfix's postsuper -r), and the
        recipients a DSN already named get no second one. Incoming: already due.
        """
        check_queue_id(queue_id)
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path("deferred", queue_id), (now, now))
            return "deferred"
        if self.path("failed", queue_id).exists():
            # failed/ is the operator's: the daemon never touches it, so the state can
            # be rewritten before the message moves where delivery will see it.
            state = self._read_meta(queue_id)
            self._write_meta(queue_id, requeued(state, now))
            self.move(queue_id, "failed", "deferred")
            return "failed"
        if self.path("incoming", queue_id).exists():
            return "incoming"
        self._refuse(queue_id, "retried")

    def retry_all(self, include_failed: bool = False) -> int:
        """Every deferred message (and failed ones if asked) due now; how many."""
        count = 0
        now = time.time()
        for name in self._names("deferred"):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path("deferred", name), (now, now))
                count += 1
        if include_failed:
            for name in self._names("failed"):
                with contextlib.suppress(NotFound):
                    self.retry(name)
                    count += 1
        return count

    def purge_failed(self) -> int:
        """Delete every message in failed/; how many."""
        count = 0
        for name in self._names("failed"):
            with contextlib.suppress(NotFound):
                self.delete(name, states=("failed",))
                count += 1
        return count

    def _refuse(self, queue_id: str, action: str) -> NoReturn:
        """Explain why an operator action found nothing to act on."""
        if self.path("active", queue_id).exists():
            raise InDelivery(
                f"{queue_id} is being delivered right now (active/) and cannot be {action};"
                " try again when this attempt ends"
            )
        for state in STATES:
            if self.path(state, queue_id).exists():
                hint = _OPERATOR_HINTS.get((state, action), "")
                raise NotFound(f"{queue_id} is in {state}/ and cannot be {action}{hint}")
        raise NotFound(f"no message {queue_id} in the queue")

    # --- counting ----------------------------------------------------------------

    def take_census(self) -> Census:
        """Recount from disk (start-up, and periodically to see operator changes)."""
        self._scan()
        return self.census()

    def _scan(self) -> list[str]:
        """Recount every state from disk; the paths of files whose names are not queue ids."""
        census, strays = scan(self.path)
        self._counts.replace(census)
        return strays

    def census(self) -> Census:
        """The current counters (cheap; kept up to date by every move this process makes)."""
        return self._counts.snapshot()

    def _count(self, state: str, delta: int, size: int, *, queue_id: str) -> None:
        self._counts.count(state, delta, size, queue_id=queue_id)

    # --- helpers -----------------------------------------------------------------

    def _names(self, state: str) -> list[str]:
        return [entry.name for entry in self._entries(state)]

    def _entries(self, state: str) -> Iterator[os.DirEntry]:
        with os.scandir(self.path(state)) as entries:
            for entry in entries:
                if is_queue_id(entry.name):
                    yield entry

    def _rename(self, queue_id: str, source: str, target: str, size: int | None = None) -> None:
        os.rename(self.path(source, queue_id), self.path(target, queue_id))
        if size is None:
            with contextlib.suppress(OSError):
                size = self.path(target, queue_id).stat().st_size
        self._count(source, -1, -(size or 0), queue_id=queue_id)
        self._count(target, +1, size or 0, queue_id=queue_id)

    def _read_message(self, path: Path, queue_id: str) -> QueuedMessage:
        try:
            with open(path, "rb") as handle:
                header_line = handle.readline(1_000_000)
                offset = handle.tell()
                header = json.loads(header_line)
                content = handle.read()
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as error:
            raise CorruptMessage(f"{queue_id}: {error}") from None
        envelope = decode_header(header, queue_id, content)
        return QueuedMessage(
            queue_id=queue_id,
            envelope=envelope,
            state=self._read_meta(queue_id),
            size=offset + len(content),
            path=path,
            content_offset=offset,
        )

    def _meta_path(self, queue_id: str) -> Path:
        return self.path("meta", f"{queue_id}.json")

    def _read_meta(self, queue_id: str) -> DeliveryState:
        try:
            return DeliveryState.from_json(json.loads(self._meta_path(queue_id).read_bytes()))
        except FileNotFoundError:
            return DeliveryState()
        except (OSError, ValueError, TypeError):
            log.warning("unreadable delivery state, starting afresh", queue_id=queue_id)
            return DeliveryState()

    def _write_meta(self, queue_id: str, state: DeliveryState) -> None:
        """Atomic and durable: recipients already delivered must not be sent twice."""
        data = json.dumps(asdict(state)).encode()
        tmp = self.path("tmp", f"{queue_id}.meta")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._meta_path(queue_id))

    def _remove_meta(self, queue_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._meta_path(queue_id))

    def _set_aside(self, path: Path | str, reason: str) -> None:
        name = Path(path).name
        target = self.path("corrupt", name)
        if target.exists():
            target = self.path("corrupt", f"{name}.{int(time.time() * 1000)}")
        os.rename(path, target)
        log.error("queue file set aside", file=name, reason=reason, moved_to=str(target))


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0

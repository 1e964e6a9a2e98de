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
It is written whole under tmp/ and synced, renamed into incoming/ and the directory
fsynced (``commit``); only then may the listener answer 250.  Every later move is a
rename, which is atomic: whoever renames a file out of a directory owns it, so the
daemon and ``relayd queue`` never act on the same message at once.  A message in
active/ belongs to a delivery worker and cannot be deleted by an operator.

Queue files are only ever opened without following a link and without blocking
(``relayd.ops.files.open_regular``): a symlink, FIFO, device or directory under a queue
id's name is set aside in corrupt/, never read.

The pieces: ``model`` (states, ids, envelopes), ``fileformat`` (the file's bytes),
``commit`` (the group commit behind a 250), ``moves`` (what follows an attempt, durable
before anything depends on it), ``census`` (counts); this module owns claims, recovery
and the operator's actions.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import structlog

from relayd.ops.files import NotRegular, writable_by_others
from relayd.queue import recovery
from relayd.queue.census import Census, Counts, scan
from relayd.queue.commit import GroupCommit
from relayd.queue.fileformat import envelope_from_header
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
from relayd.queue.moves import DEFERRED, DELIVERED, FAILED, RELEASED, Move, Mover
from relayd.queue.reading import read_header_line, read_message, read_sender, read_state

log = structlog.get_logger("relayd.spool")

# A message whose file could not be read (EIO…) waits this long in deferred/ before
# the next try: not corrupt (it is not set aside), and not retried in a tight loop.
READ_RETRY_DELAY = 60.0


_OPERATOR_HINTS = {
    ("hold", "retried"): "; release it (relayd queue release ID)",
    ("failed", "held"): "; retry or delete it",
    ("failed", "released"): "; it is not on hold: retry it to try again",
    ("incoming", "released"): "; it is not on hold",
    ("deferred", "released"): "; it is not on hold",
}


class Spool:
    """All queue file operations. Methods are blocking unless marked async."""

    def __init__(
        self, directory: Path, *, min_free_space: int = 0, writer_process: bool = False
    ) -> None:
        """``writer_process``: small messages are written by processes of their own
        (``relayd.queue.writer``), as the daemon does; else by this one's threads."""
        self.directory = Path(directory)
        self.min_free_space = min_free_space
        self._state_directories = {name: self.directory / name for name in DIRECTORIES}
        self._counts = Counts()
        self._commit = GroupCommit(
            self.directory, min_free_space, self._counts, writer_process=writer_process
        )
        self._mover = Mover(self.path, self._counts)

    # --- set-up ------------------------------------------------------------------

    def path(self, state: str, queue_id: str = "") -> Path:
        directory = self._state_directories.get(state) or self.directory / state
        return directory / queue_id if queue_id else directory

    def ensure_layout(self) -> None:
        for name in DIRECTORIES:
            self.path(name).mkdir(parents=True, exist_ok=True, mode=0o700)

    def exposure(self) -> str | None:
        """Why the spool is unsafe to use (others may write in it), or None."""
        for directory in (self.directory, *self._state_directories.values()):
            problem = writable_by_others(directory)
            if problem:
                return problem
        return None

    def recover(self) -> dict[str, int]:
        """Make the spool consistent after any stop, clean or not. Call before serving
        (``relayd.queue.recovery``)."""
        return recovery.recover(self)

    # --- accepting ---------------------------------------------------------------

    def free_space(self) -> int:
        return self._commit.free_space()

    def has_room_for(self, size: int = 0) -> bool:
        """Whether ``size`` more bytes leave at least spool.min_free_space free."""
        return self._commit.has_room_for(size)

    async def commit(
        self, queue_id: str, envelope: Envelope, content: bytes | Sequence[bytes | memoryview]
    ) -> None:
        """Store a message durably (its bytes, or its parts in order). When this
        returns, the listener may answer 250."""
        await self._commit.commit(queue_id, envelope, content)

    async def start_writers(self) -> None:
        """Start the writer processes now (``writer_process``), not at the first commit."""
        await self._commit.start()

    async def stop_writers(self) -> None:
        """Stop the writer processes, if there are any."""
        await self._commit.close()

    # --- delivery ----------------------------------------------------------------

    def due(
        self,
        now: float,
        limit: int,
        exclude: set[str] | None = None,
        owns: Callable[[str, str], bool] | None = None,
    ) -> list[str]:
        """Up to ``limit`` ids ready for delivery: incoming first (oldest first), then
        deferred ones now due (mtime); with ``owns`` (id, state), a route's ids only."""
        exclude = exclude or set()
        names = (n for n in self._names("incoming") if n not in exclude)
        if owns is not None:
            names = (n for n in names if owns(n, "incoming"))
        # nsmallest, not a full sort: a scan of 100,000 queued takes about half as long.
        found = heapq.nsmallest(limit, names)
        if len(found) < limit:
            ready = (
                (mtime, name)
                for mtime, name in self._mtimes("deferred")
                if name not in exclude and mtime <= now and (owns is None or owns(name, "deferred"))
            )
            found += [name for _, name in heapq.nsmallest(limit - len(found), ready)]
        return found

    def next_deferred_time(self) -> float | None:
        """When the earliest deferred message becomes due, or None."""
        return min((mtime for mtime, _ in self._mtimes("deferred")), default=None)

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
            except OSError:
                self._put_back(queue_id, state)
                raise
            # Counted after reading: the file's size is known then, without a stat.
            self._count(state, -1, -message.size, queue_id=queue_id)
            self._count("active", +1, message.size, queue_id=queue_id)
            return message
        return None

    def _put_back(self, queue_id: str, state: str) -> None:
        """The file could not be read (EIO…): that is no reason to call it corrupt.
        It waits in deferred/ for READ_RETRY_DELAY; a failure here leaves it in active/
        for recovery (the error that brought us here is being raised)."""
        with contextlib.suppress(OSError):
            size = _size_or_zero(self.path("active", queue_id))
            later = time.time() + READ_RETRY_DELAY
            os.utime(self.path("active", queue_id), (later, later))
            os.rename(self.path("active", queue_id), self.path("deferred", queue_id))
            self._count(state, -1, -size, queue_id=queue_id)
            self._count("deferred", +1, size, queue_id=queue_id)

    def apply(self, moves: Sequence[Move]) -> list[OSError | None]:
        """Settled attempts, in one batch (see ``relayd.queue.moves``): per move, None
        or the error that stopped it (that message stays in active/)."""
        return self._mover.apply(moves)

    def delivered(self, message: QueuedMessage) -> None:
        """Delivery is complete for every recipient: forget the message."""
        self._apply_one(Move(message, DELIVERED))

    def defer(self, message: QueuedMessage, state: DeliveryState, next_attempt: float) -> None:
        """Put a message back to wait until ``next_attempt`` (a Unix time)."""
        self._apply_one(Move(message, DEFERRED, state, next_attempt))

    def release_claim(self, message: QueuedMessage) -> None:
        """Give a claimed message back untouched (shutdown, paused upstream)."""
        self._apply_one(Move(message, RELEASED))

    def fail(self, message: QueuedMessage, state: DeliveryState) -> None:
        """Delivery failed permanently: keep it in failed/ for the operator."""
        self._apply_one(Move(message, FAILED, state))

    def _apply_one(self, move: Move) -> None:
        (error,) = self._mover.apply([move])
        if error is not None:
            raise error

    # --- operator actions (relayd queue ...) ----------------------------------------

    def entries(self, states: Iterable[str] = STATES) -> Iterator[QueueEntry]:
        for state in states:
            for entry in self._entries(state):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat(follow_symlinks=False)
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
            header = json.loads(read_header_line(self.path(entry.state, entry.queue_id)))
            envelope: Envelope | None = envelope_from_header(header, entry.queue_id)
        except (OSError, ValueError, CorruptMessage):
            envelope = None
        try:
            state = self._read_meta(entry.queue_id)
        except OSError:
            state = DeliveryState()
        return envelope, state

    def sender(self, state: str, queue_id: str) -> str | None:
        """The envelope sender (routes: which mailbox it leaves as); None: unreadable."""
        return read_sender(self.path(state, queue_id), queue_id)

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
            self._mover.write_meta_durably(queue_id, requeued(state, now))
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

    def _scan(self, names: set[str] | None = None) -> list[str]:
        """Recount every state from disk; the paths of files whose names are not queue
        ids. The ids found are added to ``names`` when given."""
        census, strays = scan(self.path, names, self._counts.tracked)
        self._counts.replace(census)
        return strays

    def census(self) -> Census:
        """The current counters (cheap; kept up to date by every move this process makes)."""
        return self._counts.snapshot()

    @property
    def recount_wanted(self) -> bool:
        """The counters no longer know the oldest message: take_census() soon."""
        return self._counts.recount_wanted

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

    def _mtimes(self, state: str) -> Iterator[tuple[float, str]]:
        """(mtime, id) of each file in ``state``; a link's own, never its target's."""
        for entry in self._entries(state):
            with contextlib.suppress(FileNotFoundError):  # moved on meanwhile
                yield entry.stat(follow_symlinks=False).st_mtime, entry.name

    def _rename(self, queue_id: str, source: str, target: str, size: int | None = None) -> None:
        os.rename(self.path(source, queue_id), self.path(target, queue_id))
        if size is None:
            with contextlib.suppress(OSError):
                size = self.path(target, queue_id).stat().st_size
        self._count(source, -1, -(size or 0), queue_id=queue_id)
        self._count(target, +1, size or 0, queue_id=queue_id)

    def _read_message(self, path: Path, queue_id: str) -> QueuedMessage:
        return read_message(path, queue_id, self._read_meta)

    def _meta_path(self, queue_id: str) -> Path:
        return self._mover.meta_path(queue_id)

    def _read_meta(self, queue_id: str) -> DeliveryState:
        """The delivery state; a fresh one when there is none. A damaged one is logged
        and starts afresh; a read error (EIO…) is raised: guessing would re-send."""
        path = self._meta_path(queue_id)
        try:
            return read_state(path)
        except NotRegular:
            self._set_aside(path, "not a regular file")
        except (ValueError, TypeError):
            log.warning("unreadable delivery state, starting afresh", queue_id=queue_id)
        return DeliveryState()

    def _remove_meta(self, queue_id: str) -> None:
        self._mover.remove_meta(queue_id)

    def _set_aside(self, path: Path | str, reason: str) -> None:
        name = Path(path).name
        target = self.path("corrupt", name)
        if os.path.lexists(target):
            target = self.path("corrupt", f"{name}.{int(time.time() * 1000)}")
        os.rename(path, target)
        log.error("queue file set aside", file=name, reason=reason, moved_to=str(target))


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0

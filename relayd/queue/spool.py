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

Queue ids sort by arrival time: 13 hex digits of microseconds since the epoch and
6 random hex digits, so a directory listing sorted by name is the arrival order and
a message's age is readable from its name.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import random
import re
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NoReturn

import structlog

from relayd.queue.batch import ThreadBatcher

log = structlog.get_logger("relayd.spool")

FORMAT_VERSION = 1
QUEUED_STATES = ("incoming", "active", "deferred", "hold")
# Waiting to be delivered: what queue depth and the oldest message's age are about
# (held messages wait for the operator, not for the upstream).
PENDING_STATES = ("incoming", "active", "deferred")
STATES = (*QUEUED_STATES, "failed")
_DIRECTORIES = ("tmp", *STATES, "corrupt", "meta")
_QUEUE_ID = re.compile(r"^[0-9A-F]{19}$")
FREE_SPACE_TTL = 0.5
# Threads that write and sync one group commit's files in parallel: the commit thread
# and a pool of the others.
_WRITERS = 8
# Queue files are opened with O_DSYNC: the write returns only when the content and the
# metadata needed to read it back (size, blocks) are on disk, fdatasync(2)'s guarantee,
# in the same system call: one call and one GIL hand-over fewer per message than write +
# fsync (bench/README.md). Where the flag does not exist, the file is fsynced after.
_SYNCED_WRITES = getattr(os, "O_DSYNC", 0)
_NEW_QUEUE_FILE = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | _SYNCED_WRITES
)


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

    @classmethod
    def from_json(cls, data: dict) -> DeliveryState:
        return cls(
            attempts=int(data.get("attempts", 0)),
            last_error=str(data.get("last_error", "")),
            last_attempt=float(data.get("last_attempt", 0.0)),
            done_recipients=tuple(data.get("done_recipients", ())),
            failed_recipients=tuple(tuple(pair) for pair in data.get("failed_recipients", ())),
        )


@dataclass(frozen=True)
class QueuedMessage:
    """A message as delivery sees it: envelope, state and where its content lives."""

    queue_id: str
    envelope: Envelope
    state: DeliveryState
    size: int
    path: Path
    content_offset: int = field(repr=False, default=0)

    @property
    def pending_recipients(self) -> tuple[str, ...]:
        settled = set(self.state.done_recipients) | {r for r, _ in self.state.failed_recipients}
        return tuple(r for r in self.envelope.recipients if r not in settled)

    def read_content(self) -> bytes:
        """The exact content bytes (blocking: call it from a thread for big messages)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.content_offset)
            return handle.read()


@dataclass(frozen=True)
class QueueEntry:
    """One line of ``relayd queue list``."""

    queue_id: str
    state: str
    size: int
    received_at: float
    next_attempt: float | None = None


@dataclass
class Census:
    """Counts, bytes and the oldest arrival per state, read from disk."""

    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    oldest_received_at: float | None = None

    @property
    def pending(self) -> int:
        return sum(self.messages[state] for state in PENDING_STATES)

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest pending message has waited (0 when none is pending)."""
        oldest = self.oldest_received_at
        return max(0.0, now - oldest) if oldest else 0.0


def new_queue_id(now: float | None = None) -> str:
    micros = int((time.time() if now is None else now) * 1_000_000)
    # Uniqueness, not secrecy: the clock plus 24 random bits (no syscall per message).
    return f"{micros:013X}{random.getrandbits(24):06X}"


def received_at_from_id(queue_id: str) -> float:
    return int(queue_id[:13], 16) / 1_000_000


def is_queue_id(name: str) -> bool:
    return bool(_QUEUE_ID.match(name))


def _check_queue_id(queue_id: str) -> None:
    """Ids reach paths: anything else (say "../x") is refused before it gets there."""
    if not is_queue_id(queue_id):
        raise NotFound(
            f"{queue_id!r} is not a queue id (19 hex digits, as `relayd queue list` shows)"
        )


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
        # Concurrent commits share a thread hop and a directory fsync (_write_batch).
        self._committer = ThreadBatcher(self._write_batch, "spool-commit")
        self._fsync_pool = ThreadPoolExecutor(_WRITERS - 1, thread_name_prefix="spool-fsync")
        # The commit path runs for every message with the GIL held between system calls:
        # plain strings, because a pathlib join costs microseconds each time.
        self._tmp_dir = os.path.join(self.directory, "tmp")
        self._incoming_dir = os.path.join(self.directory, "incoming")
        self._state_directories = {name: self.directory / name for name in _DIRECTORIES}
        self._free_bytes = 0
        self._free_checked_at = -FREE_SPACE_TTL
        self._lock = threading.Lock()  # guards the counters below
        self._census = Census()

    # --- set-up ------------------------------------------------------------------

    def path(self, state: str, queue_id: str = "") -> Path:
        directory = self._state_directories.get(state) or self.directory / state
        return directory / queue_id if queue_id else directory

    def ensure_layout(self) -> None:
        for name in _DIRECTORIES:
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
        self._fsync_directory(self.path("incoming"))
        return report

    # --- accepting ---------------------------------------------------------------

    def free_space(self) -> int:
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize

    def has_room_for(self, size: int = 0) -> bool:
        """Whether ``size`` more bytes leave at least min_free_space free.

        statvfs runs at most every FREE_SPACE_TTL seconds; bytes committed since are
        subtracted from the last reading, so a burst cannot overshoot the minimum.
        """
        now = time.monotonic()
        if now - self._free_checked_at > FREE_SPACE_TTL:
            self._free_bytes = self.free_space()
            self._free_checked_at = now
        return self._free_bytes - size >= self.min_free_space

    async def commit(self, queue_id: str, envelope: Envelope, content: bytes) -> None:
        """Store a message durably. When this returns, the listener may answer 250.

        Concurrent commits are grouped: one thread writes and fsyncs a batch of files,
        renames them and fsyncs incoming/ once for the whole batch.
        """
        if not self.has_room_for(len(content)):
            raise SpoolFull("insufficient free space in the spool")
        await self._committer.submit(_Job(queue_id, envelope, content))

    def _write_batch(self, jobs: list[_Job]) -> list[BaseException | None]:
        """Runs in the commit thread: write + fsync each file (the fsyncs in parallel, so
        they share the filesystem's journal commits), rename each, fsync the directory.

        The batch is cut into one slice per thread (not one task per file): each task
        costs Python work under the GIL that the event loop is waiting for. This thread
        writes the first slice itself, so a batch of one (a single client) takes no
        extra thread hop."""
        per_thread = -(-len(jobs) // _WRITERS)  # ceiling division
        slices = [jobs[start : start + per_thread] for start in range(0, len(jobs), per_thread)]
        others = [self._fsync_pool.submit(self._write_slice, part) for part in slices[1:]]
        parts = [self._write_slice(slices[0]), *(future.result() for future in others)]
        written = [size for part in parts for size in part]  # file size or error, in order
        results: list[BaseException | None] = []
        for job, outcome in zip(jobs, written, strict=True):
            if isinstance(outcome, SpoolError):
                results.append(outcome)
                continue
            try:
                os.rename(
                    os.path.join(self._tmp_dir, job.queue_id),
                    os.path.join(self._incoming_dir, job.queue_id),
                )
                results.append(None)
            except OSError as error:
                with contextlib.suppress(OSError):  # never leave it behind in tmp/
                    os.unlink(os.path.join(self._tmp_dir, job.queue_id))
                results.append(SpoolError(f"cannot queue the file: {error.strerror}"))
        try:
            self._fsync_directory(self._incoming_dir)
        except OSError as error:
            # The renames may not be durable: un-queue them so that nothing that will
            # get a 451 is delivered as well (the client will send it again).
            for job, result in zip(jobs, results, strict=True):
                if result is None:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self._incoming_dir, job.queue_id))
            failure = SpoolError(f"cannot sync the spool directory: {error.strerror}")
            return [failure for _ in jobs]
        for job, size, result in zip(jobs, written, results, strict=True):
            if result is None:
                self._free_bytes -= size
                self._count("incoming", +1, size, job.envelope.received_at)
        return results

    def _write_slice(self, jobs: list[_Job]) -> list[int | SpoolError]:
        return [self._write_tmp(job) for job in jobs]

    def _write_tmp(self, job: _Job) -> int | SpoolError:
        """Write one file under tmp/ to disk: its size (as take_census() counts it),
        or the error instead of raising it (this runs in a pool)."""
        path = os.path.join(self._tmp_dir, job.queue_id)
        header = _encode_header(job.queue_id, job.envelope, job.content)
        try:
            fd = os.open(path, _NEW_QUEUE_FILE, 0o600)
            try:
                os.writev(fd, [header, job.content])
                if not _SYNCED_WRITES:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return SpoolError(f"cannot write queue file: {error.strerror}")
        return len(header) + len(job.content)

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
                self._count(state, -1, -_size_or_zero(active))
                self._set_aside(active, "cannot parse the queue file")
                raise
            # Counted after reading: the file's size is known then, without a stat.
            self._count(state, -1, -message.size)
            self._count("active", +1, message.size, received_at_from_id(queue_id))
            return message
        return None

    def delivered(self, message: QueuedMessage) -> None:
        """Delivery is complete for every recipient: forget the message."""
        self._remove_meta(message.queue_id)
        os.unlink(self.path("active", message.queue_id))
        self._count("active", -1, -message.size)

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
            envelope: Envelope | None = _envelope_from_header(header, entry.queue_id)
        except (OSError, ValueError, CorruptMessage):
            envelope = None
        return envelope, self._read_meta(entry.queue_id)

    def find(self, queue_id: str) -> tuple[str, QueuedMessage]:
        """The state and parsed message for an id, wherever it is."""
        _check_queue_id(queue_id)
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
        _check_queue_id(queue_id)
        for state in states:
            path = self.path(state, queue_id)
            try:
                size = path.stat().st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
            self._remove_meta(queue_id)
            self._count(state, -1, -size)
            return state
        self._refuse(queue_id, "deleted")

    def hold(self, queue_id: str) -> str:
        """Keep a waiting message from delivery until released. Returns its old state."""
        _check_queue_id(queue_id)
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
        _check_queue_id(queue_id)
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
        already delivered stay done, so nobody gets it twice). Incoming: already due.
        """
        _check_queue_id(queue_id)
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path("deferred", queue_id), (now, now))
            return "deferred"
        if self.path("failed", queue_id).exists():
            # failed/ is the operator's: the daemon never touches it, so the state can
            # be rewritten before the message moves where delivery will see it.
            state = self._read_meta(queue_id)
            self._write_meta(queue_id, replace(state, failed_recipients=()))
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
        """Count every state from disk and make that the census; the paths of files
        whose names are not queue ids (which the count skips).

        Per file only what the census needs: the name (ids sort by arrival, so the
        smallest pending name is the oldest message) and one stat for the size.
        """
        census = Census()
        strays: list[str] = []
        oldest = ""
        for state in STATES:
            count = size = 0
            with os.scandir(self.path(state)) as entries:
                for entry in entries:
                    if not is_queue_id(entry.name):
                        strays.append(entry.path)
                        continue
                    try:
                        size += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:  # moved on meanwhile; the next count sees it
                        continue
                    count += 1
                    if state in PENDING_STATES and (not oldest or entry.name < oldest):
                        oldest = entry.name
            census.messages[state], census.bytes[state] = count, size
        census.oldest_received_at = received_at_from_id(oldest) if oldest else None
        with self._lock:
            self._census = census
        return strays

    def census(self) -> Census:
        """The current counters (cheap; kept up to date by every move this process makes)."""
        with self._lock:
            return Census(
                dict(self._census.messages),
                dict(self._census.bytes),
                self._census.oldest_received_at,
            )

    def _count(self, state: str, delta: int, size: int, received_at: float = 0.0) -> None:
        with self._lock:
            self._census.messages[state] += delta
            self._census.bytes[state] += size
            if delta > 0 and received_at and state in PENDING_STATES:
                oldest = self._census.oldest_received_at
                if oldest is None or received_at < oldest:
                    self._census.oldest_received_at = received_at
            if self._census.pending == 0:
                self._census.oldest_received_at = None

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
        self._count(source, -1, -(size or 0))
        self._count(target, +1, size or 0, received_at_from_id(queue_id))

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
        envelope = _decode_header(header, queue_id, content)
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

    @staticmethod
    def _fsync_directory(path: Path | str) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --- file format ---------------------------------------------------------------------


def _encode_header(queue_id: str, envelope: Envelope, content: bytes) -> bytes:
    header = {
        "v": FORMAT_VERSION,
        "id": queue_id,
        "sender": envelope.sender,
        "recipients": envelope.recipients,
        "client": envelope.client,
        "helo": envelope.helo,
        "received_at": envelope.received_at,
        "mail_options": envelope.mail_options,
        "size": len(content),
        "crc32": zlib.crc32(content),
    }
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _decode_header(header: object, queue_id: str, content: bytes) -> Envelope:
    envelope = _envelope_from_header(header, queue_id)
    assert isinstance(header, dict)  # checked by _envelope_from_header
    if header.get("size") != len(content) or header.get("crc32") != zlib.crc32(content):
        raise CorruptMessage(f"{queue_id}: content is truncated or damaged")
    return envelope


def _envelope_from_header(header: object, queue_id: str) -> Envelope:
    if not isinstance(header, dict) or header.get("v") != FORMAT_VERSION:
        raise CorruptMessage(f"{queue_id}: not a relayd queue file")
    if header.get("id") != queue_id:
        raise CorruptMessage(f"{queue_id}: file name does not match its id")
    try:
        return Envelope(
            sender=str(header["sender"]),
            recipients=tuple(str(r) for r in header["recipients"]),
            client=str(header.get("client", "")),
            helo=str(header.get("helo", "")),
            received_at=float(header.get("received_at", 0.0)),
            mail_options=tuple(str(o) for o in header.get("mail_options", ())),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptMessage(f"{queue_id}: bad envelope: {error}") from None


# --- group commit --------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    queue_id: str
    envelope: Envelope
    content: bytes


def with_state(message: QueuedMessage, **changes: object) -> DeliveryState:
    return replace(message.state, **changes)

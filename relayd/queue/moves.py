"""What follows an attempt on disk: the delivery state and the moves out of active/.

The rule: a state change whose loss would re-send to a recipient already done, or a
DSN already sent, is on disk before anything depends on it. The outcomes of a batch
(the recorder hands them over together, from one thread) go through four steps, so
each directory is synced once per batch, not once per message:

1. deferred, failed: the new delivery state, ``meta/<id>.json``, is written under
   tmp/ (O_DSYNC, O_EXCL | O_NOFOLLOW) and renamed into meta/. delivered: the message
   file is removed from active/ (before its meta file: with the meta file gone first,
   a crash would leave the message in active/ with nobody done, and every recipient
   would get it again).
2. meta/ and active/ are fsynced: from here the recipients done are on disk, and a
   delivered message cannot come back.
3. deferred: the next attempt becomes the file's mtime and it moves to deferred/;
   failed: to failed/; released: back to incoming/, or to deferred/ due now when it
   has a delivery state; delivered: the meta file is removed (one a crash leaves
   behind is removed by recovery).
4. deferred/ and failed/ are fsynced, once each, if they received a file. (A message
   released untouched needs no sync: if a crash undoes that rename, recovery does it.)

A move whose step fails keeps its error and the message stays in active/, owned by the
worker that claimed it (the recorder tries that outcome again: see
``relayd.delivery.recorder``); the rest of the batch goes on. Every step can be
repeated: a message already removed counts as removed.

Like Postfix and SQLite, this relies on rename(2) being atomic: after a crash a
renamed file is under its old name or its new one, never both or neither, and
syncing either directory makes the rename durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from relayd.ops.files import create_new, fsync_directory, write_all
from relayd.queue.census import Counts
from relayd.queue.model import DeliveryState, QueuedMessage

log = structlog.get_logger("relayd.spool")

DELIVERED, DEFERRED, FAILED, RELEASED = "delivered", "deferred", "failed", "released"
_WITH_STATE = (DEFERRED, FAILED)
_SYNCED_WRITES = getattr(os, "O_DSYNC", 0)


@dataclass(frozen=True)
class Move:
    """One settled attempt as the spool applies it."""

    message: QueuedMessage
    outcome: str  # DELIVERED | DEFERRED | FAILED | RELEASED
    state: DeliveryState | None = None  # the new delivery state (DEFERRED, FAILED)
    next_attempt: float | None = None  # DEFERRED: a Unix time


class Mover:
    """Applies moves for the spool whose directories ``path`` names; counts them."""

    def __init__(self, path: Callable[..., Path], counts: Counts) -> None:
        self.path = path
        self._counts = counts

    def apply(self, moves: Sequence[Move]) -> list[OSError | None]:
        """The moves of one batch; per move, None or the error that stopped it."""
        errors: list[OSError | None] = [None] * len(moves)
        for index, move in enumerate(moves):
            errors[index] = _attempt(lambda move=move: self._first_step(move))
        self._sync("meta", moves, errors, lambda m: m.outcome in _WITH_STATE)
        self._sync("active", moves, errors, lambda m: m.outcome == DELIVERED)
        received: set[str] = set()
        for index, move in enumerate(moves):
            if errors[index] is None:
                try:
                    target = self._last_step(move)
                except OSError as error:
                    errors[index] = error
                    continue
                if move.outcome in _WITH_STATE:
                    received.add(target)
        for state in sorted(received):
            # The delivery state is durable already: a move into deferred/ or failed/
            # lost in a crash puts the message back in active/, and recovery sends it
            # on with the same state. Worth a loud line, not a retry.
            try:
                fsync_directory(self.path(state))
            except OSError as error:
                log.error("cannot sync a spool directory", directory=state, error=str(error))
        return errors

    # --- the steps ------------------------------------------------------------------

    def _first_step(self, move: Move) -> None:
        queue_id = move.message.queue_id
        if move.outcome == DELIVERED:
            with contextlib.suppress(FileNotFoundError):  # removed by an earlier try
                os.unlink(self.path("active", queue_id))
                self._counts.count("active", -1, -move.message.size, queue_id=queue_id)
        elif move.outcome in _WITH_STATE:
            assert move.state is not None
            self.write_meta(queue_id, move.state)

    def _sync(
        self,
        state: str,
        moves: Sequence[Move],
        errors: list[OSError | None],
        needs: Callable[[Move], bool],
    ) -> None:
        waiting = [i for i, move in enumerate(moves) if errors[i] is None and needs(move)]
        if waiting:
            error = _attempt(lambda: fsync_directory(self.path(state)))
            for index in waiting:
                errors[index] = error

    def _last_step(self, move: Move) -> str:
        """Step 3; the directory the message went to ("" when it left the spool)."""
        message = move.message
        queue_id = message.queue_id
        if move.outcome == DELIVERED:
            with contextlib.suppress(OSError):  # an orphan is removed by recovery
                os.unlink(self.meta_path(queue_id))
            return ""
        if move.outcome == DEFERRED:
            assert move.next_attempt is not None
            target, mtime = DEFERRED, move.next_attempt
        elif move.outcome == FAILED:
            target, mtime = FAILED, None
        elif os.path.lexists(self.meta_path(queue_id)):  # released, tried before
            target, mtime = DEFERRED, time.time()
        else:
            target, mtime = "incoming", None
        active = self.path("active", queue_id)
        if mtime is not None:
            os.utime(active, (mtime, mtime))
        os.rename(active, self.path(target, queue_id))
        self._counts.count("active", -1, -message.size, queue_id=queue_id)
        self._counts.count(target, +1, message.size, queue_id=queue_id)
        return target

    # --- delivery state files ----------------------------------------------------------

    def meta_path(self, queue_id: str) -> Path:
        return self.path("meta", f"{queue_id}.json")

    def write_meta(self, queue_id: str, state: DeliveryState) -> None:
        """Atomic (tmp/ then rename) and on disk once meta/ is synced."""
        data = json.dumps(asdict(state)).encode()
        tmp = self.path("tmp", f"{queue_id}.meta")
        try:
            fd = create_new(tmp, _SYNCED_WRITES)
        except FileExistsError:
            # Left by a write that failed half-way, or planted: unlinking removes the
            # name (a symlink itself, never what it points to).
            os.unlink(tmp)
            fd = create_new(tmp, _SYNCED_WRITES)
        try:
            try:
                write_all(fd, [data])
                if not _SYNCED_WRITES:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.meta_path(queue_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_meta_durably(self, queue_id: str, state: DeliveryState) -> None:
        """One state outside a batch (the operator's retry of a failed message)."""
        self.write_meta(queue_id, state)
        fsync_directory(self.path("meta"))

    def remove_meta(self, queue_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.meta_path(queue_id))


def _attempt(step: Callable[[], None]) -> OSError | None:
    try:
        step()
    except OSError as error:
        return error
    return None

"""Claiming queued messages for delivery: always in a thread, several per thread hop.

A claim renames the file into active/, reads and parses it and applies the sender
policy. None of it may run on the event loop: a FIFO, or a file on a stalled disk,
under a queue id's name would stop the listener and /healthz with it. A thread hop
per message, though, costs more than a small message's claim (the loop and the
thread hand the GIL to each other), so the scheduler claims as many messages as may
start now in one hop (``claim``) and starts them one by one (``pop``); those a pause
or a limit leaves unstarted go back to the spool (``give_back``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Protocol

import structlog

from relayd import headers
from relayd.queue.model import Envelope, QueuedMessage
from relayd.queue.spool import Spool
from relayd.transports.base import Submission

log = structlog.get_logger("relayd.scheduler")

CLAIM_BATCH = 32  # messages claimed together in one thread hop, at most

Claimed = tuple[QueuedMessage, Submission, bytes]  # message, submission, original headers


class Policy(Protocol):
    """What a claim needs from the sender policy (``relayd.delivery.policy``)."""

    def prepare(self, envelope: Envelope, content: bytes) -> tuple[str, bytes]: ...

    def upstream_recipients(self, recipients: tuple[str, ...]) -> tuple[str, ...]: ...


class Claims:
    """Claims for one scheduler; ``policy`` is asked each time (SIGHUP may replace it)."""

    def __init__(self, spool: Spool, policy: Callable[[], Policy]) -> None:
        self.spool = spool
        self._policy = policy
        self._claiming: asyncio.Future | None = None  # claims running in a thread
        # Claimed in the last hop, not started yet: (id, Claimed, an error, or None).
        self._ahead: collections.deque[tuple[str, object]] = collections.deque()

    @property
    def busy(self) -> bool:
        """Claims running, or claimed messages not started yet."""
        return self._claiming is not None or bool(self._ahead)

    @property
    def ahead(self) -> int:
        return len(self._ahead)

    def pop(self) -> tuple[str, object] | None:
        """The next claim: (id, Claimed | the exception that stopped it | None)."""
        return self._ahead.popleft() if self._ahead else None

    async def claim(self, ids: list[str]) -> None:
        """Claim ``ids`` in one thread hop; the results wait for ``pop``.

        Shielded: if stop() cancels the dispatcher now, the thread still claims the
        messages; ``release_all`` then gives them back."""
        self._claiming = asyncio.ensure_future(asyncio.to_thread(self._claim_batch, ids))
        try:
            claimed = await asyncio.shield(self._claiming)
        except asyncio.CancelledError:
            raise  # release_all() gives the claimed messages back
        except BaseException:
            self._claiming = None
            raise
        self._claiming = None
        self._ahead.extend(zip(ids, claimed, strict=True))

    async def give_back(self) -> list[str]:
        """Claimed but not started (the pass stopped at a pause or a limit): back to the
        spool, in one thread hop. Their ids, to be first in line next time."""
        ahead, self._ahead = list(self._ahead), collections.deque()
        messages = [claimed[0] for _, claimed in ahead if isinstance(claimed, tuple)]
        await asyncio.to_thread(self._release, messages)
        return [message.queue_id for message in messages]

    async def release_all(self) -> None:
        """At stop: everything claimed and not started goes back, even mid-claim."""
        claiming, self._claiming = self._claiming, None
        ahead, self._ahead = [claimed for _, claimed in self._ahead], collections.deque()
        if claiming is not None:
            with contextlib.suppress(Exception):  # nothing was claimed (or set aside)
                ahead += await claiming
        self._release([claimed[0] for claimed in ahead if isinstance(claimed, tuple)])

    def release(self, message: QueuedMessage) -> None:
        """Give one claimed message back untouched (a rename, at most a utime: cheap)."""
        self._release([message])

    # --- in the thread ------------------------------------------------------------------

    def _claim_batch(self, ids: list[str]) -> list[object]:
        """Each id claimed, or the error that stopped it, or None (somebody else took it)."""
        claimed: list[object] = []
        for queue_id in ids:
            try:
                claimed.append(self._claim(queue_id))
            except Exception as error:  # one message's problem stays its own
                claimed.append(error)
        return claimed

    def _claim(self, queue_id: str) -> Claimed | None:
        """Claim, read and prepare one message."""
        message = self.spool.claim(queue_id)
        if message is None:
            return None
        policy = self._policy()
        try:
            content = message.read_content()
            mail_from, prepared = policy.prepare(message.envelope, content)
        except BaseException:
            self.spool.release_claim(message)
            raise
        submission = Submission(
            queue_id=queue_id,
            mail_from=mail_from,
            recipients=policy.upstream_recipients(message.pending_recipients),
            content=prepared,
            mail_options=message.envelope.mail_options,
        )
        return message, submission, headers.header_block(content)

    def _release(self, messages: list[QueuedMessage]) -> None:
        for message in messages:
            try:
                self.spool.release_claim(message)
            except OSError as error:
                log.error(
                    "cannot release a message; it is retried after a restart",
                    queue_id=message.queue_id,
                    error=str(error),
                )

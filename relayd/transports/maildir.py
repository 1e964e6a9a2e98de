"""The Maildir transport: each message into a local Maildir, never to Microsoft 365.

For the sandbox and for staging systems that must never send real mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import time

from relayd.config import Settings
from relayd.ops.files import create_new, fsync_directory, write_all
from relayd.transports.base import LOCAL, Attempt, Blocked, Submission


class MaildirTransport:
    """Writes each message into a Maildir (tmp/ → new/, fsynced): sandbox and staging.

    Two fields are prepended so a person can see the envelope: ``Return-Path:`` (the
    sender as the upstream would have seen it) and ``Envelope-To:`` (every recipient,
    Bcc included).
    """

    rate_limited = False
    concurrency = 4

    def __init__(self, settings: Settings) -> None:
        self.directory = settings.upstream.maildir
        self._hostname = re.sub(r"[/:]", "_", socket.gethostname()) or "localhost"
        self._sequence = itertools.count()
        self._ready = False

    def blocked(self) -> Blocked | None:
        return None

    async def wait_until_available(self) -> None:
        await asyncio.Event().wait()  # never blocked: nothing to wait for

    def reconfigure(self, settings: Settings) -> None:
        if settings.upstream.maildir != self.directory:
            self.directory, self._ready = settings.upstream.maildir, False

    async def close(self) -> None:
        return None

    async def deliver(self, submission: Submission) -> Attempt:
        try:
            name = await asyncio.to_thread(self._store, submission)
        except OSError as error:
            reply = f"451 4.3.0 cannot write to {self.directory}: {error.strerror or error}"
            return Attempt.deferred_all(submission.recipients, LOCAL, reply)
        return Attempt(delivered=submission.recipients, reply=f"250 2.0.0 Ok: stored as {name}")

    def _store(self, submission: Submission) -> str:
        """Write the message whole into tmp/, sync it, rename it into new/, sync new/:
        only then is it delivered (the spool copy is removed after this returns)."""
        if not self._ready:
            for sub in ("tmp", "new", "cur"):
                (self.directory / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
            self._ready = True
        now = time.time()
        name = (
            f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self._sequence)}"
            f"_{submission.queue_id}.{self._hostname}"
        )
        tmp, new = self.directory / "tmp" / name, self.directory / "new" / name
        fd = create_new(tmp)  # O_EXCL | O_NOFOLLOW: never a planted file or symlink
        try:
            try:
                # All of it or an error: a short write (full disk, quota, file-size
                # limit) must never land in new/ as if it were the message.
                write_all(fd, [_envelope_fields(submission), submission.content])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, new)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_directory(self.directory / "new")
        return name


def _envelope_fields(submission: Submission) -> bytes:
    recipients = ",\r\n\t".join(f"<{r}>" for r in submission.recipients)
    fields = f"Return-Path: <{submission.mail_from}>\r\nEnvelope-To: {recipients}\r\n"
    return fields.encode("utf-8")

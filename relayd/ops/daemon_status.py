"""<spool>/status.json: whether the running daemon's deliveries are paused, and why.

The scheduler decides when deliveries pause and resume; the daemon records each change
here so that `relayd queue list` / `show`, run in another process, can say why nothing
moves and what to run. One writer (the daemon), coalescing: the last state always wins
on disk. The file is a hint for people, not a lock: whether a daemon runs at all is the
pid file's lock (relayd.ops.pidfile), so a file left by a crash is never believed alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog

from relayd.ops.files import create_new, write_all

STATUS_FILE_NAME = "status.json"

log = structlog.get_logger("relayd.app")


def read_status(spool_directory: Path) -> dict[str, Any] | None:
    """What the daemon last recorded, or None (never written, or damaged)."""
    try:
        document = json.loads((spool_directory / STATUS_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def write_status(spool_directory: Path, document: dict[str, Any]) -> None:
    """Replace the file atomically (a reader sees the old or the new one, whole)."""
    path = spool_directory / STATUS_FILE_NAME
    temporary = path.with_name(f".{STATUS_FILE_NAME}.{os.getpid()}")
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    with contextlib.suppress(FileNotFoundError):  # left by a write that failed, or planted
        os.unlink(temporary)
    fd = create_new(temporary, mode=0o644)  # O_EXCL | O_NOFOLLOW: never through a link
    try:
        try:
            write_all(fd, [data])
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class StatusFile:
    """The daemon's writer: ``update`` is cheap and synchronous (called by the
    scheduler's pause hook on the event loop); the file is written in a thread."""

    def __init__(self, spool_directory: Path) -> None:
        self.spool_directory = spool_directory
        self._document: dict[str, Any] = _document(None, "")
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None

    def update(self, reason: str | None, detail: str, advice: str | None = None) -> None:
        """The default mailbox's deliveries (the top of the file, as with one mailbox)."""
        mailboxes = self._document.get("mailboxes")
        self._document = _document(reason, detail, advice)
        if mailboxes is not None:
            self._document["mailboxes"] = mailboxes
        self._dirty.set()

    def update_mailbox(
        self, mailbox: str, reason: str | None, detail: str, advice: str | None = None
    ) -> None:
        """One route's deliveries, under ``mailboxes`` (a relay with routes)."""
        mailboxes = dict(self._document.get("mailboxes") or {})
        entry = _document(reason, detail, advice)
        del entry["pid"]
        mailboxes[mailbox] = entry
        self._document = {**self._document, "mailboxes": mailboxes}
        self._dirty.set()

    def start(self) -> None:
        self._dirty.set()  # "running" from the start, until told otherwise
        self._task = asyncio.create_task(self._writer(), name="status-file")

    async def stop(self) -> None:
        """Remove the file: a stopped daemon pauses nothing. Only a daemon that started
        the writer removes it: one that failed to start (another relayd holds the
        spool) must leave the other one's file alone."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(OSError):
            await asyncio.to_thread((self.spool_directory / STATUS_FILE_NAME).unlink)

    async def _writer(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await asyncio.to_thread(write_status, self.spool_directory, self._document)
            except OSError as error:
                log.warning("cannot write the status file", error=str(error))


def _document(reason: str | None, detail: str, advice: str | None = None) -> dict[str, Any]:
    now = time.time()
    return {
        "deliveries": "paused" if reason else "running",
        "reason": reason,
        "detail": detail or None,
        "advice": advice,
        "since": now,
        "pid": os.getpid(),
    }

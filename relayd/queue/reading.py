"""Reading queue files: never following a link, never blocking, never guessing.

A queue file is opened with ``open_regular`` (O_NOFOLLOW | O_NONBLOCK, then fstat):
anything but a regular file is ``CorruptMessage`` and set aside by the caller. A read
error (EIO…) is raised as the OSError it is: the file is not to blame, and calling it
corrupt would take a message that got a 250 out of the queue.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from relayd.ops.files import NotRegular, open_regular, read_regular
from relayd.queue.fileformat import decode_header, envelope_from_header
from relayd.queue.model import CorruptMessage, DeliveryState, QueuedMessage

HEADER_LIMIT = 1_000_000  # bytes of the first line (the envelope) read at most
KEEP_CONTENT_LIMIT = 1024 * 1024  # bigger contents are read again when delivered


def read_message(
    path: Path, queue_id: str, state_of: Callable[[str], DeliveryState]
) -> QueuedMessage:
    """Parse a queue file, checking the content's size and CRC-32 (one read(2))."""
    try:
        data = read_regular(path)
    except NotRegular as error:
        raise CorruptMessage(f"{queue_id}: {error.strerror}") from None
    newline = data.find(b"\n", 0, HEADER_LIMIT)
    try:
        header = json.loads(data[:newline] if newline >= 0 else b"")
    except ValueError as error:
        raise CorruptMessage(f"{queue_id}: {error}") from None
    offset = newline + 1
    content = memoryview(data)[offset:]
    envelope = decode_header(header, queue_id, content)
    return QueuedMessage(
        queue_id=queue_id,
        envelope=envelope,
        state=state_of(queue_id),
        size=len(data),
        path=path,
        content_offset=offset,
        content=bytes(content) if len(content) <= KEEP_CONTENT_LIMIT else None,
    )


def read_header_line(path: Path) -> bytes:
    """The first line of a queue file (the envelope), without reading the content."""
    fd, _ = open_regular(path)
    try:
        data = os.read(fd, 65536)
        while b"\n" not in data and len(data) < HEADER_LIMIT:
            more = os.read(fd, 65536)
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    return data.split(b"\n", 1)[0]


def read_state(path: Path) -> DeliveryState:
    """A delivery state file; a fresh state when there is none. Raises NotRegular,
    ValueError (damaged) and read errors."""
    try:
        document = json.loads(read_regular(path))
    except FileNotFoundError:
        return DeliveryState()
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    return DeliveryState.from_json(document)


def read_sender(path: Path, queue_id: str) -> str | None:
    """The envelope sender, from the file's first line only; None when unreadable."""
    try:
        header = json.loads(read_header_line(path))
        return envelope_from_header(header, queue_id).sender
    except (OSError, ValueError, CorruptMessage):
        return None

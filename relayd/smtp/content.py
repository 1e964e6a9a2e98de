"""Reading and checking DATA: the end-of-data marker, smuggling, dot-stuffing, line lengths.

Only CRLF ends a line (RFC 5321 §2.3.8): ``read_data`` never takes <LF>.<LF> or its
cousins for the end of a message, and ``check_content`` refuses (or normalizes) bare
CR and LF, how SMTP smuggling hides a second message.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass


@dataclass
class DataResult:
    content: bytes
    problem: str | None  # None, "too_big", "line_too_long", "bare_line_ending"


def check_content(content: bytes, bare_line_endings: str, max_line_length: int) -> DataResult:
    """The message as it will be stored (unstuffed, perhaps normalized), or the problem."""
    if _has_bare_line_ending(content):
        if bare_line_endings != "normalize":
            return DataResult(b"", "bare_line_ending")
        content = _normalize_line_endings(content)
    content = _unstuff_dots(content)
    if _has_long_line(content, max_line_length):
        return DataResult(b"", "line_too_long")
    return DataResult(content, None)


_DOT_LINE = b".\r\n"
_END_OF_DATA = b"\r\n.\r\n"
READ_CHUNK = 64 * 1024  # DATA is read in chunks of up to this size
_LINE_SCAN_CHUNK = 1024 * 1024  # bounds the list of lines _has_long_line holds at once


# The checks below run on the event loop for every message, so they use bytes methods
# (C loops, one pass each) rather than regular expressions: a search for
# "[^\r\n]{999}" retries at every offset and cost 35 ms for a 100 KiB message.


def _unstuff_dots(content: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency: drop the first dot of every line starting with one.

    Only CRLF ends a line here (bare CR/LF were refused or normalized before)."""
    if content.startswith(b"."):
        content = content[1:]
    return content.replace(b"\r\n.", b"\r\n")


def _has_long_line(content: bytes, maximum: int) -> bool:
    """Whether a line (CRLF excluded) is longer than ``maximum`` octets."""
    if len(content) <= maximum:
        return False
    start = 0
    while start < len(content):
        # Cut at a line end so that no line is split between two slices.
        end = content.find(b"\r\n", start + _LINE_SCAN_CHUNK)
        end = len(content) if end < 0 else end
        if max(map(len, content[start:end].split(b"\r\n"))) > maximum:
            return True
        start = end + 2
    return False


async def read_data(reader: asyncio.StreamReader, limit: int = 0) -> bytes | None:
    """Read up to the end of data, the line "." (RFC 5321 §4.1.1.4): CRLF "." CRLF, where
    the first CRLF may be the one that ended the DATA command. The data before it, still
    dot-stuffed, or None when it is over ``limit`` bytes (0: no limit); past the limit
    the data is read and dropped, so a huge message cannot fill memory.

    The size is the message's as RFC 1870 §3 counts it: without the dots added for
    transparency (RFC 5321 §4.5.2), which the stored message does not have either.

    Only CRLF ends a line (RFC 5321 §2.3.8), so <LF>.<LF> and its cousins are content,
    never the end of the message, and nothing after the end is ever read.

    The marker is searched with readuntil() over large chunks, two reads for most
    messages. That search cannot see a marker that began in bytes already read, so
    while those end with the first bytes of one (always so at the start), only the
    bytes that could complete it are read; if the stream keeps ending that way (runs of
    empty lines or bare CRs), the next read stops at the next ".\r\n" instead, which
    cannot pass a marker either (see _next_step).
    """
    data = bytearray()
    tail = b"\r\n"  # the stream's last bytes, from the CRLF that ended the DATA line
    size = 0  # octets read so far, dots at the start of a line not counted
    step = ""
    # The final ".\r\n" is read too; its dot starts a line, so it adds 2 to ``size``.
    over = limit + len(_DOT_LINE) - 1
    while not tail.endswith(_END_OF_DATA):
        step = _next_step(tail, step)
        chunk = await _read_step(reader, step, tail)
        size += len(chunk) - _line_start_dots(tail, chunk)
        tail = chunk[-5:] if len(chunk) >= 5 else (tail + chunk)[-5:]
        if not limit or size <= over:
            data += chunk
    if limit and size > over:
        return None
    del data[-len(_DOT_LINE) :]
    return bytes(data)


def _line_start_dots(tail: bytes, chunk: bytes) -> int:
    """How many dots in ``chunk`` start a line, given the bytes before it (``tail``)."""
    across = (chunk.startswith(b".") and tail.endswith(b"\r\n")) or (
        chunk.startswith(b"\n.") and tail.endswith(b"\r")
    )
    return chunk.count(b"\r\n.") + across


def _next_step(tail: bytes, previous: str) -> str:
    """How to read on: "marker" (search the whole marker), "probe" (read only what
    could complete the one the tail begins) or "line" (up to the next ".\r\n").

    A "line" read is safe only while the marker's "." is unread (tail "\r" or "\r\n");
    after "\r\n." or "\r\n.\r" a probe of one or two bytes settles it."""
    partial = _partial_marker(tail)
    if not partial:
        return "marker"
    return "line" if previous == "probe" and partial <= 2 else "probe"


async def _read_step(reader: asyncio.StreamReader, step: str, tail: bytes) -> bytes:
    try:
        if step == "marker":
            return await reader.readuntil(_END_OF_DATA)
        if step == "probe":
            return await reader.readexactly(len(_END_OF_DATA) - _partial_marker(tail))
        return await reader.readuntil(_DOT_LINE)
    except asyncio.LimitOverrunError as overrun:
        # readuntil() keeps the bytes a marker could begin in; none begins in these.
        return await reader.read(overrun.consumed)


def _partial_marker(tail: bytes) -> int:
    """How many of the stream's last bytes could begin an end-of-data marker (0 to 4)."""
    for length in range(len(_END_OF_DATA) - 1, 0, -1):
        if tail.endswith(_END_OF_DATA[:length]):
            return length
    return 0


def _has_bare_line_ending(content: bytes) -> bool:
    crlf = content.count(b"\r\n")
    return content.count(b"\r") != crlf or content.count(b"\n") != crlf


def _normalize_line_endings(content: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", content)

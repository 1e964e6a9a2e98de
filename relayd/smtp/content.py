"""Reading and checking DATA: the end-of-data marker, smuggling, dot-stuffing, line lengths.

Only CRLF ends a line (RFC 5321 §2.3.8): ``read_data`` never takes <LF>.<LF> or its
cousins for the end of a message, and ``check_content`` refuses (or normalizes) bare
CR and LF, how SMTP smuggling hides a second message.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass


@dataclass
class DataResult:
    content: bytes
    problem: str | None  # None, "too_big", "line_too_long", "bare_line_ending"
    # A big message continues in these parts (``content`` is its first part, with the
    # header section): checked and kept in slices, never joined into one copy.
    rest: tuple[bytes | memoryview, ...] = ()

    @property
    def size(self) -> int:
        return len(self.content) + sum(len(part) for part in self.rest)


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


# A message over this size is checked in a thread, in slices of about this size: the
# whole-message checks held the event loop for hundreds of milliseconds with 30 MiB
# (bench/README.md), and each C call on a slice takes a fraction of a millisecond.
SLICE = 256 * 1024


async def check_data(data: bytearray, bare_line_endings: str, max_line_length: int) -> DataResult:
    """``check_content`` for DATA as read_data returns it; big messages in a thread."""
    if len(data) <= SLICE:
        return check_content(bytes(data), bare_line_endings, max_line_length)
    return await asyncio.to_thread(check_slices, data, bare_line_endings, max_line_length)


def check_slices(data: bytearray, bare_line_endings: str, max_line_length: int) -> DataResult:
    """``check_content``'s answer, worked out slice by slice: each slice is cut after a
    CRLF, so no CRLF, dot-stuffed line or line spans two, and the first holds the whole
    header section (handle_DATA reads it there). A slice without stuffing dots stays a
    view of ``data``: no copy. The thread gives up the GIL between slices."""
    bounds = _slice_bounds(data)
    crlf = cr = lf = 0
    for start, end in bounds:
        crlf += data.count(b"\r\n", start, end)
        cr += data.count(b"\r", start, end)
        lf += data.count(b"\n", start, end)
        time.sleep(0)  # let the event loop take the GIL
    if cr != crlf or lf != crlf:
        # Bare CR or LF: refused, or (rare: clients that need it configured) normalized
        # in one piece, since the slices' cuts assumed CRLF line ends.
        if bare_line_endings != "normalize":
            return DataResult(b"", "bare_line_ending")
        return check_content(bytes(data), bare_line_endings, max_line_length)
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start, end in bounds:
        part: bytes | memoryview = view[start:end]
        if data.startswith(b".", start, end) or data.find(b"\r\n.", start, end) >= 0:
            part = _unstuff_dots(bytes(part))
        if _has_long_line_in(data, start, end, max_line_length):
            return DataResult(b"", "line_too_long")
        parts.append(part)
        time.sleep(0)
    first = bytes(parts[0])  # handle_DATA reads the header section with bytes methods
    return DataResult(first, None, tuple(parts[1:]))


def _has_long_line_in(data: bytearray, start: int, end: int, maximum: int) -> bool:
    """Whether a line of data[start:end] (CRLF line ends only) is over ``maximum``.

    A line of maximum + 1 octets or more covers a whole block of ``step`` octets
    (step <= (maximum + 2) / 2) at a multiple of ``step``, and that block has no LF.
    One C search per block instead of one object per line (split: 4x slower); only a
    block with no LF has its line measured. Stuffing dots only make lines longer, so
    a stuffed line that is not too long is not too long unstuffed either; one that
    is, is measured again without its dot."""
    step = (maximum + 2) // 2
    if step < 64:  # short limits: split is as fast
        return _has_long_line(_unstuff_dots(bytes(data[start:end])), maximum)
    position = start
    while position + step <= end:
        if data.find(b"\n", position, position + step) >= 0:
            position += step
            continue
        line_start = max(data.rfind(b"\n", start, position) + 1, start)
        line_end = data.find(b"\r\n", position, end)
        line_end = end if line_end < 0 else line_end
        length = line_end - line_start - data.startswith(b".", line_start, line_end)
        if length > maximum:
            return True
        position = line_end + 2
    return False


def _slice_bounds(data: bytearray) -> list[tuple[int, int]]:
    """Slices of about SLICE bytes, each ending after an LF; the first one at least to
    the end of the header section (all of it when there is no empty line)."""
    header_end = data.find(b"\r\n\r\n")
    first = len(data) if header_end < 0 else header_end + 4
    bounds = []
    start = 0
    while start < len(data):
        end = data.find(b"\n", max(start + SLICE, first) - 1)
        end = len(data) if end < 0 else end + 1
        bounds.append((start, end))
        start = end
    return bounds


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


async def read_data(reader: asyncio.StreamReader, limit: int = 0) -> bytearray | None:
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
    return data  # no copy: check_data makes the only one


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

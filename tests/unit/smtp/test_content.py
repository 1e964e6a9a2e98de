"""The DATA content checks, against their plain definitions as regular expressions.

The listener uses bytes methods instead of these expressions because they are much
faster; the properties here show that the answers are the same.
"""

from __future__ import annotations

import asyncio
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from relayd.smtp import content as listener

# Lines of dots, short and long runs of text: the cases the checks are about.
_PIECES = st.sampled_from([b".", b"..", b"\r\n", b"\r\n.", b"x", b"abc", b"y" * 9])
_CONTENT = st.lists(_PIECES, max_size=40).map(b"".join)


@given(_CONTENT)
@example(b".\r\n..\r\n.x\r\n")
@example(b"..")
def test_unstuff_dots_drops_the_first_dot_of_each_line(content: bytes) -> None:
    # RFC 5321 §4.5.2: a dot at the start of a line is removed.
    expected = re.sub(rb"(?:^|(?<=\r\n))\.", b"", content)
    assert listener._unstuff_dots(content) == expected


@given(_CONTENT, st.integers(min_value=1, max_value=12))
@example(b"abcd\r\nabc\r\n", 3)
@example(b"abc\r\nabc", 3)
def test_has_long_line_finds_a_line_over_the_limit(content: bytes, maximum: int) -> None:
    expected = re.search(rb"[^\r\n]{%d}" % (maximum + 1), content) is not None
    assert listener._has_long_line(content, maximum) is expected


def test_has_long_line_looks_across_its_scan_slices(monkeypatch) -> None:
    # The scan works in slices cut at line ends; a long line in a later slice counts.
    monkeypatch.setattr(listener, "_LINE_SCAN_CHUNK", 8)
    content = b"short\r\n" * 5 + b"x" * 20 + b"\r\n" + b"short\r\n"
    assert listener._has_long_line(content, 19)
    assert not listener._has_long_line(content, 20)


# --- reading DATA up to its end ----------------------------------------------------

# Streams made of the pieces that matter around the end-of-data marker.
_STREAM_PIECES = st.sampled_from(
    [b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"x", b"xy" * 5]
)


def _expected_split(stream: bytes) -> tuple[bytes, bytes]:
    """The data and what follows, by the definition: the first CRLF "." CRLF, counting
    the CRLF that ended the DATA command line."""
    virtual = b"\r\n" + stream
    end = virtual.find(b"\r\n.\r\n")
    return virtual[2 : end + 2], virtual[end + 5 :]


async def _read_fed_in_pieces(stream: bytes, cuts: list[int], limit: int, reader_limit: int):
    """read_data on a StreamReader that gets ``stream`` a piece at a time, and the bytes
    it left unread."""
    reader = asyncio.StreamReader(limit=reader_limit)

    async def feed() -> None:
        previous = 0
        for cut in [*sorted(cuts), len(stream)]:
            reader.feed_data(stream[previous:cut])
            previous = max(previous, cut)
            await asyncio.sleep(0)  # let the reader run with what it has so far
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    data = await listener.read_data(reader, limit)
    await feeding
    return data, await reader.read()


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(_STREAM_PIECES, max_size=30),
    after=st.sampled_from([b"", b"QUIT\r\n", b".\r\n", b"\r\n.\r\n"]),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    reader_limit=st.sampled_from([8, 16, 64 * 1024]),
)
@example(pieces=[b".\r\n"], after=b"QUIT\r\n", cuts=[], reader_limit=16)  # an empty message
@example(pieces=[], after=b"QUIT\r\n", cuts=[1], reader_limit=8)  # one empty line
def test_read_data_stops_exactly_at_the_end_of_data(
    pieces: list[bytes], after: bytes, cuts: list[int], reader_limit: int
) -> None:
    stream = b"".join(pieces) + b"\r\n.\r\n" + after
    expected = _expected_split(stream)
    assert asyncio.run(_read_fed_in_pieces(stream, cuts, 0, reader_limit)) == expected


@given(size=st.integers(0, 60), limit=st.integers(1, 40))
def test_read_data_over_the_limit_is_read_to_its_end_and_dropped(size: int, limit: int) -> None:
    stream = b"a" * size + b"\r\n.\r\nNEXT"
    data, rest = asyncio.run(_read_fed_in_pieces(stream, [], limit, 16))
    assert rest == b"NEXT"
    assert data == (stream[: size + 2] if size + 2 <= limit else None)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(_STREAM_PIECES, max_size=30),
    limit=st.integers(1, 80),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    reader_limit=st.sampled_from([8, 16, 64 * 1024]),
)
@example(pieces=[b"..", b"\r\n"] * 10, limit=40, cuts=[], reader_limit=64 * 1024)
def test_read_data_limit_counts_the_message_without_its_stuffing_dots(
    pieces: list[bytes], limit: int, cuts: list[int], reader_limit: int
) -> None:
    # RFC 1870 §3: the size is the message's, without the dots added for transparency.
    stream = b"".join(pieces) + b"\r\n.\r\nNEXT"
    wire, _ = _expected_split(stream)
    unstuffed = listener._unstuff_dots(wire)
    data, rest = asyncio.run(_read_fed_in_pieces(stream, cuts, limit, reader_limit))
    assert rest.endswith(b"NEXT")
    assert data == (wire if len(unstuffed) <= limit else None)


def test_many_dot_stuffed_lines_under_the_limit_are_not_too_big() -> None:
    # Issue 12 item 12: 300 octets of "." lines are 600 octets on the wire, stuffed.
    message = b".\r\n" * 100
    wire = message.replace(b".\r\n", b"..\r\n")
    data, _ = asyncio.run(_read_fed_in_pieces(wire + b".\r\n", [], len(message), 64 * 1024))
    assert data == wire

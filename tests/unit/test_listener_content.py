"""The DATA content checks, against their plain definitions as regular expressions.

The listener uses bytes methods instead of these expressions because they are much
faster; the properties here show that the answers are the same.
"""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from relayd import listener

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

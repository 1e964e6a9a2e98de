"""Big messages are checked in slices (in a thread): the answer must be check_content's."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relayd.smtp import content as listener

_PIECES = st.sampled_from(
    [b".", b"..", b"\r\n", b"\r\n.", b"\r\n\r\n", b"x", b"abc", b"y" * 9, b"z" * 60, b"\r", b"\n"]
)
_CONTENT = st.lists(_PIECES, max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    content=_CONTENT,
    slice_size=st.integers(1, 400),
    mode=st.sampled_from(["reject", "normalize"]),
    # Short limits take the split path, limits of 126 and more the block search.
    maximum=st.one_of(st.integers(1, 12), st.integers(126, 200)),
)
@example(content=b"a\r\n.b\r\n..c\r\n", slice_size=3, mode="reject", maximum=5)
@example(content=b"From: a\r\nFrom: b\r\n\r\nbody\r\n", slice_size=2, mode="reject", maximum=40)
def test_slices_give_the_whole_message_answer(
    content: bytes, slice_size: int, mode: str, maximum: int
) -> None:
    if not content:
        return
    expected = listener.check_content(content, mode, maximum)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(listener, "SLICE", slice_size)
        result = listener.check_slices(bytearray(content), mode, maximum)
    assert result.problem == expected.problem
    assert result.content + b"".join(result.rest) == expected.content
    if result.problem is None and not result.rest:
        return
    # The first part holds the header section whole (handle_DATA reads it there).
    if b"\r\n\r\n" in expected.content and result.problem is None:
        assert b"\r\n\r\n" in result.content or result.content.startswith(b"\r\n")


def test_a_big_message_is_checked_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    line = b"x" * 70 + b"\r\n"
    data = bytearray(b"Subject: big\r\n\r\n" + line * (3 * listener.SLICE // len(line)))
    expected = listener.check_content(bytes(data), "reject", 998)
    threads = []
    check_slices = listener.check_slices

    def recorded(*args: object) -> listener.DataResult:
        threads.append(threading.current_thread())
        return check_slices(*args)

    monkeypatch.setattr(listener, "check_slices", recorded)
    result = asyncio.run(listener.check_data(data, "reject", 998))
    assert threads and threads[0] is not threading.main_thread()
    assert result.problem is None and len(result.rest) >= 2
    assert result.content + b"".join(result.rest) == expected.content

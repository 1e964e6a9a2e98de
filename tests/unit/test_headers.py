"""Header fields read from raw bytes."""

from __future__ import annotations

from relayd import headers


def test_field_value_unfolds_continuation_lines() -> None:
    block = b"Subject: first\r\n second\r\n\tthird\r\nTo: x@y.org\r\n"
    assert headers.field_value(block, b"subject") == b"first second\tthird"
    assert headers.field_value(block, b"TO") == b"x@y.org"
    assert headers.field_value(block, b"cc") is None

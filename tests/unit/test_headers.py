"""Header fields read from raw bytes."""

from __future__ import annotations

from relayd import headers


def test_field_value_unfolds_continuation_lines() -> None:
    block = b"Subject: first\r\n second\r\n\tthird\r\nTo: x@y.org\r\n"
    assert headers.field_value(block, b"subject") == b"first second\tthird"
    assert headers.field_value(block, b"TO") == b"x@y.org"
    assert headers.field_value(block, b"cc") is None


def test_from_count_counts_every_from_field_not_continuations() -> None:
    content = b"From: a@x.org\r\nTo: b@y.org,\r\n from: c@z.org\r\nFROM : d@x\r\n\r\nFrom: x\r\n"
    assert headers.summarize(content).from_count == 2


def test_field_spans_cover_each_field_with_its_continuation_lines() -> None:
    block = b"From: a\r\n b\r\nTo: c\r\nfrom:d\r\n"
    spans = headers.field_spans(block, b"from")
    assert [block[start:end] for start, end in spans] == [b"From: a\r\n b\r\n", b"from:d\r\n"]


def test_what_relayd_adds_stays_inside_the_room_it_keeps() -> None:
    # Issue 12 item 12: the listener accepts max_message_size - ADDED_AT_MOST, so the
    # worst case of every field relayd may add must fit in ADDED_AT_MOST.
    longest_name = "n" * 600  # trace_token() keeps 255 of it
    received = headers.received_field(
        helo=longest_name,
        client_ip="ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        hostname=longest_name,
        queue_id="0" * 19,
        protocol="UTF8SMTP",
        recipients=("r" * 64 + "@" + "d" * 189,),  # 254 octets, RFC 5321 §4.5.3.1.3
        when=4102444799,  # a date of the longest form
    )
    summary = headers.summarize(b"Subject: x\r\n\r\n")
    added, _ = headers.missing_fields(summary, queue_id="0" * 19, hostname=longest_name, when=0)
    from_field = headers.FIELD_LINE_MAX + 2 + len(b"Reply-To:") - len(b"From:")  # policy.py
    assert len(received) + len(added) + from_field <= headers.ADDED_AT_MOST

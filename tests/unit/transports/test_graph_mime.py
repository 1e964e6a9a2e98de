"""What Graph is given: recipient fields reconciled with the envelope, attachments split."""

from __future__ import annotations

import base64

from relayd.transports.graph_mime import (
    encoded_size,
    for_envelope,
    header_recipients,
    matches_envelope,
    split_attachments,
)

MESSAGE = (
    b"From: App <app@example.com>\r\n"
    b"To: Alice <alice@example.org>,\r\n Bob <bob@example.org>\r\n"
    b"Cc: carol@example.org\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Body line\r\nTo: not a header\r\n"
)


def test_the_same_recipients_leave_the_bytes_alone() -> None:
    recipients = ("bob@example.org", "ALICE@example.org", "carol@example.org")
    assert matches_envelope(MESSAGE, recipients)
    assert for_envelope(MESSAGE, recipients) is MESSAGE


def test_done_and_header_only_recipients_are_left_out_envelope_only_ones_are_bcc() -> None:
    # alice was done in an earlier attempt; carol is only in the header; dave is a Bcc.
    rewritten = for_envelope(MESSAGE, ("bob@example.org", "dave@example.org"))

    fields = header_recipients(rewritten)
    assert fields[b"to"] == [("Bob", "bob@example.org")]
    assert fields[b"cc"] == []
    assert fields[b"bcc"] == [("", "dave@example.org")]
    assert rewritten.endswith(b"\r\n\r\nBody line\r\nTo: not a header\r\n")
    assert b"From: App <app@example.com>\r\nSubject: hello\r\n" in rewritten


def test_an_existing_bcc_field_is_replaced_not_repeated() -> None:
    content = b"To: a@x.org\r\nBcc: old@x.org\r\nSubject: s\r\n\r\nbody\r\n"
    rewritten = for_envelope(content, ("a@x.org", "new@x.org"))
    assert rewritten.count(b"Bcc:") == 1 and b"old@x.org" not in rewritten
    assert header_recipients(rewritten)[b"bcc"] == [("", "new@x.org")]


def _multipart(attachment: bytes) -> bytes:
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (
        b"From: a@x.org\r\nTo: b@x.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n\r\n'
        b"--BOUNDARY\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n"
        b'--BOUNDARY\r\nContent-Type: application/pdf; name="r.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="r.pdf"\r\n\r\n' + encoded + b"--BOUNDARY--\r\n"
    )


def test_the_big_attachment_comes_out_decoded_and_the_rest_stays() -> None:
    data = bytes(range(256)) * 20_000  # 5 MB
    content = _multipart(data)

    reduced, (attachment,) = split_attachments(content, 4_000_000)

    assert (attachment.name, attachment.content_type, attachment.data) == (
        "r.pdf",
        "application/pdf",
        data,
    )
    assert encoded_size(len(reduced)) < 4_000
    assert b"See the file.\r\n--BOUNDARY\r\n" in reduced and reduced.endswith(b"--BOUNDARY--\r\n")


def test_nothing_comes_out_of_a_message_that_fits() -> None:
    content = _multipart(b"small")
    assert split_attachments(content, 4_000_000) == (content, [])

"""Delivery status notifications: RFC 3464 structure a mail client can read."""

from __future__ import annotations

import email
from email import policy as email_policy
from pathlib import Path

from relayd.delivery import dsn
from relayd.queue.model import DeliveryState, Envelope, QueuedMessage, new_queue_id

NOW = 1_700_000_000.0
ORIGINAL = (
    b"Received: from app ([127.0.0.1])\r\n\tby relay (relayd) with ESMTP id X\r\n"
    b"From: App <app@apps.example.net>\r\nTo: a@x.org, b@x.org\r\nSubject: invoice\r\n"
    b"Message-ID: <m1@apps.example.net>\r\n"
)
REPORTER = dsn.Reporter("relay.example.net", "relay@example.com", "smtp.office365.com")


def queued(sender: str = "app@apps.example.net") -> QueuedMessage:
    return QueuedMessage(
        queue_id=new_queue_id(NOW - 60),
        envelope=Envelope(sender=sender, recipients=("a@x.org", "b@x.org"), received_at=NOW - 60),
        state=DeliveryState(),
        size=1,
        path=Path("/nonexistent"),
    )


def parse(content: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(content, policy=email_policy.default)


def test_dsn_is_a_multipart_report_to_the_sender() -> None:
    message = queued()
    failed = [("b@x.org", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found")]
    report = parse(dsn.build(message, failed, ORIGINAL, REPORTER, NOW))
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["To"].addresses[0].addr_spec == "app@apps.example.net"
    assert report["From"].addresses[0].addr_spec == "relay@example.com"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert "b@x.org" in parts[0].get_content() and message.queue_id in parts[0].get_content()
    assert b"Subject: invoice" in parts[2].get_payload(decode=True)


def test_delivery_status_fields_per_recipient() -> None:
    failed = [("a@x.org", "550 5.1.10 not found"), ("b@x.org", "451 4.7.500 busy (gave up)")]
    content = dsn.build(queued(), failed, ORIGINAL, REPORTER, NOW).decode()
    status = content.split("message/delivery-status")[1].split("--=_relayd")[0]
    assert "Reporting-MTA: dns; relay.example.net" in status
    assert "Final-Recipient: rfc822; a@x.org\r\nAction: failed\r\nStatus: 5.1.10" in status
    assert "Final-Recipient: rfc822; b@x.org\r\nAction: failed\r\nStatus: 5.4.7" in status
    assert "Remote-MTA: dns; smtp.office365.com" in status
    assert "Diagnostic-Code: smtp; 550 5.1.10 not found" in status


def test_dsn_envelope_has_the_null_sender() -> None:
    envelope = dsn.dsn_envelope(queued(), NOW)
    assert envelope.sender == "" and envelope.recipients == ("app@apps.example.net",)


def test_non_ascii_headers_travel_base64_encoded() -> None:
    original = "Subject: Grüße\r\nFrom: app@apps.example.net\r\n".encode()
    content = dsn.build(queued(), [("a@x.org", "550 no")], original, REPORTER, NOW)
    assert content.isascii()
    part = list(parse(content).iter_parts())[2]
    assert part.get_payload(decode=True) == original


def test_dsn_to_an_internationalized_sender_asks_for_smtputf8() -> None:
    envelope = dsn.dsn_envelope(queued(sender="jörg@example.de"), NOW)
    assert envelope.mail_options == ("SMTPUTF8",)
    assert dsn.dsn_envelope(queued(), NOW).mail_options == ()


def test_the_readme_says_how_dsns_leave_through_exchange() -> None:
    # Through Exchange Online a DSN cannot keep the null sender (the sender policy
    # sends it as the mailbox: test_smtp_delivery's test_refused_recipient_fails_alone_
    # with_exactly_one_dsn checks MAIL FROM); the documentation must say so.
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    delivery = readme[readme.index("## Delivery") : readme.index("## Queue administration")]
    assert "null sender) through the same" not in delivery
    assert "MAIL FROM:<upstream.mailbox>" in delivery

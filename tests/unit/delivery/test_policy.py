"""The sender policy: MAIL FROM, From: rewriting and the from_rewrite=false refusal."""

from __future__ import annotations

import email
from email import policy as email_policy

import pytest

from relayd.config import UpstreamSettings
from relayd.delivery.policy import SenderPolicy, from_addresses, rewrite_from
from relayd.queue.model import Envelope

MAILBOX = "relay@example.com"
ENVELOPE = Envelope(sender="app@apps.example.net", recipients=("user@example.org",))


def policy(**changes: object) -> SenderPolicy:
    settings = UpstreamSettings(mailbox=MAILBOX, send_as=("alerts@example.com",), **changes)
    return SenderPolicy(settings)


def message(from_field: str, extra: str = "") -> bytes:
    return (
        f"Received: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        f"From: {from_field}\r\nTo: user@example.org\r\n{extra}Subject: hello\r\n\r\n"
        "Body with From: someone@else.example in it.\r\n"
    ).encode()


def test_permitted_from_is_sent_as_is_with_that_address_as_mail_from() -> None:
    content = message("Alerts <Alerts@Example.com>")
    mail_from, prepared = policy().prepare(ENVELOPE, content)
    assert mail_from == "Alerts@Example.com"
    assert prepared is content


def test_foreign_from_is_rewritten_keeping_the_name_and_moved_to_reply_to() -> None:
    content = message('"Billing App" <billing@apps.example.net>')
    mail_from, prepared = policy().prepare(ENVELOPE, content)
    assert mail_from == MAILBOX
    parsed = email.message_from_bytes(prepared, policy=email_policy.default)
    assert parsed["From"].addresses[0].addr_spec == MAILBOX
    assert parsed["From"].addresses[0].display_name == "Billing App"
    assert parsed["Reply-To"].addresses[0].addr_spec == "billing@apps.example.net"
    # Every other byte is unchanged: the Received: field, the order, the body.
    before, _, after = content.partition(b"From: ")
    assert prepared.startswith(before)
    assert prepared.endswith(after.split(b"\r\n", 1)[1])
    assert prepared.count(b"From:") == 2  # the new header and the body's text


def test_existing_reply_to_is_kept() -> None:
    content = message("billing@apps.example.net", extra="Reply-To: desk@example.org\r\n")
    _, prepared = policy().prepare(ENVELOPE, content)
    parsed = email.message_from_bytes(prepared, policy=email_policy.default)
    assert parsed.get_all("Reply-To") == ["desk@example.org"]
    assert parsed["From"].addresses[0].addr_spec == MAILBOX


def test_folded_and_encoded_from_is_replaced_whole() -> None:
    content = message("=?utf-8?q?J=C3=B6rg?=\r\n <joerg@apps.example.net>")
    _, prepared = policy().prepare(ENVELOPE, content)
    parsed = email.message_from_bytes(prepared, policy=email_policy.default)
    assert str(parsed["From"]) == f"Jörg <{MAILBOX}>"
    assert parsed["Reply-To"].addresses[0].addr_spec == "joerg@apps.example.net"
    assert b"\r\n <joerg" not in prepared.split(b"Reply-To")[0]


def test_several_from_addresses_with_one_foreign_are_rewritten() -> None:
    content = message("relay@example.com, other@apps.example.net")
    mail_from, prepared = policy().prepare(ENVELOPE, content)
    assert mail_from == MAILBOX
    assert from_addresses(prepared) == [MAILBOX]


def test_message_without_from_goes_as_the_mailbox_untouched() -> None:
    content = b"To: user@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    assert policy().prepare(ENVELOPE, content) == (MAILBOX, content)


def test_without_rewrite_the_listener_refuses_a_foreign_from_with_550() -> None:
    strict = policy(from_rewrite=False)
    reply = strict.refusal(ENVELOPE, message("billing@apps.example.net"))
    assert reply is not None and reply.startswith("550 5.7.1 ")
    assert "billing@apps.example.net" in reply and MAILBOX in reply
    assert strict.refusal(ENVELOPE, message("alerts@example.com")) is None


def test_with_rewrite_the_listener_refuses_nothing() -> None:
    assert policy().refusal(ENVELOPE, message("billing@apps.example.net")) is None


def test_without_a_mailbox_nothing_is_enforced() -> None:
    open_policy = SenderPolicy(UpstreamSettings(mailbox="", from_rewrite=False))
    content = message("billing@apps.example.net")
    assert open_policy.prepare(ENVELOPE, content) == (ENVELOPE.sender, content)
    assert open_policy.refusal(ENVELOPE, content) is None


@pytest.mark.parametrize("field", ["from", "FROM", "From"])
def test_field_name_case_does_not_matter(field: str) -> None:
    content = f"{field}: billing@apps.example.net\r\nSubject: x\r\n\r\nbody\r\n".encode()
    rewritten = rewrite_from(content, MAILBOX)
    assert rewritten.startswith(
        f"From: {MAILBOX}\r\nReply-To: billing@apps.example.net\r\n".encode()
    )

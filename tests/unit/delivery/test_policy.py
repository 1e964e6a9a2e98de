"""The sender policy: MAIL FROM, From: rewriting and the from_rewrite=false refusal."""

from __future__ import annotations

import email
from email import policy as email_policy
from email.utils import formataddr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import headers
from relayd.config import UpstreamSettings
from relayd.delivery.policy import SenderPolicy, from_addresses, rewrite_from
from relayd.queue.model import Envelope
from relayd.transports.base import Attempt

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


def test_message_without_from_gets_one_naming_the_mailbox_at_the_end_of_its_header() -> None:
    # Issue 12 item 13: RFC 5322 §3.6 wants a From:; without one, Exchange never accepted
    # the message and it was retried for ever. Postfix's cleanup adds one too.
    content = b"To: user@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    mail_from, prepared = policy().prepare(ENVELOPE, content)
    assert mail_from == MAILBOX
    assert prepared == (
        b"To: user@example.org\r\nSubject: x\r\n"
        b"From: relay@example.com\r\nReply-To: <app@apps.example.net>\r\n\r\nbody\r\n"
    )


def test_message_without_from_from_a_permitted_sender_names_that_sender() -> None:
    envelope = Envelope(sender="alerts@example.com", recipients=("user@example.org",))
    content = b"Subject: x\r\nReply-To: desk@example.org\r\n\r\nbody\r\n"
    mail_from, prepared = policy().prepare(envelope, content)
    assert mail_from == "alerts@example.com"
    assert (
        prepared
        == b"Subject: x\r\nReply-To: desk@example.org\r\nFrom: alerts@example.com\r\n\r\nbody\r\n"
    )


def test_message_without_from_and_null_sender_gets_the_mailbox_only() -> None:
    envelope = Envelope(sender="", recipients=("user@example.org",))
    _, prepared = policy().prepare(envelope, b"Subject: bounce\r\n\r\nbody\r\n")
    assert prepared == b"Subject: bounce\r\nFrom: relay@example.com\r\n\r\nbody\r\n"


def test_second_from_field_never_reaches_the_upstream() -> None:
    # Issue 12 item 13: only the first From: was looked at; a second, foreign one went
    # out unchanged and Exchange answered SendAsDenied until the message expired.
    content = message("alerts@example.com", extra="From: ceo@apps.example.net\r\n")
    mail_from, prepared = policy().prepare(ENVELOPE, content)
    assert mail_from == "alerts@example.com"
    assert from_addresses(prepared) == ["alerts@example.com"]
    assert b"\r\nX-Original-From: ceo@apps.example.net\r\n" in prepared
    assert prepared.replace(b"X-Original-From:", b"From:") == content  # nothing else changed


def test_foreign_first_and_second_from_fields_leave_as_the_mailbox() -> None:
    content = message("billing@apps.example.net", extra="from : other@apps.example.net\r\n")
    mail_from, prepared = policy().prepare(ENVELOPE, content)
    assert mail_from == MAILBOX
    assert from_addresses(prepared) == [MAILBOX]
    parsed = email.message_from_bytes(prepared, policy=email_policy.default)
    assert parsed["Reply-To"].addresses[0].addr_spec == "billing@apps.example.net"
    assert b"\r\nX-Original-From : other@apps.example.net\r\n" in prepared


def test_queued_mail_is_rewritten_even_with_from_rewrite_off() -> None:
    # Refused at the end of DATA when the setting is off; mail queued before it changed
    # got a 250, and SendAsDenied is not cured by retrying.
    mail_from, prepared = policy(from_rewrite=False).prepare(
        ENVELOPE, message("x@apps.example.net")
    )
    assert mail_from == MAILBOX
    assert from_addresses(prepared) == [MAILBOX]


def test_reply_to_keeps_the_original_folding_and_no_line_grows_past_998() -> None:
    folded = "Very Long Name <billing@apps.example.net>,\r\n" + ",\r\n".join(
        f" person{n}@apps.example.net" for n in range(60)
    )
    content = message(folded)
    _, prepared = policy().prepare(ENVELOPE, content)
    assert f"\r\nReply-To: {folded}\r\n".encode() in prepared
    assert max(map(len, prepared.split(b"\r\n"))) <= 998


@pytest.mark.parametrize("value_start", [" ", ""])
def test_a_from_line_of_998_octets_stays_within_998_octets(value_start: str) -> None:
    # RFC 5322 §2.1.1: "Reply-To:" is longer than "From:", so that line is folded.
    address = " <x@apps.example.net>"
    name = "N" * (998 - len("From:") - len(value_start) - len(address) - 2)
    line = f'From:{value_start}"{name}"{address}'
    assert len(line) == 998
    content = message("").replace(b"From: \r\n", line.encode() + b"\r\n")
    _, prepared = policy().prepare(ENVELOPE, content)
    assert b"\r\nReply-To:\r\n " in prepared
    assert max(map(len, prepared.split(b"\r\n"))) <= 998
    parsed = email.message_from_bytes(prepared, policy=email_policy.default)
    assert parsed["Reply-To"].addresses[0].addr_spec == "x@apps.example.net"
    assert parsed["Reply-To"].addresses[0].display_name == name
    assert parsed["From"].addresses[0].addr_spec == MAILBOX


def test_a_display_name_that_does_not_fit_on_one_line_is_left_out() -> None:
    name = "N" * 980  # with the mailbox: a From: line of 1004 octets
    _, prepared = policy().prepare(ENVELOPE, message(f"{name}\r\n <x@apps.example.net>"))
    assert f"\r\nFrom: {MAILBOX}\r\nReply-To: {name}\r\n <x@".encode() in prepared


def test_refusal_looks_at_every_from_field() -> None:
    strict = policy(from_rewrite=False)
    content = message("alerts@example.com", extra="From: ceo@apps.example.net\r\n")
    reply = strict.refusal(ENVELOPE, content)
    assert reply is not None and "ceo@apps.example.net" in reply


# --- what the policy may add, whatever the From: fields ------------------------------

_ADDRESS = st.sampled_from(
    ["relay@example.com", "Alerts@Example.com", "app@apps.example.net", "", "undisclosed"]
)
_FROM_VALUE = st.one_of(
    _ADDRESS,
    # No control characters: the listener never stores a bare CR or LF.
    st.tuples(st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=1200), _ADDRESS).map(
        lambda pair: formataddr(pair, "utf-8")
    ),
    st.lists(_ADDRESS, min_size=2, max_size=5).map(", ".join),
)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(_FROM_VALUE, max_size=3),
    reply_to=st.booleans(),
    sender=_ADDRESS,
    rewrite=st.booleans(),
)
def test_the_upstream_sees_exactly_one_permitted_from_and_little_more(
    values: list[str], reply_to: bool, sender: str, rewrite: bool
) -> None:
    fields = "".join(f"From: {value}\r\n" for value in values)
    fields += "Reply-To: desk@example.org\r\n" if reply_to else ""
    content = f"Subject: x\r\n{fields}To: u@example.org\r\n\r\nbody\r\n".encode()
    envelope = Envelope(sender=sender, recipients=("u@example.org",))
    checked = policy(from_rewrite=rewrite)
    mail_from, prepared = checked.prepare(envelope, content)
    block = headers.header_block(prepared)
    assert headers.field_names(block).count(b"from") == 1
    assert all(checked.permits(address) for address in from_addresses(prepared))
    assert checked.permits(mail_from)
    # Only one field's worth of growth, as headers.ADDED_AT_MOST allows for; the 11
    # octets per renamed extra From: concern only mail queued before the listener
    # refused several.
    extra = 11 * max(0, len(values) - 1)
    assert len(prepared) - len(content) <= headers.FIELD_LINE_MAX + 2 + 4 + extra


# --- RCPT TO:<postmaster> --------------------------------------------------------------


def test_postmaster_is_sent_to_the_mailbox_once() -> None:
    recipients = ("Postmaster", "user@example.org", MAILBOX, "postmaster")
    assert policy().upstream_recipients(recipients) == (MAILBOX, "user@example.org")
    unchanged = ("postmaster@example.org", "user@example.org")
    assert policy().upstream_recipients(unchanged) == unchanged


def test_the_result_for_the_mailbox_is_told_for_postmaster() -> None:
    recipients = ("Postmaster", "user@example.org", "other@example.org")
    attempt = Attempt(
        delivered=(MAILBOX,),
        failed=(("user@example.org", "550 5.1.1 unknown"),),
        deferred=("other@example.org",),
        reason="temporary",
    )
    told = policy().envelope_attempt(recipients, attempt)
    assert told.delivered == ("Postmaster",)
    assert told.failed == (("user@example.org", "550 5.1.1 unknown"),)
    assert told.deferred == ("other@example.org",)
    assert told.reason == "temporary"


def test_without_a_mailbox_postmaster_stays_as_it_is() -> None:
    open_policy = SenderPolicy(UpstreamSettings(mailbox=""))
    assert open_policy.upstream_recipients(("postmaster",)) == ("postmaster",)
    attempt = Attempt(delivered=("postmaster",))
    assert open_policy.envelope_attempt(("postmaster",), attempt) is attempt


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

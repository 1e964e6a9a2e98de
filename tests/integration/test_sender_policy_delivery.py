"""The sender policy and RFC 5321's odd addresses on the whole path: SMTP client →
listener → spool → scheduler → SmtpTransport → fake Exchange Online (issue 12, items 13
and 14). The upstream never sees a foreign From:, and nothing is retried for a reason
retrying cannot cure."""

from __future__ import annotations

import email
from collections.abc import AsyncIterator, Callable
from email import policy as email_policy
from pathlib import Path

import aiosmtplib
import pytest

from relayd.transports.base import SEND_AS_DENIED
from relayd.transports.smtp import SmtpTransport
from tests.fakes.exchange import FakeExchange
from tests.fakes.tokens import StandInTokens
from tests.harness import FAST_RETRY, InProcessRelay
from tests.helpers import deep_merge, eventually, load_settings

BODY = b"Subject: policy\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"


@pytest.fixture
async def relay(
    tmp_path: Path, exchange: FakeExchange, standin_tokens: StandInTokens, ca_file: Path
) -> AsyncIterator[Callable[..., InProcessRelay]]:
    relays: list[InProcessRelay] = []

    async def build(**upstream: object) -> InProcessRelay:
        upstream = {"rate_limit_per_minute": 0, **upstream}
        overrides = deep_merge(
            exchange.relay_config(ca_file, **upstream),
            {"retry": FAST_RETRY, "listen": {"port": 0}, "logging": {"level": "warning"}},
        )
        settings = load_settings(tmp_path, overrides)
        made = InProcessRelay(settings, lambda s, m: SmtpTransport(s, m, standin_tokens))
        relays.append(made)
        return await made.start()

    yield build
    for made in relays:
        await made.stop()


def from_fields(content: bytes) -> list[str]:
    parsed = email.message_from_bytes(content, policy=email_policy.default)
    return [
        address.addr_spec for field in parsed.get_all("From") or [] for address in field.addresses
    ]


async def send(port: int, sender: str, recipients: list[str], content: bytes) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        _, reply = await client.sendmail(sender, recipients, content)
    return reply


async def test_postmaster_is_delivered_to_the_mailbox(relay, exchange: FakeExchange) -> None:
    # RFC 5321 §4.5.1: RCPT TO:<postmaster> must be accepted; relayd has no mailboxes
    # of its own, so it goes to the relay's mailbox, told for "postmaster" in the queue.
    r = await relay()
    content = b"From: app@example.com\r\nTo: postmaster\r\n" + BODY
    await send(r.port, exchange.mailbox, ["Postmaster", "user@example.org"], content)
    await eventually(lambda: r.drained() and len(exchange.messages) == 1)
    (arrived,) = exchange.messages
    assert sorted(arrived.recipients) == sorted((exchange.mailbox, "user@example.org"))
    assert r.metric("relayd_messages_delivered_total") == 1
    assert r.metric("relayd_dsn_sent_total") == 0


async def test_a_quoted_local_part_with_a_bracket_reaches_the_upstream_whole(
    relay, exchange: FakeExchange
) -> None:
    r = await relay()
    await send(r.port, exchange.mailbox, ['"a>b"@example.org'], b"From: x@apps.example\r\n" + BODY)
    await eventually(lambda: r.drained() and len(exchange.messages) == 1)
    assert exchange.messages[0].recipients == ('"a>b"@example.org',)


async def test_a_message_without_from_leaves_with_the_mailbox_as_from(
    relay, exchange: FakeExchange
) -> None:
    # Before: sent without From:, which Exchange never accepts (RFC 5322 §3.6), retried.
    r = await relay()
    await send(r.port, "app@apps.example.net", ["user@example.org"], BODY)
    await eventually(lambda: r.drained() and len(exchange.messages) == 1)
    (arrived,) = exchange.messages
    assert from_fields(arrived.content) == [exchange.mailbox]
    assert b"\r\nReply-To: <app@apps.example.net>\r\n" in arrived.content
    assert arrived.content.endswith(b"\r\n\r\nHello.\r\n")


async def test_a_queued_message_with_a_second_foreign_from_is_delivered_not_deferred(
    relay, exchange: FakeExchange
) -> None:
    # Queued before the listener refused several From: fields. Before: the second one
    # went out unchanged, Exchange answered SendAsDenied, retried until max_age.
    r = await relay()
    content = f"From: {exchange.mailbox}\r\nFrom: ceo@apps.example.net\r\n".encode() + BODY
    queue_id = await r.queue(("user@example.org",), content=content)
    await eventually(lambda: r.settled(queue_id))
    (arrived,) = exchange.messages
    assert from_fields(arrived.content) == [exchange.mailbox]
    assert b"\r\nX-Original-From: ceo@apps.example.net\r\n" in arrived.content
    assert r.metric("relayd_messages_deferred_total", reason=SEND_AS_DENIED) == 0

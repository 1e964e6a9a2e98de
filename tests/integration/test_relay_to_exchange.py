"""The whole path in one process: SMTP client → listener → spool → scheduler →
SmtpTransport → fake Exchange Online (with the stand-in token source).

The same checks through a `relayd serve` subprocess with real MSAL tokens are in
test_serve_exchange.py; these add what needs the stand-in token source or a look
inside the process (metrics, the spool's counters).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosmtplib
import pytest

from relayd.transports.smtp import SmtpTransport
from tests.fakes.exchange import FakeExchange
from tests.fakes.tokens import StandInTokens
from tests.harness import FAST_RETRY, InProcessRelay
from tests.helpers import deep_merge, eventually, load_settings, make_message, send_messages

# The many-message run through `relayd serve` is test_soak.py's (2,000 messages, each
# exactly once and byte-identical, at most 3 connections); here, in one process, fewer
# show the same.
COUNT = 200
MESSAGE_ID = re.compile(rb"^Message-ID: (\S+)\r\n", re.MULTILINE | re.IGNORECASE)


@pytest.fixture
async def relay(
    tmp_path: Path, exchange: FakeExchange, standin_tokens: StandInTokens, ca_file: Path
) -> AsyncIterator[Callable[..., InProcessRelay]]:
    relays: list[InProcessRelay] = []

    async def build(**upstream: object) -> InProcessRelay:
        upstream = {"rate_limit_per_minute": 0, "throttle_pause": "0.3s", **upstream}
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


def trace_prefix(arrived: bytes, original: bytes) -> bytes:
    assert arrived.endswith(original)
    return arrived[: len(arrived) - len(original)]


async def test_messages_arrive_exactly_once_and_byte_identical(
    relay, exchange: FakeExchange
) -> None:
    r = await relay()
    originals = {}
    batch = []
    for number in range(COUNT):
        content = make_message(f"message {number}", body_size=2048, sender=exchange.mailbox)
        originals[MESSAGE_ID.search(content).group(1)] = content
        batch.append((exchange.mailbox, [f"user{number % 7}@example.org"], content))
    replies = await send_messages(r.port, batch, connections=4)
    assert all(reply.startswith("2.0.0 Ok: queued as") for reply in replies)
    await eventually(lambda: len(exchange.messages) >= COUNT and r.drained(), 60)
    await asyncio.sleep(0.2)
    assert len(exchange.messages) == COUNT
    seen = set()
    for arrived in exchange.messages:
        message_id = MESSAGE_ID.search(arrived.content).group(1)
        assert message_id not in seen
        seen.add(message_id)
        prefix = trace_prefix(arrived.content, originals[message_id])
        # Only relayd's own Received: field was added (RFC 5321 §4.4).
        assert prefix.startswith(b"Received: from ")
        assert re.fullmatch(rb"Received: [^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n", prefix)
    assert seen == set(originals)
    assert exchange.stats.peak_connections <= 3
    assert r.metric("relayd_messages_delivered_total") == COUNT


async def test_rate_limit_holds_and_the_excess_waits_in_the_spool(
    relay, exchange: FakeExchange
) -> None:
    r = await relay(rate_limit_per_minute=5)
    batch = [
        (exchange.mailbox, ["user@example.org"], make_message(f"message {n}")) for n in range(8)
    ]
    await send_messages(r.port, batch)
    await eventually(lambda: len(exchange.messages) == 5, 10)
    await asyncio.sleep(0.5)
    assert len(exchange.messages) == 5  # the rest is not sent to be refused
    assert r.spool.census().messages["incoming"] == 3
    assert r.metric("relayd_rate_limit_tokens") == 0


async def test_strict_sender_policy_refuses_at_end_of_data(relay, exchange: FakeExchange) -> None:
    r = await relay(from_rewrite=False)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=r.port, start_tls=False) as client:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail(
                "billing@apps.example.net",
                ["user@example.org"],
                make_message(sender="billing@apps.example.net"),
            )
    assert refused.value.code == 550
    assert "billing@apps.example.net" in refused.value.message
    assert "upstream.from_rewrite" in refused.value.message
    assert r.drained()
    assert r.metric("relayd_messages_rejected_total", reason="sender_policy") == 1


async def test_permanent_refusal_gives_one_dsn_and_a_null_sender_none(
    relay, exchange: FakeExchange
) -> None:
    # Refused by recipient, not by the n-th DATA: the DSN's own DATA may come between.
    exchange.refuse_recipient("user@example.org", "550 5.1.1 Recipient address rejected")
    r = await relay()
    await send_messages(
        r.port,
        [
            ("app@example.com", ["user@example.org"], make_message("one")),
            ("", ["user@example.org"], make_message("two")),  # MAIL FROM:<>
        ],
    )
    await eventually(lambda: r.spool.census().messages["failed"] == 2, 10)
    await eventually(lambda: len(exchange.messages) == 1, 10)
    await asyncio.sleep(0.3)
    (notice,) = exchange.messages
    assert notice.recipients == ("app@example.com",)
    assert b"Auto-Submitted: auto-replied" in notice.content
    assert r.metric("relayd_dsn_sent_total") == 1

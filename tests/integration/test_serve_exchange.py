"""`relayd serve` as a subprocess, signed in through the fake Entra ID (real MSAL over
HTTPS), delivering to the fake Exchange Online over STARTTLS + XOAUTH2."""

from __future__ import annotations

import asyncio
import email
from email import policy as email_policy
from pathlib import Path

from tests.fakes import exchange as fake_exchange
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.helpers import eventually, make_message, send_messages

SENDER = "app@example.com"


def files_in(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir()] if directory.is_dir() else []


async def test_rate_limit_holds_and_the_excess_waits_in_the_spool(
    serve, upstream: FakeExchange, tmp_path: Path
) -> None:
    relay = serve(rate_limit_per_minute=5)
    batch = [(MAILBOX, ["user@example.org"], make_message(f"m{n}")) for n in range(8)]
    await send_messages(relay.port, batch)
    await eventually(lambda: len(upstream.messages) == 5, 20)
    await asyncio.sleep(1)
    assert len(upstream.messages) == 5
    assert len(files_in(tmp_path / "spool" / "incoming")) == 3


async def test_foreign_from_arrives_rewritten_with_reply_to(serve, upstream: FakeExchange) -> None:
    relay = serve()
    content = make_message("invoice", sender="billing@apps.example.net")
    await send_messages(relay.port, [("billing@apps.example.net", ["user@example.org"], content)])
    await eventually(lambda: len(upstream.messages) == 1, 20)
    (arrived,) = upstream.messages
    message = email.message_from_bytes(arrived.content, policy=email_policy.default)
    assert arrived.mail_from == MAILBOX
    assert message["From"].addresses[0].addr_spec == MAILBOX
    assert message["Reply-To"].addresses[0].addr_spec == "billing@apps.example.net"


async def test_outage_ends_with_everything_delivered_and_nothing_failed(
    serve, upstream: FakeExchange, tmp_path: Path
) -> None:
    relay = serve()
    await upstream.go_down()
    batch = [
        (SENDER, ["user@example.org"], make_message(f"m{n}", sender=SENDER)) for n in range(20)
    ]
    await send_messages(relay.port, batch)
    await asyncio.sleep(3)  # the outage: 30 s in the issue, the same logic in 3 s
    assert upstream.messages == []
    await upstream.come_up()
    await eventually(lambda: len(upstream.messages) >= 20, 30)
    await asyncio.sleep(0.5)
    assert len(upstream.messages) == 20  # and no DSN among them
    assert files_in(tmp_path / "spool" / "failed") == []
    assert '"event": "deferred"' in relay.output()


async def test_permanent_refusal_gives_exactly_one_dsn_and_none_for_a_null_sender(
    serve, upstream: FakeExchange, tmp_path: Path
) -> None:
    # Refused by recipient, not by the n-th DATA: the DSN's own DATA may come between
    # the two messages', and it goes to SENDER, which the fake accepts.
    upstream.refuse_recipient("user@example.org", "550 5.1.1 Recipient address rejected")
    relay = serve()
    await send_messages(
        relay.port,
        [
            (SENDER, ["user@example.org"], make_message("refused", sender=SENDER)),
            ("", ["user@example.org"], make_message("refused too")),  # MAIL FROM:<>
        ],
    )
    await eventually(lambda: len(files_in(tmp_path / "spool" / "failed")) == 2, 20)
    await eventually(lambda: len(upstream.messages) == 1, 20)
    await asyncio.sleep(1)
    (notice,) = upstream.messages
    assert notice.recipients == (SENDER,) and notice.mail_from == MAILBOX
    assert b"Auto-Submitted: auto-replied" in notice.content
    assert b"550 5.1.1 Recipient address rejected" in notice.content


async def test_token_refused_by_exchange_is_renewed_through_entra_once(
    serve, upstream: FakeExchange, entra: FakeEntra
) -> None:
    upstream.fail("auth", fake_exchange.BAD_TOKEN, times=1)
    relay = serve()
    redeemed = entra.requests["token:refresh_token"]
    await send_messages(relay.port, [(MAILBOX, ["user@example.org"], make_message("one"))])
    await eventually(lambda: len(upstream.messages) == 1, 20)
    assert entra.requests["token:refresh_token"] == redeemed + 1
    refused, accepted = upstream.stats.tokens_seen
    assert refused != accepted  # the retry used the renewed token
    assert entra.is_valid_access_token(MAILBOX, accepted)
    assert '"upstream refused the access token; renewing it"' in relay.output()

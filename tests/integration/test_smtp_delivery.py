"""SmtpTransport + Scheduler against the fake Exchange Online, over real TLS sockets."""

from __future__ import annotations

import asyncio
import email
import io
from collections.abc import AsyncIterator
from email import policy as email_policy
from pathlib import Path

import pytest
import structlog.testing

from relayd.auth import tokens as auth
from relayd.ops import logging as relay_logging
from relayd.transports.base import AUTH, CONNECTION, SEND_AS_DENIED, TEMPORARY, THROTTLED
from tests.fakes import exchange as fake_exchange
from tests.fakes.exchange import FakeExchange
from tests.fakes.tokens import StandInTokens
from tests.harness import SmtpHarnesses
from tests.helpers import eventually, make_message

SENDER = "app@example.com"


@pytest.fixture
async def make(
    tmp_path: Path, exchange: FakeExchange, standin_tokens: StandInTokens, ca_file: Path
) -> AsyncIterator[SmtpHarnesses]:
    """Harnesses whose transport is SmtpTransport pointed at the fake."""
    harnesses = SmtpHarnesses(tmp_path, exchange, standin_tokens, ca_file, timeout=5)
    yield harnesses
    await harnesses.stop()


def parsed(content: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(content, policy=email_policy.default)


async def test_message_arrives_byte_identical_over_starttls_and_xoauth2(
    make, exchange: FakeExchange, standin_tokens: StandInTokens
) -> None:
    h = await make().start()
    content = make_message(body_size=3000, sender=exchange.mailbox) + b".leading dot\r\n"
    queue_id = await h.queue(("user@example.org",), content=content)
    await eventually(lambda: h.settled(queue_id))
    (arrived,) = exchange.messages
    assert arrived.content == content
    assert arrived.mail_from == exchange.mailbox and arrived.recipients == ("user@example.org",)
    assert exchange.stats.tokens_seen == [standin_tokens.current]
    assert standin_tokens.accepted == 1
    assert h.metric("relayd_upstream_replies_total", code="2.0.0") == 1
    assert h.metric("relayd_upstream_connections") == 1


async def test_451_defers_and_the_retry_delivers(make, exchange: FakeExchange) -> None:
    exchange.fail("data", fake_exchange.TRY_LATER, times=1)
    h = await make().start()
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id))
    assert len(exchange.messages) == 1
    assert h.metric("relayd_messages_deferred_total", reason=TEMPORARY) == 1
    assert h.metric("relayd_upstream_replies_total", code="4.7.500") == 1


async def test_421_pauses_the_whole_upstream(make, exchange: FakeExchange) -> None:
    exchange.fail("mail", fake_exchange.SERVICE_UNAVAILABLE, times=1)
    h = await make(throttle_pause="1s").start()
    first = await h.queue()
    await eventually(lambda: h.scheduler.circuit_open, 5)
    others = [await h.queue() for _ in range(3)]
    await asyncio.sleep(0.3)
    assert exchange.messages == [] and h.scheduler.circuit_open
    for queue_id in (first, *others):
        await eventually(lambda q=queue_id: h.settled(q), 10)
    assert len(exchange.messages) == 4
    assert h.metric("relayd_messages_deferred_total", reason=THROTTLED) == 1
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0


async def test_pool_never_opens_more_than_three_connections(make, exchange: FakeExchange) -> None:
    exchange.reply_delay = 0.005  # keep sessions busy so the pool fills up
    h = await make().start()
    ids = [await h.queue(("user@example.org",)) for _ in range(40)]
    await eventually(lambda: h.drained(), 30)
    assert len(exchange.messages) == 40
    assert exchange.stats.peak_connections == 3
    assert exchange.stats.connections_total == 3  # reused, never re-opened
    assert {m.connection for m in exchange.messages} == {1, 2, 3}
    assert all(h.state_of(q) is None for q in ids)


async def test_a_fourth_connection_is_throttled_and_nothing_is_lost(
    make, exchange: FakeExchange
) -> None:
    exchange.reply_delay = 0.01
    h = await make(max_connections=5).start()  # misconfigured: Exchange allows 3
    await h.queue_many(20)
    await eventually(lambda: h.drained(), 30)
    assert len(exchange.messages) == 20
    assert exchange.stats.auth_failures >= 1  # 432 4.3.2 at AUTH
    assert h.metric("relayd_upstream_replies_total", code="4.3.2") >= 1
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0


async def test_revoked_token_is_refreshed_once_and_the_message_goes(
    make, exchange: FakeExchange, standin_tokens: StandInTokens
) -> None:
    standin_tokens.revoke_current()
    h = await make().start()
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id))
    assert len(exchange.messages) == 1
    assert len(standin_tokens.rejections) == 1 and standin_tokens.rejected_marks == []
    assert standin_tokens.state == auth.OK
    assert h.metric("relayd_messages_deferred_total", reason=AUTH) == 0


async def test_refused_fresh_token_defers_everything_and_never_bounces(
    make, exchange: FakeExchange, standin_tokens: StandInTokens
) -> None:
    standin_tokens.refuse_all = True
    h = await make().start()
    ids = [await h.queue(sender=SENDER) for _ in range(3)]
    await eventually(lambda: standin_tokens.state == auth.REJECTED, 5)
    await eventually(lambda: h.scheduler.active_count == 0, 5)
    assert len(standin_tokens.rejections) == 1  # refreshed once, then marked
    assert "5.7.3" in standin_tokens.rejected_marks[0]
    assert exchange.messages == []
    assert all(h.state_of(q) in ("incoming", "deferred") for q in ids)
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0
    assert h.metric("relayd_dsn_sent_total") == 0
    # A person fixes it: the next probe succeeds and the queue drains.
    standin_tokens.refuse_all = False
    await eventually(lambda: h.drained(), 10)
    assert len(exchange.messages) == 3 and standin_tokens.state == auth.OK


async def test_new_sign_in_ends_the_auth_pause_at_once(
    make, exchange: FakeExchange, standin_tokens: StandInTokens
) -> None:
    standin_tokens.refuse_all = True
    h = await make(retry={"min_delay": "10m", "max_delay": "1h"}).start()
    queue_id = await h.queue()
    await eventually(lambda: standin_tokens.state == auth.REJECTED, 5)
    await eventually(lambda: h.scheduler.circuit_open, 5)  # paused for 10 minutes ...
    standin_tokens.make_available()  # ... until somebody signs in again
    await eventually(lambda: len(exchange.messages) == 1, 5)
    await eventually(lambda: h.settled(queue_id), 5)


async def test_smtp_auth_disabled_is_explained_and_mail_waits(
    make, exchange: FakeExchange, standin_tokens: StandInTokens
) -> None:
    exchange.fail("auth", fake_exchange.AUTH_DISABLED)
    h = await make().start()
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id, "deferred"), 5)
    _, message = h.spool.find(queue_id)
    assert "5.7.139" in message.state.last_error
    assert "SmtpClientAuthenticationDisabled" in message.state.last_error
    assert standin_tokens.state == auth.REJECTED and standin_tokens.rejections == []
    exchange.clear()
    await eventually(lambda: h.settled(queue_id), 10)
    assert len(exchange.messages) == 1


async def test_missing_token_waits_without_touching_the_upstream(
    make, exchange: FakeExchange, standin_tokens: StandInTokens
) -> None:
    standin_tokens.make_unavailable(auth.REAUTH_REQUIRED)
    h = await make().start()
    queue_id = await h.queue()
    await asyncio.sleep(0.3)
    assert h.state_of(queue_id) == "incoming" and exchange.stats.connections_total == 0
    standin_tokens.make_available()  # somebody ran `relayd auth login`
    await eventually(lambda: h.settled(queue_id), 5)


async def test_refused_recipient_fails_alone_with_exactly_one_dsn(
    make, exchange: FakeExchange
) -> None:
    exchange.refuse_recipient("gone@example.org")
    h = await make().start()
    queue_id = await h.queue(("user@example.org", "gone@example.org"), sender=SENDER)
    await eventually(lambda: len(exchange.received_by(SENDER)) == 1, 10)
    await eventually(lambda: h.settled(queue_id, "failed"))
    original = exchange.received_by("user@example.org")
    assert len(original) == 1 and original[0].recipients == ("user@example.org",)
    (notice,) = exchange.received_by(SENDER)
    assert notice.mail_from == exchange.mailbox  # the sender policy applies to DSNs too
    report = parsed(notice.content)
    assert report["From"].addresses[0].addr_spec == exchange.mailbox
    assert report.get_content_type() == "multipart/report"
    assert "Final-Recipient: rfc822; gone@example.org" in notice.content.decode()
    assert "RecipientNotFound" in notice.content.decode()
    await asyncio.sleep(0.3)
    assert len(exchange.messages) == 2


async def test_permanent_refusal_of_a_null_sender_message_gives_no_dsn(
    make, exchange: FakeExchange
) -> None:
    exchange.fail("data", "554 5.6.0 Corrupt message content", times=1)
    h = await make().start()
    queue_id = await h.queue(sender="")
    await eventually(lambda: h.settled(queue_id, "failed"))
    await asyncio.sleep(0.3)
    assert exchange.messages == [] and h.metric("relayd_dsn_sent_total") == 0


async def test_foreign_from_arrives_rewritten_with_reply_to(make, exchange: FakeExchange) -> None:
    h = await make().start()
    content = make_message(sender="billing@apps.example.net")
    queue_id = await h.queue(sender="billing@apps.example.net", content=content)
    await eventually(lambda: h.settled(queue_id))
    (arrived,) = exchange.messages
    message = parsed(arrived.content)
    assert arrived.mail_from == exchange.mailbox
    assert message["From"].addresses[0].addr_spec == exchange.mailbox
    assert message["Reply-To"].addresses[0].addr_spec == "billing@apps.example.net"


async def test_send_as_denied_is_deferred_not_bounced(make, exchange: FakeExchange) -> None:
    # relayd believes it may send as alerts@ (upstream.send_as) but Exchange disagrees.
    h = await make(send_as=["alerts@example.com"]).start()
    content = make_message(sender="alerts@example.com")
    queue_id = await h.queue(sender="alerts@example.com", content=content)
    await eventually(lambda: h.metric("relayd_messages_deferred_total", reason=SEND_AS_DENIED) >= 1)
    _, message = h.spool.find(queue_id)
    assert "5.2.252" in message.state.last_error and "upstream.send_as" in message.state.last_error
    assert h.metric("relayd_dsn_sent_total") == 0 and exchange.messages == []


async def test_dropped_connection_is_replaced_and_the_message_retried(
    make, exchange: FakeExchange
) -> None:
    exchange.drop("data", times=1)
    h = await make().start()
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id))
    assert len(exchange.messages) == 1
    assert h.metric("relayd_messages_deferred_total", reason=CONNECTION) == 1
    assert exchange.stats.connections_total == 2


async def test_every_second_connection_dropped_still_delivers_everything(
    make, exchange: FakeExchange
) -> None:
    exchange.drop_every = 2
    h = await make().start()
    await h.queue_many(6)
    await eventually(lambda: h.drained(), 20)
    assert len(exchange.messages) == 6
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0


async def test_outage_ends_with_everything_delivered_and_nothing_failed(
    make, exchange: FakeExchange
) -> None:
    h = await make().start()
    await exchange.go_down()
    await h.queue_many(10, sender=SENDER)
    await eventually(lambda: h.scheduler.circuit_open, 5)
    await asyncio.sleep(1.5)  # the outage (30 s in production terms; same logic)
    assert exchange.messages == []
    await exchange.come_up()
    await eventually(lambda: h.drained(), 20)
    assert len(exchange.messages) == 10
    assert h.metric("relayd_messages_failed_total", reason="expired") == 0
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0
    assert h.metric("relayd_dsn_sent_total") == 0
    assert h.metric("relayd_messages_deferred_total", reason=CONNECTION) >= 1


async def test_idle_connections_are_closed(make, exchange: FakeExchange) -> None:
    h = await make(idle_timeout="0.2s").start()
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id))
    await eventually(lambda: exchange.stats.connections_now == 0, 5)
    assert h.metric("relayd_upstream_connections") == 0


async def test_server_closing_idle_sessions_costs_no_deferral(make, exchange: FakeExchange) -> None:
    h = await make().start()
    first = await h.queue()
    await eventually(lambda: h.settled(first))
    await exchange.go_down()  # cuts the idle session; the relay may not notice at once
    await exchange.come_up()
    second = await h.queue()
    await eventually(lambda: h.settled(second), 5)
    assert len(exchange.messages) == 2
    assert h.metric("relayd_messages_deferred_total", reason=CONNECTION) == 0


async def test_slow_upstream_times_out_and_is_retried(make, exchange: FakeExchange) -> None:
    exchange.reply_delay = 0.6
    h = await make(timeout="0.3s").start()
    queue_id = await h.queue()
    await eventually(lambda: h.metric("relayd_messages_deferred_total", reason="timeout") >= 1, 5)
    exchange.reply_delay = 0
    await eventually(lambda: h.settled(queue_id), 10)
    assert len(exchange.messages) >= 1  # a timeout after DATA may mean a duplicate, never a loss


async def test_no_token_or_xoauth2_string_reaches_the_logs(
    make, exchange: FakeExchange, standin_tokens: StandInTokens
) -> None:
    output = io.StringIO()
    relay_logging.configure("json", "debug", output)
    try:
        standin_tokens.revoke_current()
        h = await make().start()
        first = await h.queue()
        await eventually(lambda: h.settled(first))
        standin_tokens.refuse_all = True
        h.transport.pool.discard_idle()
        second = await h.queue()
        await eventually(lambda: standin_tokens.state == auth.REJECTED, 5)
        await eventually(lambda: h.settled(second, "deferred"), 5)
    finally:
        relay_logging.configure("console", "info")
    text = output.getvalue()
    assert "535 5.7.3" in text  # the logs did record the refusal ...
    for token in standin_tokens.issued:  # ... but never a token
        assert token not in text
    assert "dXNlcj" not in text  # base64("user=..."), the XOAUTH2 initial response


# --- refusals about the relay's own account ---------------------------------------------

HOST = fake_exchange.HOSTNAME
ACCOUNT_REFUSALS = {
    "quota": (
        "data",
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException;"
        f" Failed to process message due to a permanent exception [{HOST}]",
    ),
    "mailbox_full": (
        "data",
        "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException."
        f"MapiExceptionQuotaExceeded [{HOST}]",
    ),
    "account_restricted": ("mail", f"550 5.1.8 Access denied, bad outbound sender [{HOST}]"),
    "tenant_blocked": (
        "mail",
        f"550 5.7.705 Access denied, tenant has exceeded threshold [{HOST}]",
    ),
    "tenant_blocked@rcpt": (
        "rcpt",
        "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP"
        f" [{HOST}]",
    ),
    "tenant_blocked@data": (
        "data",
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered"
        f" domains [{HOST}]",
    ),
}


@pytest.mark.parametrize("name", list(ACCOUNT_REFUSALS))
async def test_account_refusal_pauses_everything_and_never_bounces(
    make, exchange: FakeExchange, name: str
) -> None:
    stage, reply = ACCOUNT_REFUSALS[name]
    reason = name.split("@")[0]
    exchange.fail(stage, reply)
    h = make(retry={"min_delay": "0.1s", "max_delay": "1s", "max_age": "1h"})
    with structlog.testing.capture_logs() as logs:
        await h.start()
        ids = [await h.queue(sender=SENDER) for _ in range(6)]
        await eventually(lambda: h.metric("relayd_deliveries_paused", reason=reason) == 1, 5)
        await asyncio.sleep(0.3)  # paused: nothing more is tried
        refused = h.metric("relayd_messages_deferred_total", reason=reason)
        explained = [e for e in logs if e["event"].startswith("the upstream refuses this account")]
    assert 1 <= refused <= h.settings.upstream.max_connections  # those already in flight
    assert len(explained) == 1 and explained[0]["reason"] == reason
    assert "mail waits" in explained[0]["help"] or "resume" in explained[0]["help"]
    assert h.metric("relayd_dsn_sent_total") == 0
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0
    assert all(h.state_of(q) in ("incoming", "deferred") for q in ids)
    exchange.clear()  # somebody acted; the next probe goes through
    await eventually(h.drained, 10)
    assert len(exchange.messages) == 6
    assert h.metric("relayd_deliveries_paused", reason=reason) == 0


# --- budgets spent on nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    [
        {"rate_limit_per_minute": 2},
        {"rate_limit_per_minute": 0, "daily_recipient_limit": 2},
    ],
    ids=["rate", "daily"],
)
@pytest.mark.parametrize("fault", ["432 at AUTH", "dropped at connect"])
async def test_attempts_exchange_never_counted_leave_the_budget_alone(
    make, exchange: FakeExchange, limit: dict, fault: str
) -> None:
    if fault == "432 at AUTH":
        exchange.fail("auth", fake_exchange.TOO_MANY_CONNECTIONS, times=2)
    else:
        exchange.drop("connect", times=2)
    h = await make(max_connections=1, **limit).start()
    ids = [await h.queue(), await h.queue()]
    for queue_id in ids:  # not after a minute (or a day) behind budget never used
        await eventually(lambda q=queue_id: h.settled(q), 5)
    assert len(exchange.messages) == 2
    assert h.metric("relayd_daily_recipients_used") == 2

"""`relayd serve` as a subprocess with `upstream.transport: graph` and `auto`, signed in
once through the fake Entra ID (both resources), sending through the fake Microsoft
Graph (real HTTPS) and, for auto, the fake Exchange."""

from __future__ import annotations

import asyncio
import collections
import email
import os
import re
import time
from email import policy as email_policy
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

from relayd.queue.model import DeliveryState, Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.fakes import exchange as fake_exchange
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.graph import MAIL_READ_WRITE, FakeGraph
from tests.helpers import (
    eventually,
    make_message,
    numbered_message,
    run_relayd,
    scrape,
    send_messages,
)
from tests.serving import MESSAGE_ID, serve_config, waiting_and_failed

FOREIGN = "billing@apps.example.net"
SIX_MIB = 6 * 1024 * 1024


def graph_upstream(graph: FakeGraph, ca_file: Path, transport: str = "graph", **keys) -> dict:
    return {"upstream": graph.relay_config(ca_file, transport, **keys)}


def delivered_ids(graph: FakeGraph) -> collections.Counter[bytes]:
    return collections.Counter(MESSAGE_ID.search(m.mime).group(1) for m in graph.messages)


async def logged(relay, event: str, timeout: float = 20.0) -> None:
    """Until relayd logged ``event`` (polling without blocking the fakes' event loop)."""
    await eventually(
        lambda: any(r.get("event") == event for r in relay.log_records()), timeout, event, 0.1
    )


async def all_through(relay, count: int, arrived, timeout: float = 60.0) -> None:
    await eventually(
        lambda: arrived() >= count and waiting_and_failed(relay)[0] == 0,
        timeout,
        f"{count} messages delivered and the queue empty",
        interval=0.1,
    )


async def test_graph_sends_each_of_1000_messages_once_within_its_limits(
    serve, graph_api: FakeGraph, ca_file: Path
) -> None:
    relay = serve(graph_upstream(graph_api, ca_file))
    batch = []
    for n in range(1000):
        sender = FOREIGN if n % 10 == 0 else MAILBOX
        content = numbered_message(n, 300, sender=sender, recipients=("user@example.org",))
        # Every third message also goes to an address no header names: a Bcc.
        envelope = ["user@example.org", *([f"bcc{n % 7}@example.org"] if n % 3 == 0 else [])]
        batch.append((sender, envelope, content))
    await send_messages(relay.port, batch, connections=8)

    await all_through(relay, 1000, lambda: len(graph_api.messages))
    await asyncio.sleep(0.5)

    counts = delivered_ids(graph_api)
    assert len(counts) == 1000 and set(counts.values()) == {1}  # each exactly once
    assert graph_api.peak_in_flight <= 4  # Graph's concurrency limit per mailbox
    assert waiting_and_failed(relay) == (0, 0)
    by_number = {int(re.search(rb"<t-(\d+)@", m.mime).group(1)): m for m in graph_api.messages}
    for n, message in by_number.items():
        expected = {"user@example.org", *([f"bcc{n % 7}@example.org"] if n % 3 == 0 else [])}
        assert set(message.recipients) == expected
        if n % 3 == 0:
            assert message.bcc == (f"bcc{n % 7}@example.org",)
    rewritten = email.message_from_bytes(by_number[0].mime, policy=email_policy.default)
    assert rewritten["From"].addresses[0].addr_spec == MAILBOX  # as on SMTP
    assert rewritten["Reply-To"].addresses[0].addr_spec == FOREIGN


async def test_a_partly_delivered_message_is_not_sent_again_to_its_done_recipients(
    serve, tmp_path: Path, entra: FakeEntra, upstream: FakeExchange, graph_api: FakeGraph, ca_file
) -> None:
    path = serve_config(tmp_path, entra, upstream, ca_file, graph_upstream(graph_api, ca_file))
    # An earlier attempt (by SMTP, before SMTP AUTH was switched off) reached a@.
    spool = Spool(tmp_path / "spool")
    spool.recover()
    queue_id = new_queue_id()
    recipients = ("a@example.org", "b@example.org")
    content = make_message("partly", sender=MAILBOX, recipients=recipients)
    await spool.commit(queue_id, Envelope(MAILBOX, recipients, received_at=time.time()), content)
    message = spool.claim(queue_id)
    spool.defer(message, DeliveryState(attempts=1, done_recipients=("a@example.org",)), 0)

    relay = serve.restart(path)
    await all_through(relay, 1, lambda: len(graph_api.messages))

    (sent,) = graph_api.messages
    assert sent.recipients == ("b@example.org",)
    assert b"a@example.org" not in sent.mime.split(b"\r\n\r\n")[0]


async def test_auto_with_smtp_auth_disabled_sends_everything_through_graph(
    serve, upstream: FakeExchange, graph_api: FakeGraph, ca_file: Path
) -> None:
    upstream.fail("auth", fake_exchange.AUTH_DISABLED)  # every sign-in: 535 5.7.139
    relay = serve(graph_upstream(graph_api, ca_file, "auto", smtp_probe_interval="1s"))

    first = [(MAILBOX, ["user@example.org"], numbered_message(n, 300)) for n in range(30)]
    await send_messages(relay.port, first, connections=3)
    await all_through(relay, 30, lambda: len(graph_api.messages))
    await asyncio.sleep(1.2)  # the probe interval passes while mail waits
    attempts_before = upstream.stats.auth_attempts
    more = [(MAILBOX, ["user@example.org"], numbered_message(n, 300)) for n in range(30, 40)]
    await send_messages(relay.port, more)
    await all_through(relay, 40, lambda: len(graph_api.messages))
    await logged(relay, "SMTP still refused; mail keeps going through Microsoft Graph")

    assert upstream.stats.auth_attempts > attempts_before  # SMTP was probed again
    assert upstream.messages == []
    assert set(delivered_ids(graph_api).values()) == {1}
    assert waiting_and_failed(relay) == (0, 0)  # nothing failed, nothing bounced
    switches = [r for r in relay.log_records() if r["event"].startswith("SMTP AUTH is disabled")]
    assert len(switches) == 1 and switches[0]["level"] == "warning"
    metrics = scrape(relay.metrics_port)
    assert metrics.value("relayd_upstream_transport_switches_total", to="graph") == 1
    assert metrics.value("relayd_upstream_transport", transport="graph") == 1
    assert metrics.value("relayd_auth_healthy") == 1  # Graph's token is the one in use

    upstream.clear()  # an administrator enabled SMTP AUTH
    await asyncio.sleep(1.2)
    await send_messages(relay.port, [(MAILBOX, ["user@example.org"], numbered_message(99, 300))])
    await logged(relay, "SMTP AUTH works again; sending by SMTP")
    await send_messages(relay.port, [(MAILBOX, ["user@example.org"], numbered_message(100, 300))])
    await eventually(lambda: len(upstream.messages) >= 1, 20, "a message by SMTP again")


async def test_a_429_storm_delivers_everything_and_waits_out_retry_after(
    serve, graph_api: FakeGraph, ca_file: Path
) -> None:
    relay = serve(graph_upstream(graph_api, ca_file))
    batch = [(MAILBOX, ["user@example.org"], numbered_message(n, 300)) for n in range(200)]
    sending = asyncio.ensure_future(send_messages(relay.port, batch, connections=4))
    await eventually(lambda: len(graph_api.messages) >= 30, 30, "the first deliveries")
    graph_api.throttle_for(2)  # every request in the next 2 s: 429, Retry-After
    await sending

    await all_through(relay, 200, lambda: len(graph_api.messages))

    assert set(delivered_ids(graph_api).values()) == {1} and len(graph_api.messages) == 200
    assert graph_api.statuses[429] >= 1
    # Only the requests already on their way when the first 429 came, never more: the
    # whole transport paused for Retry-After.
    assert graph_api.requests_while_throttled <= 4
    assert waiting_and_failed(relay) == (0, 0)


def with_attachment(size: int, recipients: tuple[str, ...]) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    message = MIMEMultipart()
    message["From"] = MAILBOX
    message["To"] = ", ".join(recipients)
    message["Subject"] = "quarterly report"
    message["Message-ID"] = "<big@relayd.test>"
    message["Date"] = "Wed, 01 May 2024 10:00:00 +0000"
    message.attach(MIMEText("The report is attached.\n"))
    part = MIMEApplication(data, "pdf", Name="report.pdf")
    part["Content-Disposition"] = 'attachment; filename="report.pdf"'
    message.attach(part)
    return message.as_bytes().replace(b"\n", b"\r\n"), data


async def test_a_6_mib_attachment_goes_by_draft_and_upload_session_intact(
    serve, graph_api: FakeGraph, ca_file: Path
) -> None:
    relay = serve(graph_upstream(graph_api, ca_file, graph_large_messages=True))
    content, data = with_attachment(SIX_MIB, ("user@example.org",))
    await send_messages(relay.port, [(MAILBOX, ["user@example.org"], content)])

    await all_through(relay, 1, lambda: len(graph_api.messages))

    (sent,) = graph_api.messages
    assert sent.via == "draft" and sent.recipients == ("user@example.org",)
    assert sent.attachments == (("report.pdf", "application/pdf", data),)
    assert graph_api.upload_puts and not any(auth for _, _, auth in graph_api.upload_puts)


async def test_without_mail_readwrite_a_large_message_is_held_with_its_reason(
    serve, entra: FakeEntra, graph_api: FakeGraph, ca_file: Path
) -> None:
    entra.withhold_consent(MAIL_READ_WRITE)  # the user declines it at sign-in
    relay = serve(graph_upstream(graph_api, ca_file, graph_large_messages=True))
    content, _ = with_attachment(SIX_MIB, ("user@example.org",))
    (reply,) = await send_messages(relay.port, [(MAILBOX, ["user@example.org"], content)])
    queue_id = re.search(r"queued as (\w+)", reply).group(1)

    await eventually(
        lambda: scrape(relay.metrics_port).value("relayd_queue_messages", state="hold") == 1,
        30,
        "the message in hold/",
    )

    shown = run_relayd("queue", "show", queue_id, "-c", str(relay.config_path))
    assert shown.returncode == 0, shown.stderr
    assert "over Microsoft Graph's 4 MB request limit" in shown.stdout
    assert "Mail.ReadWrite" in shown.stdout and f"relayd queue release {queue_id}" in shown.stdout
    metrics = scrape(relay.metrics_port)
    assert metrics.value("relayd_messages_held_total", reason="too_big") == 1
    assert waiting_and_failed(relay) == (0, 0)  # held, not failed: no bounce
    assert graph_api.messages == []


async def test_auto_sends_a_message_too_big_for_graph_by_smtp_when_smtp_works(
    serve, upstream: FakeExchange, graph_api: FakeGraph, ca_file: Path
) -> None:
    upstream.fail("auth", fake_exchange.AUTH_DISABLED, times=1)  # off, then on again
    relay = serve(graph_upstream(graph_api, ca_file, "auto"))
    await send_messages(relay.port, [(MAILBOX, ["user@example.org"], numbered_message(1, 300))])
    await all_through(relay, 1, lambda: len(graph_api.messages))  # moved to Graph

    content, data = with_attachment(SIX_MIB, ("user@example.org",))
    await send_messages(relay.port, [(MAILBOX, ["user@example.org"], content)])

    await eventually(lambda: len(upstream.messages) == 1, 30, "the large message by SMTP")
    assert data[:1000] in email.message_from_bytes(upstream.messages[0].content).get_payload(
        1
    ).get_payload(decode=True)
    assert len(graph_api.messages) == 1 and waiting_and_failed(relay)[1] == 0

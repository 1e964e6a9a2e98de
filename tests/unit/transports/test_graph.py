"""The Graph transport against the fake Microsoft Graph (real HTTPS): what each answer
means for the message, the recipients Graph is given, and large messages."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
import trustme

from relayd.auth.tokens import REJECTED
from relayd.ops.metrics import Metrics
from relayd.transports.base import (
    AUTH,
    NOTHING,
    SEND_AS_DENIED,
    THROTTLED,
    TOO_BIG,
    Submission,
    Usage,
)
from relayd.transports.graph import GraphTransport
from tests.fakes.graph import MAIL_READ_WRITE, MAIL_SEND, FakeGraph
from tests.fakes.tokens import StandInTokens
from tests.helpers import CLIENT_ID, TENANT_ID, load_settings, make_message

MAILBOX = "relay@contoso.example"


@pytest.fixture
def send_tokens() -> StandInTokens:
    return StandInTokens(MAILBOX, scopes=(MAIL_SEND,))


@pytest.fixture
def large_tokens() -> StandInTokens:
    return StandInTokens(MAILBOX, scopes=(MAIL_READ_WRITE, MAIL_SEND))


@pytest.fixture
async def graph(
    ca: trustme.CA, send_tokens: StandInTokens, large_tokens: StandInTokens
) -> AsyncIterator[FakeGraph]:
    def grant(token: str):
        return send_tokens.grant(token) or large_tokens.grant(token)

    fake = await FakeGraph(ca, grant=grant, mailbox=MAILBOX).start()
    yield fake
    await fake.stop()


def make_transport(
    tmp_path: Path,
    graph: FakeGraph,
    ca_file: Path,
    tokens: StandInTokens,
    large: StandInTokens | None = None,
    **upstream: object,
) -> GraphTransport:
    overrides = {
        "upstream": graph.relay_config(ca_file, **upstream),
        "oauth": {"tenant_id": TENANT_ID, "client_id": CLIENT_ID},
        "retry": {"min_delay": "0.1s", "max_delay": "0.2s"},
    }
    settings = load_settings(tmp_path, overrides)
    return GraphTransport(settings, Metrics(process=False), tokens, large)


def submission(content: bytes, *recipients: str) -> Submission:
    return Submission("0123456789ABCDEF012", MAILBOX, recipients, content)


@pytest.fixture
async def transport(tmp_path, graph, ca_file, send_tokens) -> AsyncIterator[GraphTransport]:
    made = make_transport(tmp_path, graph, ca_file, send_tokens)
    yield made
    await made.close()


async def test_headers_like_the_envelope_go_byte_for_byte(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    content = make_message(sender=MAILBOX, recipients=("a@example.org", "b@example.org"))

    attempt = await transport.deliver(submission(content, "a@example.org", "b@example.org"))

    assert attempt.delivered == ("a@example.org", "b@example.org")
    assert attempt.reply.startswith("Graph 202 (request-id ")
    (sent,) = graph.messages
    assert sent.mime == content and sent.via == "sendMail"
    assert graph.requests == {"POST /me/sendMail": 1}


async def test_envelope_only_recipients_are_bcc_and_header_only_ones_get_nothing(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    # To: names a list address relayd was not asked to deliver to, and the envelope
    # has a recipient no field names (a Bcc), and one recipient done before.
    content = make_message(sender=MAILBOX, recipients=("list@example.org", "done@example.org"))

    attempt = await transport.deliver(submission(content, "hidden@example.org"))

    assert attempt.delivered == ("hidden@example.org",)
    (sent,) = graph.messages
    assert sent.recipients == ("hidden@example.org",) and sent.bcc == ("hidden@example.org",)
    body = content.split(b"\r\n\r\n", 1)[1]
    assert sent.mime.endswith(b"\r\n\r\n" + body)  # only the recipient fields changed


async def test_a_fresh_token_after_401_then_the_auth_pause(
    transport: GraphTransport, graph: FakeGraph, send_tokens: StandInTokens
) -> None:
    content = make_message(sender=MAILBOX)
    graph.fail_next(401, "InvalidAuthenticationToken", "Lifetime validation failed")

    assert (await transport.deliver(submission(content, "user@example.com"))).delivered
    assert len(send_tokens.rejections) == 1 and len(graph.messages) == 1

    graph.fail_next(401, "InvalidAuthenticationToken", times=2)
    attempt = await transport.deliver(submission(content, "user@example.com"))

    assert attempt.reason == AUTH and attempt.deferred == ("user@example.com",)
    assert not attempt.failed  # never a bounce
    assert send_tokens.state == REJECTED
    assert transport.blocked() is not None and transport.blocked().reason == AUTH


async def test_an_smtp_send_token_is_refused_as_graph_refuses_it(
    tmp_path: Path, graph: FakeGraph, ca_file: Path
) -> None:
    smtp_tokens = StandInTokens(MAILBOX)  # SMTP.Send: for Exchange's SMTP AUTH only
    transport = make_transport(tmp_path, graph, ca_file, smtp_tokens)
    try:
        attempt = await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))
    finally:
        await transport.close()
    assert attempt.reason == AUTH and "InvalidAuthenticationToken" in attempt.reply
    assert graph.messages == [] and graph.statuses[401] == 2  # the fresh one was refused too


async def test_access_denied_names_the_permission_and_waits(
    transport: GraphTransport, graph: FakeGraph, send_tokens: StandInTokens
) -> None:
    graph.fail_next(403, "ErrorAccessDenied", "Access is denied.")

    attempt = await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))

    assert attempt.reason == AUTH and not attempt.failed
    assert "Mail.Send" in attempt.reply and "ErrorAccessDenied" in attempt.reply
    assert send_tokens.rejected_marks and "Mail.Send" in send_tokens.rejected_marks[0]


async def test_send_as_denied_waits_like_smtp(transport: GraphTransport) -> None:
    content = make_message(sender="someone.else@example.net")

    attempt = await transport.deliver(submission(content, "user@example.com"))

    assert attempt.reason == SEND_AS_DENIED and "ErrorSendAsDenied" in attempt.reply


async def test_other_4xx_fail_the_message_with_graphs_code_and_text(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    graph.fail_next(400, "ErrorInvalidRecipients", "At least one recipient is not valid.")

    attempt = await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))

    ((recipient, reply),) = attempt.failed
    assert recipient == "u@x.org"
    assert reply.startswith("554 5.0.0 ")
    assert "400 ErrorInvalidRecipients: At least one recipient is not valid." in reply


async def test_429_pauses_the_whole_transport_for_retry_after(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    graph.throttle_for(3)

    attempt = await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))

    assert attempt.reason == THROTTLED and attempt.retry_after == 3
    blocked = transport.blocked()
    assert blocked is not None and blocked.reason == THROTTLED and 2 < blocked.seconds <= 3


def message_with_attachment(size: int) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    message = MIMEMultipart()
    message["From"] = MAILBOX
    message["To"] = "user@example.com"
    message["Subject"] = "report"
    message.attach(MIMEText("The report is attached.\n"))
    part = MIMEApplication(data, "octet-stream", Name="report.bin")
    part["Content-Disposition"] = 'attachment; filename="report.bin"'
    message.attach(part)
    return message.as_bytes().replace(b"\n", b"\r\n"), data


async def test_too_large_without_large_messages_is_held_with_the_fix(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    content, _ = message_with_attachment(6 * 1024 * 1024)

    attempt = await transport.deliver(submission(content, "user@example.com"))

    assert attempt.hold and attempt.reason == TOO_BIG and not attempt.failed
    assert "upstream.graph_large_messages" in attempt.reply
    assert "relayd queue release 0123456789ABCDEF012" in attempt.reply
    assert graph.messages == [] and sum(graph.requests.values()) == 0


async def test_graphs_own_413_is_taken_as_too_large(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    graph.fail_next(413, "ErrorMessageSizeExceeded", "too large")

    attempt = await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))

    assert attempt.hold and "ErrorMessageSizeExceeded" in attempt.reply


async def test_large_message_goes_by_draft_and_upload_session_intact(
    tmp_path: Path,
    graph: FakeGraph,
    ca_file: Path,
    send_tokens: StandInTokens,
    large_tokens: StandInTokens,
) -> None:
    transport = make_transport(
        tmp_path, graph, ca_file, send_tokens, large_tokens, graph_large_messages=True
    )
    content, data = message_with_attachment(6 * 1024 * 1024)
    try:
        attempt = await transport.deliver(submission(content, "user@example.com", "bcc@x.org"))
    finally:
        await transport.close()

    assert attempt.delivered == ("user@example.com", "bcc@x.org")
    (sent,) = graph.messages
    assert sent.via == "draft" and sent.bcc == ("bcc@x.org",)
    assert sent.attachments == (("report.bin", "application/octet-stream", data),)
    assert b"The report is attached." in sent.mime
    assert len(graph.upload_puts) == 2 and not any(auth for _, _, auth in graph.upload_puts)
    assert max(length for _, length, _ in graph.upload_puts) <= 4 * 1024 * 1024
    assert graph.requests["POST /me/messages/{id}/attachments/createUploadSession"] == 1
    assert graph.requests["POST /me/messages/{id}/send"] == 1


async def test_large_message_without_mail_readwrite_consent_is_held(
    tmp_path: Path, graph: FakeGraph, ca_file: Path, send_tokens: StandInTokens
) -> None:
    refused = StandInTokens(MAILBOX, scopes=(MAIL_READ_WRITE, MAIL_SEND))
    refused.make_unavailable()  # reauth_required: AADSTS65001 for Mail.ReadWrite
    transport = make_transport(
        tmp_path, graph, ca_file, send_tokens, refused, graph_large_messages=True
    )
    content, _ = message_with_attachment(6 * 1024 * 1024)
    try:
        attempt = await transport.deliver(submission(content, "user@example.com"))
    finally:
        await transport.close()
    assert attempt.hold and "refuses the token for drafts" in attempt.reply
    assert graph.messages == []


async def test_requests_queued_behind_a_429_are_not_sent_during_the_pause(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    assert (await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))).delivered
    graph.throttle_for(3)
    content = make_message(sender=MAILBOX)

    attempts = await asyncio.gather(
        *(transport.deliver(submission(content, "u@x.org")) for _ in range(12))
    )

    assert not any(attempt.delivered for attempt in attempts)
    # At most the four that had a slot reached Graph; the rest waited for a slot, saw
    # the pause and went back to the queue untried.
    assert graph.requests_while_throttled <= 4
    assert sum(not attempt.attempted for attempt in attempts) >= 8


async def test_only_what_graph_accepted_counts_against_the_sending_limits(
    transport: GraphTransport, graph: FakeGraph
) -> None:
    """Issue 12 item 9 for Graph: a 429 or a refusal was never a send Exchange counted,
    so the scheduler gives the budget back; an accepted send costs one message and
    its recipients."""
    graph.fail_next(400, "ErrorInvalidRecipients", "At least one recipient is not valid.")
    refused = await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))
    accepted = await transport.deliver(
        submission(make_message(sender=MAILBOX), "u@x.org", "v@x.org")
    )
    graph.throttle_for(1)
    throttled = await transport.deliver(submission(make_message(sender=MAILBOX), "u@x.org"))

    assert throttled.spent == NOTHING
    assert refused.spent == NOTHING
    assert accepted.delivered and accepted.spent == Usage(messages=1, recipients=2)

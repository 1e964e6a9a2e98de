"""Pipelined transactions (RFC 2920): SmtpTransport + Scheduler in this process,
delivering to tests/fakes/hostile.py with PIPELINING offered.

Where the server offers PIPELINING, relayd writes MAIL, the RCPTs and DATA at once
and reads the replies in order. Every way the group can go wrong must mean what it
means one command at a time: a refused sender, some or all recipients refused, a DATA
accepted although no recipient was (RFC 2920 §3.1's warning: the session is closed,
never ended with an empty message), replies that arrive a byte at a time or all in one
write. Garbage, a flood or a hang-up in the middle of the group: the garbage matrix in
test_faults_upstream.py, run with and without PIPELINING offered.
"""

from __future__ import annotations

import pytest

from tests.fakes.hostile import HostileUpstream
from tests.helpers import eventually

SENDER = "app@example.com"
RECIPIENTS = ("a@example.org", "b@example.org", "c@example.org")
REFUSED = "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"


@pytest.fixture
def pipelining(hostile: HostileUpstream) -> HostileUpstream:
    hostile.pipelining = True
    return hostile


async def test_the_commands_go_in_one_write(through_hostile, pipelining: HostileUpstream) -> None:
    # The server answers MAIL and RCPT only after it has read DATA: a client that sends
    # one command at a time waits for MAIL's reply until upstream.timeout and defers.
    pipelining.hold_replies = True
    h = await through_hostile(max_connections=1).start()
    queue_ids = [await h.queue(RECIPIENTS, sender="") for _ in range(3)]
    for queue_id in queue_ids:
        await eventually(lambda q=queue_id: h.settled(q), 5)
    assert [m.recipients for m in pipelining.messages] == [RECIPIENTS] * 3
    assert pipelining.connections == 1 and pipelining.resets == 0
    assert h.metric("relayd_messages_deferred_total", reason="timeout") == 0


@pytest.mark.parametrize("delivery", ["one byte per write", "all replies in one write"])
async def test_replies_however_they_are_cut_deliver_each_message_once(
    through_hostile, pipelining: HostileUpstream, delivery: str
) -> None:
    pipelining.dribble = delivery == "one byte per write"
    pipelining.hold_replies = delivery == "all replies in one write"
    h = await through_hostile(max_connections=1).start()
    queue_ids = [await h.queue(RECIPIENTS[: 1 + n % 3], sender="") for n in range(6)]
    for queue_id in queue_ids:
        await eventually(lambda q=queue_id: h.settled(q), 10)
    assert [len(m.recipients) for m in pipelining.messages] == [1, 2, 3, 1, 2, 3]
    assert pipelining.connections == 1 and pipelining.nested_mail == 0


async def test_some_recipients_refused_the_others_get_the_message(
    through_hostile, pipelining: HostileUpstream
) -> None:
    pipelining.refuse_rcpt["b@example.org"] = REFUSED
    h = await through_hostile(max_connections=1).start()
    queue_id = await h.queue(RECIPIENTS, sender="")
    await eventually(lambda: h.settled(queue_id, "failed"), 5)  # kept: one refused
    (message,) = pipelining.messages
    assert message.recipients == ("a@example.org", "c@example.org")
    assert h.metric("relayd_recipients_delivered_total") == 2
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 1


@pytest.mark.parametrize("data_reply", ["503", "354"])
async def test_every_recipient_refused_sends_no_message(
    through_hostile, pipelining: HostileUpstream, data_reply: str
) -> None:
    # RFC 2920 §3.1: with every RCPT refused, DATA may still be answered 354. The
    # session is then closed; a lone dot would have ended an (empty) message.
    for recipient in RECIPIENTS:
        pipelining.refuse_rcpt[recipient] = REFUSED
    pipelining.data_without_recipients = data_reply == "354"
    h = await through_hostile(max_connections=1).start()
    refused = await h.queue(RECIPIENTS, sender="")
    await eventually(lambda: h.settled(refused, "failed"), 5)
    assert pipelining.messages == [] and pipelining.data_commands == 1
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 1
    pipelining.behave()
    after = await h.queue(RECIPIENTS, sender="")
    await eventually(lambda: h.settled(after), 5)
    assert pipelining.messages[-1].recipients == RECIPIENTS
    assert pipelining.nested_mail == 0
    # 503 to DATA: the session was reset and reused; 354: closed, a new one carried on.
    assert pipelining.connections == (2 if data_reply == "354" else 1)


@pytest.mark.parametrize(
    "refusal", ["451 4.7.500 Server busy", "550 5.1.8 Access denied, bad outbound sender"]
)
async def test_a_refused_sender_refuses_the_group_and_the_session_is_reset(
    through_hostile, pipelining: HostileUpstream, refusal: str
) -> None:
    # MAIL refused: the RCPTs and DATA sent behind it get 503s, which mean nothing of
    # their own; the sender's reply is what the message meets (a busy server, or the
    # account restricted from sending: deferred and paused, never bounced).
    pipelining.refuse_mail = refusal
    h = await through_hostile(max_connections=1, throttle_pause="10s").start()
    queue_id = await h.queue(("a@example.org",), sender=SENDER)
    await eventually(lambda: h.settled(queue_id, "deferred") and pipelining.resets == 1, 5)
    assert pipelining.messages == [] and pipelining.data_commands == 1
    assert h.metric("relayd_dsn_sent_total") == 0
    assert h.metric("relayd_messages_failed_total", reason="rejected") == 0

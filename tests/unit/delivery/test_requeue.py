"""`relayd queue retry` of a failed message (Spool.retry): as Postfix's postsuper -r, its
life starts again (retry.max_age counts from the requeue), and a failure the sender
was told about once never gets a second DSN."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd.queue.model import Envelope, new_queue_id
from tests.harness import FAST_RETRY, Harness
from tests.helpers import eventually, load_settings, make_message
from tests.unit.delivery.test_scheduler import ScriptedTransport, delivered, rejected, temporary

SENDER = "app@example.com"


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    settings = load_settings(tmp_path, {"retry": FAST_RETRY})
    harness = Harness(settings, ScriptedTransport())
    await harness.scheduler.start()
    yield harness
    await harness.stop()


async def queue_old(h: Harness, age: float) -> str:
    """A message that arrived ``age`` seconds ago (its id and envelope say so)."""
    arrived = time.time() - age
    queue_id = new_queue_id(arrived)
    envelope = Envelope(SENDER, ("user@example.org",), received_at=arrived)
    await h.spool.commit(queue_id, envelope, make_message(sender=SENDER))
    h.scheduler.notify(queue_id)
    return queue_id


def dsns(h: Harness) -> int:
    return len([call for call in h.transport.calls if call.mail_from == ""])


async def requeue(h: Harness, queue_id: str) -> None:
    assert h.spool.retry(queue_id) == "failed"
    h.scheduler.wake()


async def test_a_recipient_refused_again_after_a_requeue_gets_no_second_dsn(h) -> None:
    h.transport.script = [rejected]
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id, "failed") and dsns(h) == 1 and h.drained())

    h.transport.script = [rejected]  # the operator retried; the recipient still does not exist
    await requeue(h, queue_id)
    await eventually(lambda: len(h.transport.calls) == 3 and h.settled(queue_id, "failed"))
    assert dsns(h) == 1
    assert h.metric("relayd_dsn_sent_total") == 1
    _, message = h.spool.find(queue_id)
    assert message.state.failed_recipients[0][0] == "user@example.org"  # still shown


async def test_a_requeued_message_gets_a_fresh_max_age(h) -> None:
    """Expired after an hour in the queue; requeued, a 4xx defers it again, and it is
    delivered later: it does not expire at once, and sends no second notice."""
    h.transport.script = [temporary]
    queue_id = await queue_old(h, age=2 * 3600)  # retry.max_age is 1h
    await eventually(lambda: h.settled(queue_id, "failed") and h.drained())
    assert h.metric("relayd_messages_failed_total", reason="expired") == 1
    assert dsns(h) == 1

    h.transport.script = [temporary, delivered]
    await requeue(h, queue_id)
    await eventually(lambda: h.settled(queue_id, None), timeout=10)
    calls_for_it = [call for call in h.transport.calls if call.queue_id == queue_id]
    assert len(calls_for_it) == 3  # expired once; deferred after the requeue; delivered
    assert h.metric("relayd_messages_failed_total", reason="expired") == 1
    assert dsns(h) == 1


async def test_a_failure_recorded_before_the_reported_field_counts_as_told(h) -> None:
    """Meta files written by an older relayd have no `reported`: their failed recipients
    were told about all the same."""
    h.transport.script = [rejected]
    queue_id = await h.queue()
    await eventually(lambda: h.settled(queue_id, "failed") and dsns(h) == 1 and h.drained())
    meta = h.spool.path("meta", f"{queue_id}.json")
    recorded = meta.read_text()
    assert '"reported": ["user@example.org"]' in recorded
    meta.write_text(recorded.replace('"reported": ["user@example.org"]', '"reported": []'))

    h.transport.script = [rejected]
    await requeue(h, queue_id)
    await eventually(lambda: len(h.transport.calls) == 3 and h.settled(queue_id, "failed"))
    assert dsns(h) == 1

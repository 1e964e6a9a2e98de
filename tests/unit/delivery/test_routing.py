"""Several mailboxes: each route's scheduler over one real spool, scripted transports.

A paused route holds back only its own mail; each route keeps its own order, limits
and metrics; messages found on disk (not told by the listener) reach their route too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relayd import config
from relayd.delivery.routing import RoutedScheduler
from relayd.ops.metrics import Metrics
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from relayd.transports.base import AUTH, Blocked
from tests.harness import FAST_RETRY
from tests.helpers import eventually, load_settings, make_message
from tests.unit.delivery.test_scheduler import ScriptedTransport

DEFAULT = "relay@contoso.example"
NOTIFY = "notify@contoso.example"
HR = "hr@contoso.example"
ROUTES = [
    {"mailbox": NOTIFY, "senders": ["app@contoso.example"]},
    {"mailbox": HR, "senders": ["*@hr.contoso.example"], "rate_limit_per_minute": 2},
]


class Routed:
    """A RoutedScheduler over a spool in tmp_path, one ScriptedTransport per mailbox."""

    def __init__(self, tmp_path: Path, routes: list[dict] | None = None) -> None:
        overrides = {"retry": FAST_RETRY, "upstream": {"mailbox": DEFAULT}}
        settings = load_settings(tmp_path, {**overrides, "routes": routes or ROUTES})
        self.spool = Spool(settings.spool.directory)
        self.spool.recover()
        self.metrics = Metrics(process=False, per_mailbox=True)
        self.transports: dict[str, ScriptedTransport] = {}
        lanes = {}
        for key, mailbox_settings in config.mailbox_settings(settings).items():
            limited = mailbox_settings.upstream.rate_limit_per_minute > 0
            self.transports[key] = ScriptedTransport(rate_limited=limited and key == HR)
            lanes[key] = (mailbox_settings, self.transports[key], self.metrics.for_mailbox(key))
        self.scheduler = RoutedScheduler(self.spool, lanes, settings)

    async def queue(self, sender: str, *, notify: bool = True) -> str:
        queue_id = new_queue_id()
        recipients = ("user@example.org",)
        envelope = Envelope(sender=sender, recipients=recipients, received_at=time.time())
        content = make_message(sender=sender or "app@example.com", recipients=recipients)
        await self.spool.commit(queue_id, envelope, content)
        if notify:
            self.scheduler.notify_from(queue_id, sender)
        return queue_id

    def sent_by(self, mailbox: str) -> list[str]:
        return [call.queue_id for call in self.transports[mailbox].calls]

    def delivered(self, mailbox: str) -> float:
        sample = "relayd_messages_delivered_total"
        return self.metrics.registry.get_sample_value(sample, {"mailbox": mailbox}) or 0.0


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[Routed]:
    made = Routed(tmp_path)
    yield made
    await made.scheduler.stop(1)


async def test_each_message_leaves_through_its_senders_route(routed: Routed) -> None:
    await routed.scheduler.start()
    notify = await routed.queue("App@Contoso.example")
    hr = await routed.queue("anna@hr.contoso.example")
    other = await routed.queue("someone@elsewhere.example")
    dsn = await routed.queue("")
    await eventually(lambda: routed.scheduler.idle and routed.spool.census().pending == 0)
    assert routed.sent_by(NOTIFY) == [notify]
    assert routed.sent_by(HR) == [hr]
    assert routed.sent_by(DEFAULT) == [other, dsn]
    assert [routed.delivered(m) for m in (NOTIFY, HR, DEFAULT)] == [1, 1, 2]


async def test_a_paused_route_holds_back_only_its_own_mail(routed: Routed) -> None:
    """Notify's token is revoked: its 40 messages wait; the others' never wait behind them."""
    revoked = routed.transports[NOTIFY]
    revoked.block = Blocked(AUTH, None, "no usable token: sign in again")
    await routed.scheduler.start()
    waiting = [await routed.queue("app@contoso.example") for _ in range(40)]
    others = [await routed.queue(f"u{n}@elsewhere.example") for n in range(10)]
    await eventually(lambda: len(routed.sent_by(DEFAULT)) == 10)
    assert routed.sent_by(DEFAULT) == others  # oldest first, within the route
    assert revoked.calls == []
    assert routed.scheduler.schedulers[NOTIFY].paused == AUTH
    assert routed.scheduler.schedulers[DEFAULT].paused is None
    assert {routed.spool.census().messages["incoming"]} == {40}
    paused = "relayd_deliveries_paused"
    registry = routed.metrics.registry
    routed.scheduler.schedulers[NOTIFY]._refresh_gauges()
    routed.scheduler.schedulers[DEFAULT]._refresh_gauges()
    assert registry.get_sample_value(paused, {"reason": AUTH, "mailbox": NOTIFY}) == 1
    assert registry.get_sample_value(paused, {"reason": AUTH, "mailbox": DEFAULT}) == 0
    # A new sign-in: the route's own mail flows, oldest first.
    revoked.block = None
    revoked.available.set()
    await eventually(lambda: len(revoked.calls) == 40)
    assert routed.sent_by(NOTIFY) == waiting


async def test_each_route_keeps_its_own_rate_limit(routed: Routed) -> None:
    """HR may send 2 a minute; the default (30 a minute, not enforced by this transport)
    and notify are not slowed down by HR's limit."""
    await routed.scheduler.start()
    hr = [await routed.queue(f"p{n}@hr.contoso.example") for n in range(5)]
    others = [await routed.queue("app@contoso.example") for _ in range(5)]
    await eventually(lambda: len(routed.sent_by(NOTIFY)) == 5)
    await asyncio.sleep(0.3)
    assert routed.sent_by(HR) == hr[:2]  # the rest waits for room in the minute
    assert routed.sent_by(NOTIFY) == others
    assert routed.scheduler.schedulers[HR].rate.remaining() < 1
    assert routed.scheduler.schedulers[NOTIFY].rate.remaining() >= 1
    tokens = routed.metrics.registry.get_sample_value
    routed.scheduler.schedulers[HR]._refresh_gauges()
    assert tokens("relayd_rate_limit_tokens", {"mailbox": HR}) < 1


async def test_messages_found_on_disk_reach_their_route(tmp_path: Path) -> None:
    """Queued before a restart (nobody told the scheduler): found by scans, routed by the
    envelope sender read from each file, oldest first within each route."""
    routes = [ROUTES[0], {**ROUTES[1], "rate_limit_per_minute": 0}]
    routed = Routed(tmp_path, routes)
    try:
        await _found_on_disk(routed)
    finally:
        await routed.scheduler.stop(1)


async def _found_on_disk(routed: Routed) -> None:
    senders = ["app@contoso.example", "x@hr.contoso.example", "y@elsewhere.example", ""]
    queued = [await routed.queue(senders[n % 4], notify=False) for n in range(12)]
    await routed.scheduler.start()
    await eventually(lambda: routed.spool.census().pending == 0 and routed.scheduler.idle, 10)
    assert routed.sent_by(NOTIFY) == queued[0::4]
    assert routed.sent_by(HR) == queued[1::4]
    assert sorted(routed.sent_by(DEFAULT)) == sorted(queued[2::4] + queued[3::4])


async def test_the_sender_policy_and_dsns_are_the_routes(routed: Routed) -> None:
    """The listener's From: check uses the message's route; a DSN that a route queues
    (null sender) is announced without its sender and still reaches the default."""
    from_hr = Envelope(sender="x@hr.contoso.example", recipients=("u@example.org",))
    assert routed.scheduler.policy_for(from_hr).mailbox == HR
    assert routed.scheduler.policy.mailbox == DEFAULT
    await routed.scheduler.start()
    dsn = await routed.queue("", notify=False)
    routed.scheduler.notify(dsn)  # as the recorder announces a DSN
    await eventually(lambda: routed.sent_by(DEFAULT) == [dsn])


def test_the_routes_first_scans_read_each_file_once() -> None:
    """After a start every route's scan meets the same unknown files at once: each
    file's first line is read once, not once per route."""
    import threading

    from relayd.delivery.routing import SenderIndex

    class SlowSpool:
        reads = 0

        def sender(self, state: str, queue_id: str) -> str:
            SlowSpool.reads += 1
            time.sleep(0.001)  # a read that lets the other scans run meanwhile
            return f"{queue_id}@contoso.example"

    index = SenderIndex(SlowSpool())  # type: ignore[arg-type]
    ids = [f"{n:019X}" for n in range(100)]
    scans = [
        threading.Thread(target=lambda: [index.sender(q, "incoming") for q in ids])
        for _ in range(3)
    ]
    for scan in scans:
        scan.start()
    for scan in scans:
        scan.join(30)
    assert SlowSpool.reads == len(ids)
    assert index.sender(ids[0], "incoming") == f"{ids[0]}@contoso.example"

"""SIGKILL `relayd serve` three times in a row while clients send and the queue is being
delivered to the fake Exchange Online: every message that got a 250 arrives at least
once, and a message arrives twice only if it was being delivered (in active/) when a
kill came. (test_durability.py kills once during accept and inspects the spool;
test_serve_maildir.py kills once during delivery to a Maildir.)"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from tests.fakes.exchange import FakeExchange
from tests.helpers import RelayProcess, eventually, message_number, numbered_message
from tests.serving import Served, waiting_and_failed

TOTAL, CLIENTS = 400, 10
LOAD_KILLS = (100, 250)  # acknowledged messages when the kills under load come
SENDER, RECIPIENT = "app@example.com", "user@example.org"


@dataclass
class Load:
    """Numbered messages handed out to clients; what got a 250 and what was cut off."""

    acknowledged: set[int] = field(default_factory=set)
    cut: list[int] = field(default_factory=list)  # the transaction broke: no 250
    next_number: int = 0

    def take(self) -> int | None:
        if self.next_number >= TOTAL:
            return None
        self.next_number += 1
        return self.next_number - 1


@dataclass
class Kill:
    acknowledged: int  # 250s the clients had seen when it came
    in_flight: frozenset[int]  # messages in active/ (claimed for delivery) at that moment
    cut_before: int  # transactions cut short before it
    cut: int = 0  # transactions it cut short (known once relayd is back)


async def client(port: int, load: Load, deadline: float) -> None:
    """Sends until the numbers run out; reconnects while the daemon restarts."""
    while load.next_number < TOTAL:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, OSError):
            assert time.monotonic() < deadline, "relayd did not come back"
            await asyncio.sleep(0.05)
            continue
        try:
            while (number := load.take()) is not None:
                try:
                    await smtp.sendmail(SENDER, [RECIPIENT], numbered_message(number, 1024))
                except (aiosmtplib.SMTPException, OSError):
                    load.cut.append(number)  # not retried: it may or may not be stored
                    break
                load.acknowledged.add(number)
        finally:
            smtp.close()


async def kill(relay: RelayProcess, load: Load) -> Kill:
    """SIGKILL while at least one message is being delivered; what was in flight."""
    active = Path(relay.config["spool"]["directory"]) / "active"
    await eventually(lambda: any(active.iterdir()), 30, "a delivery in flight", interval=0.005)
    relay.signal(signal.SIGKILL)
    acknowledged, cut_before = len(load.acknowledged), len(load.cut)  # before any await
    await asyncio.to_thread(relay.process.wait, 10)
    in_flight = frozenset(message_number(path.read_bytes()) for path in active.iterdir())
    return Kill(acknowledged, in_flight, cut_before)


async def restart(serve: Served, relay: RelayProcess, load: Load, killed: Kill) -> RelayProcess:
    """The same configuration and spool again; the clients have seen the kill by then."""
    relay = await asyncio.to_thread(serve.restart, relay.config_path)
    killed.cut = len(load.cut) - killed.cut_before
    return relay


async def test_three_sigkills_under_load_lose_nothing_acknowledged(
    serve: Served, upstream: FakeExchange
) -> None:
    upstream.reply_delay = 0.002  # delivery slower than accepting: a backlog builds
    relay = serve()
    load = Load()
    deadline = time.monotonic() + 120
    clients = [asyncio.create_task(client(relay.port, load, deadline)) for _ in range(CLIENTS)]
    kills: list[Kill] = []
    for threshold in LOAD_KILLS:
        await eventually(lambda t=threshold: len(load.acknowledged) >= t, 60, interval=0.005)
        kills.append(await kill(relay, load))
        relay = await restart(serve, relay, load, kills[-1])
    await asyncio.gather(*clients)
    kills.append(await kill(relay, load))  # the load is over: the backlog is being delivered
    relay = await restart(serve, relay, load, kills[-1])

    def arrivals() -> collections.Counter[int]:
        return collections.Counter(message_number(m.content) for m in upstream.messages)

    await eventually(
        lambda: load.acknowledged <= arrivals().keys() and waiting_and_failed(relay)[0] == 0,
        120,
        "every acknowledged message delivered and the queue empty",
        interval=0.1,
    )
    arrived = arrivals()
    missing = load.acknowledged - arrived.keys()
    duplicates = {number: count - 1 for number, count in arrived.items() if count > 1}
    in_flight = [k.in_flight for k in kills]
    print(
        f"\n{len(load.acknowledged)} acknowledged, {len(arrived)} delivered"
        f" ({len(arrived.keys() - load.acknowledged)} of them without a 250),"
        f" {sum(duplicates.values())} duplicates;"
        f" acknowledged at the kills {[k.acknowledged for k in kills]},"
        f" in flight at the kills {[len(f) for f in in_flight]},"
        f" transactions cut by the kills {[k.cut for k in kills]}"
    )
    assert not missing, f"acknowledged but never delivered: {sorted(missing)}"
    assert all(k.cut for k in kills[: len(LOAD_KILLS)]), "the load kills came during accept"
    assert all(in_flight), "every kill came during a delivery"
    assert set(duplicates) <= frozenset().union(*in_flight)
    assert sum(duplicates.values()) <= sum(len(f) for f in in_flight)
    assert not list((Path(relay.config["spool"]["directory"]) / "failed").iterdir())
    assert relay.stop() == 0

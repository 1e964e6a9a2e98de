"""Fault injection at every file-system call of the spool, the Maildir transport and the
token store (tests/faults.py: SQLite's I/O-error and crash tests, ALICE).

Each scenario is a piece of relayd's work done by relayd's own code (Spool, Claims,
OutcomeRecorder, MaildirTransport, TokenStore, TokenClient). It runs once to record
its file-system calls; then, for every call in turn, once per failure that call can
have (the daemon goes on, as it would: the same objects finish the work) and once
crashing right after it (every object is thrown away; for each state the crash may
leave on disk, a new Spool recovers and delivers, as a restart would). After each run
the invariants are checked:

* every message that got 250 is delivered, to every recipient, at least once (or, for
  a recipient refused for good, its DSN is);
* no recipient already done is sent the message again, unless the crash hit the very
  attempt that did it; a DSN goes out at most once, twice if the crash hit its attempt;
* nothing is half-written when delivered (content and size exactly as accepted), and
  nothing that got 451 is delivered;
* nothing is stuck: active/ and tmp/ are empty after recovery and a delivery pass (and,
  after a failure, without a restart); nothing that got 250 lands in corrupt/;
* no rotated refresh token is lost: the cache file is the old one or the new one,
  whole, and the new one once the write returned; after a failed write, the new one
  is kept in memory and written once the disk is fine.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relayd.config import RetrySettings, Settings
from relayd.delivery import dsn
from relayd.delivery.claims import Claims
from relayd.delivery.recorder import OutcomeRecorder
from relayd.ops.metrics import Metrics
from relayd.queue.model import Envelope, SpoolError
from relayd.queue.spool import Spool
from relayd.transports.base import LOCAL, Attempt, Submission
from relayd.transports.maildir import MaildirTransport
from tests.faults import Crash, Fault, Injector, Tally, points
from tests.helpers import load_settings, make_message

RETRY = RetrySettings(min_delay=0.001, max_delay=0.002, max_age=10**10)  # never expires
SENDER = "app@example.com"
MAILBOX = "relay@example.com"
T0 = 1_700_000_000


def queue_id(number: int) -> str:
    """Fixed ids: the same names, so the same directory order, in every run."""
    return f"{T0 * 1_000_000 + number:013X}{number:06X}"


@dataclass
class Delivery:
    queue_id: str
    recipient: str
    content: bytes
    sender: str
    after_fault: bool


@dataclass
class World:
    """What the test knows, as a client and an upstream would see it."""

    contents: dict[str, bytes] = field(default_factory=dict)  # every message written
    accepted: dict[str, tuple[str, ...]] = field(default_factory=dict)  # got 250
    refused: set[str] = field(default_factory=set)  # got 451 (commit raised)
    done: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    failed: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sink: list[Delivery] = field(default_factory=list)
    planted_corrupt: set[str] = field(default_factory=set)
    after_fault: bool = False
    tokens_acked: str | None = None  # the refresh token a returned write holds
    tokens_allowed: set[str] = field(default_factory=set)


class AsQueued:
    """A sender policy that changes nothing: what is delivered is what was queued."""

    def prepare(self, envelope: Envelope, content: bytes) -> tuple[str, bytes]:
        return envelope.sender, content

    def upstream_recipients(self, recipients: tuple[str, ...]) -> tuple[str, ...]:
        return recipients


class Relay:
    """The objects one relayd process holds; a crash throws them away."""

    def __init__(self, settings: Settings, world: World) -> None:
        self.spool = Spool(settings.spool.directory)
        self.recorder = OutcomeRecorder(
            self.spool,
            Metrics(CollectorRegistry(), process=False),
            lambda _: None,
            dsn.Reporter(hostname="relay.test", from_address=MAILBOX),
        )
        self.claims = Claims(self.spool, AsQueued)
        self.maildir = MaildirTransport(settings)
        self.world = world
        self.rng = random.Random(1)

    async def commit(self, number: int, recipients: tuple[str, ...], sender: str = SENDER) -> None:
        """As the listener: 250 when commit() returns, 451 when it raises."""
        qid = queue_id(number)
        content = make_message(f"message {number}", body_size=300, recipients=recipients)
        self.world.contents[qid] = content
        envelope = Envelope(sender, recipients, "127.0.0.1", "app.test", float(T0))
        try:
            await self.spool.commit(qid, envelope, content)
        except (SpoolError, OSError):
            self.world.refused.add(qid)
            return
        self.world.accepted[qid] = recipients

    async def attempt(
        self,
        number: int,
        *,
        defer: tuple[str, ...] = (),
        fail: tuple[str, ...] = (),
        release: bool = False,
        maildir: bool = False,
    ) -> None:
        """As the scheduler: claim, deliver (to the sink or the Maildir), record."""
        qid = queue_id(number)
        await self.claims.claim([qid])
        _, claimed = self.claims.pop() or (qid, None)
        if not isinstance(claimed, tuple):
            return  # not claimed, or the error was logged and the message put back
        message, submission, original = claimed
        if release:
            outcome = Attempt.not_attempted(submission.recipients, LOCAL, "paused")
        elif maildir:
            outcome = await self.maildir.deliver(submission)
        else:
            outcome = self._send(message.queue_id, submission, defer, fail)
        decision = await self.recorder.record(message, outcome, original, RETRY, self.rng)
        if decision is not None:
            self.world.done[qid] |= set(outcome.delivered)
            self.world.failed[qid] |= {recipient for recipient, _ in outcome.failed}

    def _send(self, qid: str, submission: Submission, defer: tuple, fail: tuple) -> Attempt:
        delivered = tuple(r for r in submission.recipients if r not in defer + fail)
        for recipient in delivered:
            self.world.sink.append(
                Delivery(
                    qid, recipient, submission.content, submission.mail_from, self.world.after_fault
                )
            )
        return Attempt(
            delivered=delivered,
            deferred=tuple(r for r in submission.recipients if r in defer),
            failed=tuple((r, "550 5.1.1 no such user") for r in submission.recipients if r in fail),
            reason=LOCAL,
            reply="451 4.3.0 try later" if defer else "250 2.0.0 Ok",
        )

    async def drain(self, maildir: bool = False) -> None:
        """Deliver everything due, however long it was meant to wait (bounded)."""
        for _ in range(20):
            due = self.spool.due(math.inf, 1000)
            if not due:
                return
            for qid in due:
                await self.attempt_due(qid, maildir)
        raise AssertionError("the queue did not drain")

    async def attempt_due(self, qid: str, maildir: bool) -> None:
        await self.claims.claim([qid])
        _, claimed = self.claims.pop() or (qid, None)
        if not isinstance(claimed, tuple):
            return
        message, submission, original = claimed
        if maildir:
            outcome = await self.maildir.deliver(submission)
        else:
            outcome = self._send(qid, submission, (), ())
        await self.recorder.record(message, outcome, original, RETRY, self.rng)


# --- scenarios --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: Callable[[Relay], Awaitable[None]]
    operation: Callable[[Relay], Awaitable[None]]
    restart_after_failure: bool = False  # the daemon stops when this operation fails
    maildir: bool = False


async def nothing(relay: Relay) -> None:
    return None


async def one_message(relay: Relay) -> None:
    await relay.commit(1, ("a@example.org",))


async def tried_once(relay: Relay) -> None:
    """Message 1 to a, b, c: a delivered in a first attempt, b and c deferred."""
    await relay.commit(1, ("a@example.org", "b@example.org", "c@example.org"))
    await relay.attempt(1, defer=("b@example.org", "c@example.org"))


async def two_commits(relay: Relay) -> None:
    await relay.commit(2, ("m@example.org", "n@example.org"))
    await relay.commit(3, ("o@example.org",))


async def first_attempt_delivered(relay: Relay) -> None:
    await relay.attempt(1)
    await relay.commit(2, ("p@example.org",))  # later work: the delivery must be durable


async def second_attempt_delivered(relay: Relay) -> None:
    await relay.attempt(1)
    await relay.commit(2, ("p@example.org",))


async def deferred_again(relay: Relay) -> None:
    await relay.attempt(1, defer=("c@example.org",))
    await relay.commit(2, ("p@example.org",))


async def failed_for_good(relay: Relay) -> None:
    await relay.attempt(1, fail=("b@example.org",), defer=())
    await relay.commit(2, ("p@example.org",))


async def released(relay: Relay) -> None:
    await relay.attempt(1, release=True)
    await relay.commit(2, ("p@example.org",))


async def released_at_shutdown(relay: Relay) -> None:
    await relay.claims.claim([queue_id(1)])
    _, claimed = relay.claims.pop() or ("", None)
    if isinstance(claimed, tuple):
        relay.spool.release_claim(claimed[0])  # what stop() does with an unfinished attempt


async def crashed_mid_delivery(relay: Relay) -> None:
    """What a crash leaves for recovery: two messages in active/ (one tried before),
    a half-written file and a delivery state in tmp/, an orphan state, a stray."""
    await tried_once(relay)
    await relay.commit(2, ("p@example.org",))
    for number in (1, 2):
        await relay.claims.claim([queue_id(number)])
    spool = relay.spool
    spool.path("tmp", queue_id(9)).write_bytes(b'{"v":1,"id":"half')
    spool.path("tmp", f"{queue_id(1)}.meta").write_bytes(b'{"attempts":')
    spool.path("meta", f"{queue_id(8)}.json").write_text(json.dumps({"attempts": 1}))
    spool.path("incoming", "stray.txt").write_bytes(b"not a queue file")
    relay.world.planted_corrupt.add("stray.txt")


async def recover(relay: Relay) -> None:
    relay.spool.recover()


async def two_into_the_maildir(relay: Relay) -> None:
    await relay.attempt(1, maildir=True)
    await relay.attempt(2, maildir=True)


async def two_messages(relay: Relay) -> None:
    await relay.commit(1, ("a@example.org",))
    await relay.commit(2, ("p@example.org",))


SPOOL_SCENARIOS = [
    Scenario("commit", one_message, two_commits),
    Scenario("claim + delivered", one_message, first_attempt_delivered),
    Scenario("claim + delivered after an earlier attempt", tried_once, second_attempt_delivered),
    Scenario("defer", tried_once, deferred_again),
    Scenario("fail (+ DSN)", tried_once, failed_for_good),
    Scenario("release", one_message, released),
    Scenario("release at shutdown", one_message, released_at_shutdown, True),
    Scenario("recover", crashed_mid_delivery, recover, True),
    Scenario("maildir store", two_messages, two_into_the_maildir, maildir=True),
]


# --- invariants ---------------------------------------------------------------------------


def maildir_deliveries(settings: Settings) -> list[Delivery]:
    """What the Maildir holds, file by file in new/: Return-Path:, Envelope-To: (one
    recipient a line), then the content exactly as it was queued."""
    new = settings.upstream.maildir / "new"
    found = []
    for name in sorted(os.listdir(new)) if new.is_dir() else []:
        data = (new / name).read_bytes()
        qid = name.split("_", 1)[1].split(".", 1)[0]
        return_path, _, rest = data.partition(b"\r\n")
        sender = return_path.removeprefix(b"Return-Path: <").removesuffix(b">").decode()
        recipients, rest = [], rest.removeprefix(b"Envelope-To: ")
        while True:
            line, _, rest = rest.partition(b"\r\n")
            recipients.append(line.rstrip(b",").strip(b"<>").decode())
            if not rest.startswith(b"\t"):
                break
            rest = rest[1:]
        found += [Delivery(qid, r, rest, sender, False) for r in recipients]
    return found


def violations(settings: Settings, world: World, maildir: bool, crashed: bool) -> list[str]:
    spool = settings.spool.directory
    found: list[str] = []
    deliveries = maildir_deliveries(settings) if maildir else world.sink
    dsns = [d for d in deliveries if d.sender == ""]
    for qid, recipients in world.accepted.items():
        for recipient in recipients:
            got = [d for d in deliveries if (d.queue_id, d.recipient) == (qid, recipient)]
            told = [d for d in dsns if about(d, qid, recipient)]
            if not got and not told:
                found.append(f"{qid} to {recipient}: got 250, never delivered")
            if recipient in world.done[qid] and any(d.after_fault for d in got):
                found.append(f"{qid} to {recipient}: done before the fault, sent again")
            if len(told) > (2 if crashed else 1):
                found.append(f"{qid} to {recipient}: {len(told)} DSNs")
            if recipient in world.failed[qid] and not told:
                found.append(f"{qid} to {recipient}: failed for good, no DSN")
    for delivery in deliveries:
        if delivery.sender == "" and not maildir:
            continue
        expected = world.contents.get(delivery.queue_id)
        if expected is not None and delivery.content != expected:
            found.append(f"{delivery.queue_id}: delivered damaged ({len(delivery.content)} bytes)")
        if delivery.queue_id in world.refused:
            found.append(f"{delivery.queue_id}: got 451, delivered anyway")
    for state in ("active", "tmp"):
        if os.listdir(spool / state):
            found.append(f"stuck in {state}/: {sorted(os.listdir(spool / state))}")
    corrupt = set(os.listdir(spool / "corrupt")) - world.planted_corrupt
    if corrupt:
        found.append(f"set aside as corrupt: {sorted(corrupt)}")
    return found


def about(delivery: Delivery, qid: str, recipient: str) -> bool:
    text = delivery.content.decode(errors="replace")
    return f"X-Relayd-Queue-ID: {qid}" in text and recipient in text


# --- the matrix ---------------------------------------------------------------------------


class Matrix:
    """One scenario: record its calls, then every fault at every call."""

    def __init__(self, base: Path, injector_factory: Callable[[list[Path]], Injector]) -> None:
        self.settings = load_settings(base)
        self.roots = [self.settings.spool.directory, self.settings.upstream.maildir]
        self.injector = injector_factory(self.roots)

    def fresh(self, scenario: Scenario) -> World:
        for root in self.roots:
            shutil.rmtree(root, ignore_errors=True)
        world = World()
        relay = Relay(self.settings, world)
        relay.spool.recover()
        asyncio.run(scenario.setup(relay))
        return world

    def record(self, scenario: Scenario) -> list:
        world = self.fresh(scenario)
        relay = Relay(self.settings, world)
        self.injector.run(lambda: asyncio.run(scenario.operation(relay)))
        assert not violations_after_drain(self, relay, scenario, False), "the clean run breaks"
        return list(self.injector.calls)

    def run(self, scenario: Scenario, tally: Tally) -> None:
        calls = self.record(scenario)
        assert calls, f"{scenario.name}: no file-system calls recorded"
        tally.points += len(calls)
        reached: set[int] = set()
        for fault in points(calls):
            tally.runs += 1
            world = self.fresh(scenario)
            relay = Relay(self.settings, world)
            crashed = self._inject(relay, scenario, fault)
            fired = self.injector.fired
            where = f"{scenario.name}: {fault.kind} at {fired or fault.index}"
            if fired is None or fired.name != calls[fault.index].name:
                tally.found.append(f"{where}: call not reached as recorded ({calls[fault.index]})")
                continue
            reached.add(fault.index)
            world.after_fault = True
            if not crashed:
                tally.found += [f"{where}: {v}" for v in self._go_on(relay, scenario)]
                continue
            for label, image in self.injector.crash_states():
                tally.crash_states += 1
                self.injector.restore(image)
                copy_world = copy.deepcopy(world)
                restarted = Relay(self.settings, copy_world)
                found = self._restart(restarted, scenario)
                tally.found += [f"{where} ({label}): {v}" for v in found]
        assert reached == set(range(len(calls))), f"{scenario.name}: calls not injected"
        tally.ran += len(reached)

    def _inject(self, relay: Relay, scenario: Scenario, fault: Fault) -> bool:
        try:
            self.injector.run(lambda: asyncio.run(scenario.operation(relay)), fault)
        except Crash:
            return True
        except OSError:
            if not scenario.restart_after_failure:
                raise
        return False

    def _go_on(self, relay: Relay, scenario: Scenario) -> list[str]:
        if scenario.restart_after_failure:
            return self._restart(Relay(self.settings, relay.world), scenario, crashed=False)
        return violations_after_drain(self, relay, scenario, False)

    def _restart(self, relay: Relay, scenario: Scenario, crashed: bool = True) -> list[str]:
        relay.spool.recover()
        return violations_after_drain(self, relay, scenario, crashed)


def violations_after_drain(
    matrix: Matrix, relay: Relay, scenario: Scenario, crashed: bool
) -> list[str]:
    asyncio.run(relay.drain(scenario.maildir))
    return violations(matrix.settings, relay.world, scenario.maildir, crashed)


def test_every_file_system_call_of_the_spool_and_the_maildir_fails_and_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    tally = Tally()
    per_scenario = []
    for number, scenario in enumerate(SPOOL_SCENARIOS):
        before = (tally.points, tally.runs)
        matrix = Matrix(tmp_path / f"s{number}", lambda roots: Injector(roots).install(monkeypatch))
        matrix.run(scenario, tally)
        monkeypatch.undo()
        per_scenario.append((scenario.name, tally.points - before[0], tally.runs - before[1]))
    for name, calls, runs in per_scenario:
        print(f"  {name}: {calls} calls, {runs} runs")
    print(
        f"fault injection (spool, maildir): {tally.points} injection points enumerated, "
        f"{tally.ran} run, {tally.runs} runs ({tally.crash_states} crash states recovered), "
        f"{len(tally.found)} invariant violations, {time.monotonic() - started:.1f}s"
    )
    assert tally.points > 0 and tally.ran == tally.points and tally.runs >= tally.points * 2
    assert tally.found == [], "\n".join(tally.found[:40])

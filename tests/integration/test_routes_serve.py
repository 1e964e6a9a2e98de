"""Several mailboxes through a running `relayd serve` (issue 14): two routes plus the
default, each mailbox signed in on its own (`relayd auth login --mailbox`) at the fake
Entra ID, delivering to one fake Exchange that knows all three accounts, records
which one delivered each message, counts connections per mailbox and checks Send As.
"""

from __future__ import annotations

import asyncio
import collections
import email
import json
from collections.abc import AsyncIterator
from email import policy as email_policy
from pathlib import Path
from typing import Any

import pytest
import trustme

from relayd import config
from relayd.queue.model import STATES
from tests.auth_helpers import AuthCli, auth_overrides, sign_in
from tests.fakes.entra import MAILBOX, FakeEntra, sign_in_in_browser
from tests.fakes.exchange import FakeExchange, ReceivedMessage
from tests.fakes.graph import FakeGraph
from tests.fakes.mailboxes import REFUSE
from tests.harness import FAST_RETRY
from tests.helpers import (
    RelayProcess,
    eventually,
    message_number,
    numbered_message,
    run_relayd,
    scrape,
    send_messages,
    write_config,
)

NOTIFY = "notify@contoso.example"  # route 0: its own address and *@alerts.contoso.example
APPROVALS = "approvals@contoso.example"  # route 1: a list of senders and a shared mailbox
HR = "hr@contoso.example"  # shared mailbox: approvals@ has Send As on it at Exchange
FINANCE = "finance@contoso.example"  # in route 1's send_as, but Exchange never granted it
TAG = "r"

# sender → (the mailbox it must leave through, whether its From: is kept)
SENDERS = {
    NOTIFY: (NOTIFY, True),
    "disk-full@alerts.contoso.example": (NOTIFY, False),  # *@domain
    APPROVALS: (APPROVALS, True),
    "Workflow@Apps.Contoso.Example": (APPROVALS, False),  # exact, other case
    HR: (APPROVALS, True),  # send_as: a sender of the route and its From: kept
    "app@example.com": (MAILBOX, False),  # no route: the default mailbox
    MAILBOX: (MAILBOX, True),
}


def routes(**per_route: dict[str, Any]) -> list[dict[str, Any]]:
    """The two routes; ``notify={...}`` / ``approvals={...}`` add keys to one."""
    return [
        {
            "mailbox": NOTIFY,
            "senders": ["*@alerts.contoso.example"],
            "max_connections": 3,
            **per_route.get("notify", {}),
        },
        {
            "mailbox": APPROVALS,
            "senders": ["workflow@apps.contoso.example"],
            "send_as": [HR, FINANCE],
            "token_cache": "{tmp}/tokens/approvals.json",
            **per_route.get("approvals", {}),
        },
    ]


class Routed:
    """A relayd with routes in front of the fakes: config, sign-ins, the process."""

    def __init__(self, tmp_path: Path, entra: FakeEntra, exchange: FakeExchange, ca_file: Path):
        self.tmp_path, self.entra, self.exchange, self.ca_file = tmp_path, entra, exchange, ca_file
        self.relay: RelayProcess | None = None
        self.config_path = tmp_path / "relayd.yaml"

    def start(self, upstream: dict | None = None, **per_route: dict[str, Any]) -> RelayProcess:
        settings = {"rate_limit_per_minute": 0, "throttle_pause": "0.5s", **(upstream or {})}
        items = routes(**per_route)
        for item in items:
            if "token_cache" in item:
                item["token_cache"] = item["token_cache"].format(tmp=self.tmp_path)
        document = {
            "upstream": self.exchange.relay_config(self.ca_file, **settings)["upstream"],
            "oauth": auth_overrides(self.tmp_path, self.entra, self.ca_file)["oauth"],
            "retry": FAST_RETRY,
            "routes": items,
        }
        self.config_path = write_config(self.tmp_path, document)
        assert sign_in(config.load(self.config_path), self.ca_file).ok  # the default mailbox
        for mailbox in (NOTIFY, APPROVALS):
            login(self.config_path, self.ca_file, mailbox)
        self.relay = RelayProcess(self.config_path).start()
        return self.relay

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.kill()


def login(config_path: Path, ca_file: Path, mailbox: str) -> None:
    """`relayd auth login --mailbox MAILBOX`, signed in "on a laptop", address pasted."""
    cli = AuthCli(config_path, "login", "--mailbox", mailbox)
    try:
        auth_url = cli.wait_for_line("https://127.0.0.1:")
        cli.wait_for_line("and press Enter")
        cli.send(sign_in_in_browser(auth_url, ca_file) + "\n")
        code = cli.finish()
    finally:
        cli.kill()
    assert code == 0, cli.everything()
    assert f"Signed in as {mailbox}" in cli.output(), cli.output()


@pytest.fixture
async def exchange(ca: trustme.CA, entra: FakeEntra) -> AsyncIterator[FakeExchange]:
    """Three accounts; approvals@ has Send As on hr@. The fake lets up to 10 connections
    per mailbox in, so that it observes how many relayd opens instead of refusing them."""
    entra.add_user(NOTIFY, APPROVALS)
    fake = FakeExchange(
        ca,
        validator=entra.is_valid_access_token,
        mailbox=MAILBOX,
        mailboxes=(NOTIFY, APPROVALS),
        max_connections=10,
    )
    fake.grant_send_as(APPROVALS, HR)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def graph(ca: trustme.CA, entra: FakeEntra) -> AsyncIterator[FakeGraph]:
    """The fake Graph knowing approvals@ (Send As on hr@) besides the default mailbox."""
    fake = FakeGraph(ca, grant=entra.token_grant, mailbox=MAILBOX, mailboxes=(APPROVALS,))
    fake.grant_send_as(APPROVALS, HR)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def routed(
    tmp_path: Path, entra: FakeEntra, exchange: FakeExchange, ca_file: Path
) -> AsyncIterator[Routed]:
    relay = Routed(tmp_path, entra, exchange, ca_file)
    yield relay
    relay.stop()


def batch(count: int, senders: list[str], start: int = 0) -> list[tuple[str, list[str], bytes]]:
    """``count`` numbered messages, the senders taking turns."""
    messages = []
    for number in range(start, start + count):
        sender = senders[number % len(senders)]
        content = numbered_message(number, 1024, TAG, sender=sender, recipients=("u@example.org",))
        messages.append((sender, ["u@example.org"], content))
    return messages


def through(exchange: FakeExchange, mailbox: str) -> list[ReceivedMessage]:
    return exchange.sent_through(mailbox)


def spooled(spool: Path) -> dict[str, set[int]]:
    """The numbers of the messages in each queue state (files read as they are)."""
    found: dict[str, set[int]] = {}
    for state in STATES:
        directory = spool / state
        numbers = set()
        for path in directory.iterdir() if directory.is_dir() else ():
            try:
                number = message_number(path.read_bytes(), TAG)
            except FileNotFoundError:  # moved on while we looked
                continue
            if number is not None:
                numbers.add(number)
        found[state] = numbers
    return found


def from_address(content: bytes) -> str:
    message = email.message_from_bytes(content, policy=email_policy.default)
    return message["From"].addresses[0].addr_spec


def metric(relay: RelayProcess, name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    values = [
        value
        for (sample, sample_labels), value in scrape(relay.metrics_port).samples.items()
        if sample == name and wanted <= sample_labels
    ]
    return values[0] if len(values) == 1 else None


# --- the tests -------------------------------------------------------------------------


async def test_a_thousand_messages_leave_through_their_routes_mailboxes(
    routed: Routed, exchange: FakeExchange, tmp_path: Path
) -> None:
    relay = routed.start()
    senders = list(SENDERS)
    sent = batch(1000, senders)
    await send_messages(relay.port, sent, connections=8)
    await eventually(lambda: len(exchange.messages) >= 1000, 60, "1000 delivered", 0.1)
    await asyncio.sleep(0.5)  # nothing more (no duplicates, no DSN) arrives

    numbers = collections.Counter(message_number(m.content, TAG) for m in exchange.messages)
    assert sorted(numbers) == list(range(1000)) and set(numbers.values()) == {1}
    wrong = []
    for arrived in exchange.messages:
        sender = senders[message_number(arrived.content, TAG) % len(senders)]
        mailbox, kept = SENDERS[sender]
        expected_from = sender if kept else mailbox
        if (
            arrived.mailbox != mailbox
            or from_address(arrived.content).lower() != expected_from.lower()
        ):
            wrong.append((sender, arrived.mailbox, from_address(arrived.content)))
    assert wrong == [], wrong[:5]
    expected = collections.Counter(SENDERS[sender][0] for sender, _, _ in sent)
    per_mailbox = collections.Counter(m.mailbox for m in exchange.messages)
    assert per_mailbox == expected, per_mailbox
    peaks = {m: exchange.peak_connections_of(m) for m in (NOTIFY, APPROVALS, MAILBOX)}
    assert all(1 <= peak <= 3 for peak in peaks.values()), peaks
    assert spooled(tmp_path / "spool")["failed"] == set()


async def test_each_mailbox_rate_limit_holds_on_its_own(
    routed: Routed, exchange: FakeExchange, tmp_path: Path
) -> None:
    # Exchange refuses what goes over each mailbox's rate: relayd must never get there.
    exchange.mailboxes.rate_limit(NOTIFY, 4, per=60, mode=REFUSE)
    exchange.mailboxes.rate_limit(APPROVALS, 7, per=60, mode=REFUSE)
    relay = routed.start(
        notify={"rate_limit_per_minute": 4}, approvals={"rate_limit_per_minute": 7}
    )
    await send_messages(relay.port, batch(30, [NOTIFY, APPROVALS, MAILBOX]), connections=3)
    counts = lambda: [len(through(exchange, m)) for m in (NOTIFY, APPROVALS, MAILBOX)]  # noqa: E731
    await eventually(lambda: counts() == [4, 7, 10], 20, "4, 7 and all 10 delivered")
    await asyncio.sleep(1.5)  # the next minute is far: nothing more leaves the two routes
    assert counts() == [4, 7, 10]
    assert exchange.mailboxes.rate_refused == collections.Counter()
    waiting = spooled(tmp_path / "spool")
    assert len(waiting["incoming"] | waiting["deferred"] | waiting["active"]) == 6 + 3
    assert waiting["failed"] == set()


async def test_a_revoked_mailbox_pauses_only_its_route_until_auth_login(
    routed: Routed, exchange: FakeExchange, entra: FakeEntra, tmp_path: Path
) -> None:
    relay = routed.start()
    pid = relay.process.pid
    mailboxes = (NOTIFY, APPROVALS, MAILBOX)
    await send_messages(relay.port, batch(15, list(mailboxes)))
    await eventually(lambda: len(exchange.messages) == 15, 20, "15 delivered while signed in")

    # An administrator's "Revoke sessions": the refresh and access tokens are refused,
    # and the open SMTP sessions end (relayd keeps signed-in connections in its pool).
    entra.revoke_sessions(APPROVALS, code=50173)
    exchange.disconnect(APPROVALS)
    await send_messages(relay.port, batch(30, list(mailboxes), start=15))
    counts = lambda: [len(through(exchange, m)) for m in mailboxes]  # noqa: E731
    await eventually(lambda: counts()[0] == 15 and counts()[2] == 15, 20, "the others flow")
    await asyncio.sleep(1.5)
    assert counts() == [15, 5, 15]  # approvals@ holds its 10 new messages
    waiting = spooled(tmp_path / "spool")
    held = waiting["incoming"] | waiting["deferred"] | waiting["active"]
    assert held == {n for n in range(15, 45) if n % 3 == 1}
    assert waiting["failed"] == set() and waiting["hold"] == set()  # nothing bounced
    healthy = {m: metric(relay, "relayd_auth_healthy", mailbox=m) for m in mailboxes}
    paused = metric(relay, "relayd_deliveries_paused", mailbox=APPROVALS, reason="auth")
    listed = run_relayd(
        "queue", "list", "--json", "--mailbox", APPROVALS, "-c", str(routed.config_path)
    )

    login(routed.config_path, routed.ca_file, APPROVALS)  # a person signs in again
    await eventually(lambda: counts() == [15, 15, 15], 30, "approvals@ drained after login")
    assert relay.process.poll() is None and relay.process.pid == pid  # no restart
    assert spooled(tmp_path / "spool")["failed"] == set()

    # What the operator saw while it was paused (checked last: the drain above matters more).
    assert healthy == {NOTIFY: 1.0, APPROVALS: 0.0, MAILBOX: 1.0}, healthy
    assert paused == 1.0
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 10 and {row.get("mailbox") for row in rows} == {APPROVALS}, rows[:2]


async def test_shared_mailbox_send_as_granted_is_kept_and_refused_is_held(
    routed: Routed, exchange: FakeExchange, tmp_path: Path
) -> None:
    relay = routed.start()
    granted = batch(1, [HR])
    refused = batch(1, [FINANCE], start=1)
    await send_messages(relay.port, granted + refused)
    await eventually(lambda: len(exchange.messages) == 1, 20, "hr@'s message delivered")
    (arrived,) = exchange.messages
    assert (arrived.mailbox, arrived.mail_from, from_address(arrived.content)) == (
        APPROVALS,
        HR,
        HR,
    )

    # finance@ is in the route's send_as but Exchange answers 554 5.2.252: kept, no bounce.
    await eventually(lambda: exchange.mailboxes.send_as_refused[APPROVALS] >= 1, 20, "refused")
    await asyncio.sleep(1)
    waiting = spooled(tmp_path / "spool")
    assert waiting["failed"] == set()
    assert 1 in waiting["incoming"] | waiting["deferred"] | waiting["active"] | waiting["hold"]
    assert len(exchange.messages) == 1  # and no DSN to finance@
    await send_messages(relay.port, batch(1, [MAILBOX], start=2))  # the others still flow
    await eventually(lambda: len(through(exchange, MAILBOX)) == 1, 20, "the default flows")

    # Add-RecipientPermission; then the operator makes it due now (held: released).
    exchange.grant_send_as(APPROVALS, FINANCE)
    command = "release" if 1 in spooled(tmp_path / "spool")["hold"] else "retry"
    again = run_relayd("queue", command, "--all", "-c", str(routed.config_path))
    assert again.returncode == 0, again.stdout + again.stderr
    await eventually(lambda: len(exchange.messages) == 3, 30, "finance@'s message delivered")
    last = exchange.messages[-1]
    assert (last.mailbox, last.mail_from, from_address(last.content)) == (
        APPROVALS,
        FINANCE,
        FINANCE,
    )


async def test_a_route_chooses_its_transport(
    routed: Routed, exchange: FakeExchange, graph: FakeGraph
) -> None:
    relay = routed.start({"graph_url": graph.graph_url}, approvals={"transport": "graph"})
    await send_messages(relay.port, batch(12, [NOTIFY, APPROVALS, HR, MAILBOX]))
    await eventually(
        lambda: len(exchange.messages) == 6 and len(graph.messages) == 6, 20, "6 and 6"
    )
    assert {m.mailbox for m in graph.messages} == {APPROVALS}  # Graph: approvals@ alone
    assert sorted(from_address(m.mime) for m in graph.messages) == [APPROVALS] * 3 + [HR] * 3
    assert collections.Counter(m.mailbox for m in exchange.messages) == {NOTIFY: 3, MAILBOX: 3}

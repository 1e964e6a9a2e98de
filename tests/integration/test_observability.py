"""Metrics, health and logs of a running `relayd serve`, seen from outside.

The main relay here forwards over SMTP to a port where nothing listens, with no OAuth
token: nothing can be delivered, so the queue figures stay what the test put in,
whatever the delivery engine does with them (it must defer: auth problems never
bounce mail). The delivery log lines, the auth gauges around a revocation and the
queue gauges back at zero after delivery come from relays in front of the fake
Microsoft 365 (the ``serve`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayd.ops.auth_states import AUTH_STATES
from relayd.queue.model import PENDING_STATES, new_queue_id
from tests.auth_helpers import login_by_pasting
from tests.fakes import exchange as fake_exchange
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.helpers import (
    RelayProcess,
    Scrape,
    deep_merge,
    eventually,
    http_get,
    make_message,
    scrape,
    send_message,
    unreachable_upstream,
    write_config,
)
from tests.serving import Served, until_delivered, waiting_and_failed

MAX_MESSAGE_SIZE = 64 * 1024


def undeliverable_config(tmp_path: Path) -> Path:
    """Upstream: SMTP to a closed loopback port, OAuth authority likewise, no token."""
    overrides = deep_merge(
        unreachable_upstream(tmp_path), {"listen": {"max_message_size": MAX_MESSAGE_SIZE}}
    )
    return write_config(tmp_path, overrides)


class Sent:
    """What the module's relay was sent, to compare with what it reports."""

    def __init__(self) -> None:
        self.queue_ids: list[str] = []
        self.message_ids: list[str] = []
        self.started = time.time()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    tmp_path = tmp_path_factory.mktemp("observed")
    with RelayProcess(undeliverable_config(tmp_path)) as process:
        yield process


@pytest.fixture(scope="module")
def sent(relay: RelayProcess) -> Sent:
    """Three messages of different sizes accepted, one refused as too big."""
    sent = Sent()
    for number, size in enumerate((200, 5_000, 40_000)):
        message_id = f"<obs-{number}@app.example.com>"
        content = make_message(body_size=size, message_id=message_id)
        sent.queue_ids.append(send_message(relay.port, content))
        sent.message_ids.append(message_id)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_message(relay.port, make_message(body_size=2 * MAX_MESSAGE_SIZE))
    assert refused.value.smtp_code == 552
    return sent


def received_records(relay: RelayProcess, sent: Sent) -> list[dict[str, Any]]:
    return [relay.wait_for_log("received", queue_id=queue_id) for queue_id in sent.queue_ids]


def queue_files(relay: RelayProcess) -> list[Path]:
    spool = Path(relay.config["spool"]["directory"])
    return [path for state in PENDING_STATES for path in (spool / state).iterdir()]


# --- /metrics ----------------------------------------------------------------------------


def test_scrape_counts_what_was_received_and_refused(relay: RelayProcess, sent: Sent) -> None:
    sizes = [record["size"] for record in received_records(relay, sent)]

    metrics = scrape(relay.metrics_port)

    assert metrics.value("relayd_messages_received_total") == 3
    assert metrics.value("relayd_messages_rejected_total", reason="too_big") == 1
    assert metrics.value("relayd_accept_duration_seconds_count") == 3
    assert metrics.value("relayd_accept_duration_seconds_sum") > 0
    assert metrics.value("relayd_message_size_bytes_count") == 3
    assert metrics.value("relayd_message_size_bytes_sum") == sum(sizes)
    # Each size fell in its own power-of-four bucket: 1 KiB, 16 KiB and 64 KiB.
    assert metrics.value("relayd_message_size_bytes_bucket", le="1024.0") == 1
    assert metrics.value("relayd_message_size_bytes_bucket", le="16384.0") == 2
    assert metrics.value("relayd_message_size_bytes_bucket", le="65536.0") == 3


def test_scrape_shows_the_queue_as_it_is_on_disk(relay: RelayProcess, sent: Sent) -> None:
    received_records(relay, sent)
    files = queue_files(relay)

    metrics = scrape(relay.metrics_port)
    scraped_at = time.time()

    pending = sum(metrics.value("relayd_queue_messages", state=s) for s in PENDING_STATES)
    assert pending == len(files) == 3
    assert metrics.value("relayd_queue_messages", state="failed") == 0
    assert metrics.value("relayd_queue_bytes") == sum(path.stat().st_size for path in files)
    oldest_age = metrics.value("relayd_queue_oldest_message_age_seconds")
    assert 0 < oldest_age <= scraped_at - sent.started


def test_scrape_has_build_and_process_metrics(relay: RelayProcess) -> None:
    metrics = scrape(relay.metrics_port)

    assert any(name == "relayd_build_info" for name, _ in metrics.samples)
    assert metrics.value("process_resident_memory_bytes") > 0


def test_openmetrics_and_head(relay: RelayProcess) -> None:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    status, headers, body = http_get(relay.metrics_port, "/metrics", headers=accept)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")

    status, headers, body = http_get(relay.metrics_port, "/metrics", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0


# --- /healthz, /readyz, refusals -----------------------------------------------------------


def test_healthz_and_readyz_when_running(relay: RelayProcess, sent: Sent) -> None:
    assert http_get(relay.metrics_port, "/healthz")[:1] == (200,)

    status, headers, body = http_get(relay.metrics_port, "/readyz")

    assert status == 200
    assert headers["content-type"] == "application/json"
    report = json.loads(body)
    assert report["ready"] is True
    assert report["phase"] == "ready"
    assert report["queue"]["depth"] == 3
    assert report["queue"]["oldest_age_seconds"] > 0
    assert {"auth", "circuit"} <= set(report)


def test_unknown_paths_and_bad_requests_are_refused(relay: RelayProcess) -> None:
    assert http_get(relay.metrics_port, "/")[0] == 404
    assert http_get(relay.metrics_port, "/metrics/../etc/passwd")[0] == 404
    assert http_get(relay.metrics_port, "/readyz", method="POST")[0] == 405

    with socket.create_connection(("127.0.0.1", relay.metrics_port), timeout=10) as sock:
        sock.sendall(b"BREW /pot HTCPCP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(4096), b""))
    assert answer.startswith(b"HTTP/1.1 400 ")


# --- lifecycle log lines -------------------------------------------------------------------

# Each lifecycle event and the fields its line carries besides queue_id. "received"
# comes from the module's relay; "deferred", "delivered" and "failed" from the scenario
# in test_delivery_events_have_log_lines_with_their_fields.
LIFECYCLE_FIELDS = {
    "received": {"client", "sender", "recipients", "size", "message_id"},
    "deferred": {"reason", "next_attempt", "recipients", "error", "attempts", "delay"},
    "delivered": {"reply", "recipients", "attempts", "delay"},
    "failed": {"reason", "recipients", "error", "attempts", "delay"},
}
DELIVERY_EVENTS = ("deferred", "delivered", "failed")


@pytest.mark.parametrize("event", sorted(set(LIFECYCLE_FIELDS) - set(DELIVERY_EVENTS)))
def test_each_lifecycle_event_has_a_log_line_with_the_queue_id(
    relay: RelayProcess, sent: Sent, event: str
) -> None:
    for queue_id, message_id in zip(sent.queue_ids, sent.message_ids, strict=True):
        record = relay.wait_for_log(event, queue_id=queue_id)

        assert LIFECYCLE_FIELDS[event] <= set(record), record
        assert record["logger"].startswith("relayd.")
        if event == "received":
            assert record["message_id"] == message_id
            assert record["client"] == "127.0.0.1"
            assert record["recipients"] == 1


def test_one_queue_id_greps_one_message_story(relay: RelayProcess, sent: Sent) -> None:
    received_records(relay, sent)
    for queue_id in sent.queue_ids:
        story = [r for r in relay.log_records() if r.get("queue_id") == queue_id]

        assert [r["event"] for r in story][:1] == ["received"]
        assert len({r["queue_id"] for r in story}) == 1


async def test_delivery_events_have_log_lines_with_their_fields(
    serve: Served, upstream: FakeExchange
) -> None:
    upstream.fail("data", fake_exchange.TRY_LATER, times=1)  # the first message, once
    upstream.refuse_recipient("gone@example.org", "550 5.1.1 Recipient address rejected")
    relay = serve()
    retried = send_message(relay.port, make_message("retried"))
    await asyncio.to_thread(relay.wait_for_log, "delivered", 20, queue_id=retried)
    refused = send_message(relay.port, make_message("refused"), recipients=("gone@example.org",))
    await asyncio.to_thread(relay.wait_for_log, "failed", 20, queue_id=refused)

    stories = {
        queue_id: [
            r
            for r in relay.log_records()
            if r.get("queue_id") == queue_id and r["event"] in LIFECYCLE_FIELDS
        ]
        for queue_id in (retried, refused)
    }
    assert [r["event"] for r in stories[retried]] == ["received", "deferred", "delivered"]
    assert [r["event"] for r in stories[refused]] == ["received", "failed"]  # + "dsn queued"
    deferred, delivered = stories[retried][1:]
    failed = stories[refused][1]
    for event, record in (("deferred", deferred), ("delivered", delivered), ("failed", failed)):
        assert LIFECYCLE_FIELDS[event] <= set(record), record
        assert record["logger"] == "relayd.scheduler"
    assert (deferred["reason"], deferred["attempts"]) == ("temporary", 1)
    assert deferred["error"] == fake_exchange.TRY_LATER
    assert delivered["attempts"] == 2 and delivered["reply"].startswith("250 2.0.0 OK <")
    assert (failed["reason"], failed["recipients"]) == ("rejected", 1)
    assert "550 5.1.1" in failed["error"]


def auth_gauges(metrics: Scrape) -> dict[str, float]:
    states = {s: metrics.value("relayd_auth_state", state=s) for s in AUTH_STATES}
    return {"healthy": metrics.value("relayd_auth_healthy"), **states}


async def test_revocation_shows_in_the_auth_gauges_and_a_new_login_drains_the_queue(
    serve: Served, upstream: FakeExchange, entra: FakeEntra, ca_file: Path
) -> None:
    relay = serve({"oauth": {"keepalive_interval": "1s"}})  # notices a revocation soon
    send_message(relay.port)
    await until_delivered(relay, upstream, 1)

    entra.revoke_refresh_tokens()
    await eventually(
        lambda: auth_gauges(scrape(relay.metrics_port))["reauth_required"] == 1, 20, interval=0.1
    )
    revoked = auth_gauges(scrape(relay.metrics_port))
    for number in range(5):
        send_message(relay.port, make_message(f"while revoked {number}"))
    await eventually(lambda: waiting_and_failed(relay) == (5, 0), 10, interval=0.1)
    assert len(upstream.messages) == 1  # held for a sign-in, not bounced
    await eventually(
        lambda: scrape(relay.metrics_port).value("relayd_deliveries_paused", reason="auth") == 1,
        10,
        interval=0.1,
    )

    login = await asyncio.to_thread(login_by_pasting, relay.config_path, ca_file)
    assert login.process.returncode == 0, login.everything()
    await until_delivered(relay, upstream, 6)  # no restart: the daemon saw the new cache
    metrics = scrape(relay.metrics_port)

    assert revoked["healthy"] == 0
    assert [s for s in AUTH_STATES if revoked[s] == 1] == ["reauth_required"]
    signed_in = auth_gauges(metrics)
    assert signed_in["healthy"] == 1 and signed_in["reauth_required"] == 0
    assert signed_in["ok"] + signed_in["refreshing"] == 1
    for state in PENDING_STATES:
        assert metrics.value("relayd_queue_messages", state=state) == 0
    assert metrics.value("relayd_queue_bytes") == 0
    assert metrics.value("relayd_queue_oldest_message_age_seconds") == 0
    assert metrics.value("relayd_messages_delivered_total") == 6
    assert metrics.value("relayd_recipients_delivered_total") == 6
    assert metrics.value("relayd_deliveries_paused", reason="auth") == 0
    # Each counter once per message: received (+ DSNs) = delivered + failed + queued.
    assert metrics.value("relayd_messages_received_total") + metrics.value(
        "relayd_dsn_sent_total"
    ) == metrics.value("relayd_messages_delivered_total") + sum(
        metrics.value("relayd_messages_failed_total", reason=r) for r in ("rejected", "expired")
    )
    assert metrics.value("relayd_queue_messages", state="failed") == 0
    assert relay.process.poll() is None


# --- readiness during recovery -------------------------------------------------------------

RECOVERING_MESSAGES = 4000  # requeueing this many from active/ takes most of a second


def fill_active(spool: Path, count: int) -> None:
    """Messages left in active/ by a crash mid-delivery: recovery requeues each one.

    Recovery renames and counts files without reading them, so one file linked under
    many queue ids is enough, and on a busy disk far quicker to make than many files.
    """
    active = spool / "active"
    active.mkdir(parents=True)
    original = spool / "original"
    original.write_bytes(make_message())
    start = time.time() - 60
    for number in range(count):
        os.link(original, active / new_queue_id(start + number / 1000))
    original.unlink()


def poll_readyz(relay: RelayProcess, timeout: float = 60.0) -> tuple[list[tuple[int, dict]], int]:
    """Every /readyz answer from the first one the endpoint gives until the first 200,
    and what /healthz said right after the first answer."""
    answers: list[tuple[int, dict]] = []
    healthz = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, body = http_get(relay.metrics_port, "/readyz", timeout=5)
        except OSError:  # not listening yet
            assert relay.process.poll() is None, relay.output()
            time.sleep(0.005)
            continue
        answers.append((status, json.loads(body)))
        if len(answers) == 1:
            healthz = http_get(relay.metrics_port, "/healthz", timeout=5)[0]
        if status == 200:
            return answers, healthz
        time.sleep(0.01)
    raise TimeoutError(f"not ready after {timeout}s; answers: {answers[-3:]}")


def test_readyz_says_recovering_until_the_spool_is_recovered(tmp_path: Path) -> None:
    config_path = undeliverable_config(tmp_path)
    spool = Path(yaml.safe_load(config_path.read_text())["spool"]["directory"])
    fill_active(spool, RECOVERING_MESSAGES)
    relay = RelayProcess(config_path).start(wait=False)
    try:
        answers, healthz = poll_readyz(relay)
        first_status, first_report = answers[0]

        assert first_status == 503
        assert first_report["phase"] == "recovering"
        assert first_report["queue"] is None  # no half-counted queue
        assert healthz == 200  # alive while not ready: no restart loop during recovery
        assert all(status == 503 for status, _ in answers[:-1])
        final_status, final_report = answers[-1]
        assert final_status == 200
        assert final_report["queue"]["depth"] == RECOVERING_MESSAGES
        recovered = relay.wait_for_log("spool recovered")
        assert recovered["requeued"] == RECOVERING_MESSAGES
    finally:
        relay.kill()


# --- configuration -------------------------------------------------------------------------


def test_metrics_disabled_means_no_endpoint(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, {"metrics": {"enabled": False}})
    with RelayProcess(config_path) as relay:
        send_message(relay.port)
        relay.wait_for_log("received")

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.metrics_port), timeout=5)
        assert relay.stop() == 0


def debug_lines(relay: RelayProcess, logger: str) -> list[dict[str, Any]]:
    return [r for r in relay.log_records() if r["level"] == "debug" and r["logger"] == logger]


def reload_with_level(relay: RelayProcess, level: str) -> None:
    relay.config["logging"]["level"] = level
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    reloads = len([r for r in relay.log_records() if r["event"] == "configuration reloaded"])
    relay.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = [r for r in relay.log_records() if r["event"] == "configuration reloaded"]
        if len(done) > reloads:
            assert done[-1]["log_level"] == level
            return
        time.sleep(0.02)
    raise TimeoutError(f"no reload after SIGHUP:\n{relay.output()}")


def test_sighup_changes_the_log_level_without_a_restart(tmp_path: Path) -> None:
    with RelayProcess(write_config(tmp_path)) as relay:
        pid = relay.process.pid
        http_get(relay.metrics_port, "/healthz")
        send_message(relay.port)
        assert debug_lines(relay, "relayd.health") == []
        assert debug_lines(relay, "mail.log") == []

        reload_with_level(relay, "debug")
        http_get(relay.metrics_port, "/healthz")
        queue_id = send_message(relay.port)
        relay.wait_for_log("received", queue_id=queue_id)

        (request,) = debug_lines(relay, "relayd.health")
        assert (request["path"], request["status"]) == ("/healthz", 200)
        assert any("ehlo" in r["event"].lower() for r in debug_lines(relay, "mail.log"))

        reload_with_level(relay, "info")
        before = len(relay.log_records())
        http_get(relay.metrics_port, "/healthz")
        relay.wait_for_log("received", queue_id=send_message(relay.port))
        assert [r for r in relay.log_records()[before:] if r["level"] == "debug"] == []
        assert relay.process.pid == pid and relay.process.poll() is None

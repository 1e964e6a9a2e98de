"""`relayd serve --sandbox` as a subprocess in a fresh working directory: no config file,
no Microsoft account; mail lands in the Maildir; the queue commands, send-test and
/metrics work against it."""

from __future__ import annotations

import json
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd import config
from tests.helpers import (
    RelayProcess,
    free_port,
    make_message,
    run_relayd,
    scrape,
    send_message,
    without_trace_fields,
)

SENDER, RECIPIENTS = "app@example.com", ("one@example.org", "two@example.org")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[RelayProcess]:
    ports = {"RELAYD_LISTEN_PORT": str(free_port()), "RELAYD_METRICS_PORT": str(free_port())}
    with RelayProcess(None, args=("--sandbox",), env=ports, cwd=tmp_path) as relay:
        yield relay


def sandbox_command(tmp_path: Path, relay: RelayProcess, *args: str):
    """A relayd command with --sandbox, run elsewhere: $RELAYD_SANDBOX_DIR finds the box."""
    env = {"RELAYD_SANDBOX_DIR": str(tmp_path / "relayd-sandbox"), **relay.env}
    return run_relayd(*args, "--sandbox", env=env)


def stored(maildir: Path, queue_id: str, timeout: float = 10.0) -> bytes:
    """The Maildir file of one queued message, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((maildir / "new").glob(f"*_{queue_id}.*"))
        if found:
            return found[0].read_bytes()
        time.sleep(0.05)
    raise AssertionError(f"{queue_id} not in {maildir}/new after {timeout}s")


def test_mail_flows_into_the_maildir_byte_for_byte(sandbox: RelayProcess, tmp_path: Path) -> None:
    box = tmp_path / "relayd-sandbox"
    first_line = sandbox.log_records()[0]
    assert first_line["config"] == f"sandbox ({box})"  # the first line says where
    assert first_line["maildir"] == str(box / "maildir")

    original = make_message("sandbox", sender=SENDER, recipients=RECIPIENTS)
    queue_id = send_message(sandbox.port, original, SENDER, RECIPIENTS)
    content = stored(box / "maildir", queue_id)
    envelope = (
        f"Return-Path: <{SENDER}>\r\nEnvelope-To: <{RECIPIENTS[0]}>,\r\n\t<{RECIPIENTS[1]}>\r\n"
    )
    assert content.startswith(envelope.encode())
    assert without_trace_fields(content[len(envelope) :]) == original

    listing = sandbox_command(tmp_path, sandbox, "queue", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == []  # delivered: nothing left in the queue
    metrics = scrape(sandbox.metrics_port)
    assert metrics.value("relayd_messages_delivered_total") == 1
    # No sign-in exists to be unhealthy: the auth alert must not fire on a sandbox.
    assert metrics.value("relayd_auth_healthy") == 1
    assert metrics.value("relayd_auth_state", state="not_used") == 1
    assert metrics.value("relayd_auth_state", state="no_token") == 0
    assert sandbox.stop() == 0


def test_queue_send_test_and_metrics_show_a_message_that_cannot_be_stored(
    sandbox: RelayProcess, tmp_path: Path
) -> None:
    maildir = tmp_path / "relayd-sandbox" / "maildir"
    queue_id = send_message(sandbox.port, make_message("first"))
    stored(maildir, queue_id)
    (maildir / "tmp").rmdir()
    (maildir / "tmp").write_text("in the way\n")  # even root cannot create files under it

    deferred_id = send_message(sandbox.port, make_message("second"))
    sandbox.wait_for_log("deferred", queue_id=deferred_id)
    listing = sandbox_command(tmp_path, sandbox, "queue", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    (item,) = json.loads(listing.stdout)
    assert (item["id"], item["state"], item["attempts"]) == (deferred_id, "deferred", 1)
    assert item["last_error"].startswith("451 4.3.0 cannot write to")
    metrics = scrape(sandbox.metrics_port)
    assert metrics.value("relayd_messages_deferred_total", reason="local") == 1

    sent = sandbox_command(tmp_path, sandbox, "send-test", "--to", "someone@example.org")
    assert sent.returncode == 1, sent.stdout
    assert "was deferred; relayd retries it (deferred/, 1 attempts)" in sent.stdout
    assert "FAILED: 451 4.3.0 cannot write to" in sent.stdout

    (maildir / "tmp").unlink()
    (maildir / "tmp").mkdir()
    sent = sandbox_command(tmp_path, sandbox, "send-test", "--to", "someone@example.org")
    assert sent.returncode == 0, sent.stdout
    assert f"was delivered into the Maildir: {maildir}/new/" in sent.stdout


def test_check_config_shows_the_sandbox_settings(tmp_path: Path) -> None:
    checked = run_relayd("check-config", "--sandbox", env={"RELAYD_SANDBOX_DIR": str(tmp_path)})
    assert checked.returncode == 0, checked.stderr
    assert f"directory: {tmp_path}/spool" in checked.stdout
    assert "transport: maildir" in checked.stdout


def greeting(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as connection:
        return connection.makefile("rb").readline()


def test_the_default_address_answers_on_both_loopbacks(sandbox: RelayProcess) -> None:
    """An application told "localhost" may resolve it to ::1 (the EAP on a host whose
    /etc/hosts lists ::1 first): the default listen.address answers there too."""
    assert greeting("127.0.0.1", sandbox.port).startswith(b"220 ")
    if config.listen_hosts(config.LOOPBACK) == ["127.0.0.1"]:
        pytest.skip("this host has no IPv6 loopback")  # then nothing to answer there
    assert greeting("::1", sandbox.port).startswith(b"220 ")
    with smtplib.SMTP("localhost", sandbox.port, timeout=10) as client:
        assert client.noop()[0] == 250

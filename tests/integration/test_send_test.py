"""`relayd send-test` as a subprocess against the fake Exchange Online and the fake Entra ID:
through a running relay and --direct, success and every failure it has a hint for."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from relayd import config
from tests.auth_helpers import auth_overrides, sign_in
from tests.fakes import exchange as fake_exchange
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.harness import FAST_RETRY
from tests.helpers import REPO, running_relay, unreachable_upstream, write_config

RECIPIENT = "someone@example.org"
SEND_AS = "billing@contoso.example"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def send_test(config_path: Path, *args: str) -> Result:
    """`python -m relayd send-test -c CONFIG --to RECIPIENT ARGS`, without blocking the
    event loop the fake Exchange runs on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        "send-test",
        "-c",
        str(config_path),
        "--to",
        RECIPIENT,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
def configure(
    tmp_path: Path, entra: FakeEntra, upstream: FakeExchange, ca_file: Path
) -> Callable[..., Path]:
    """A config for the fake Microsoft 365; signed in unless told otherwise."""

    def make(*, signed_in: bool = True, trust_upstream: bool = True, **upstream_settings) -> Path:
        section = upstream.relay_config(ca_file, **upstream_settings)["upstream"]
        if not trust_upstream:
            del section["ca_file"]  # the system's CAs only: the fake's certificate fails
        overrides = {
            "upstream": section,
            "oauth": auth_overrides(tmp_path, entra, ca_file)["oauth"],
            "retry": FAST_RETRY,
        }
        path = write_config(tmp_path, overrides)
        if signed_in:
            assert sign_in(config.load(path), ca_file).ok
        return path

    return make


def assert_no_secret(result: Result, entra: FakeEntra) -> None:
    printed = result.stdout + result.stderr
    assert not [secret for secret in entra.issued_secrets() if secret in printed]


# --- --direct ---------------------------------------------------------------------------


async def test_direct_success_prints_every_step(
    configure, upstream: FakeExchange, entra: FakeEntra
) -> None:
    result = await send_test(configure(), "--direct")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("  - ")]
    for step in ("connect", "EHLO", "STARTTLS", "TLS", "token", "AUTH", "MAIL", "RCPT", "DATA"):
        assert step in steps, result.stdout
    assert "certificate subject O=trustme" in result.stdout  # the fake's trustme certificate
    assert f"AUTH      XOAUTH2 as {MAILBOX}: 235 2.7.0" in result.stdout
    assert "OK: 127.0.0.1 accepted the message: 250 2.0.0 OK" in result.stdout
    (message,) = upstream.received_by(RECIPIENT)
    assert message.mail_from == MAILBOX
    assert b"Subject: relayd test message from " in message.content
    assert_no_secret(result, entra)


async def test_direct_token_refused_twice_hints_at_signing_in(
    configure, upstream: FakeExchange, entra: FakeEntra
) -> None:
    path = configure()
    upstream.fail("auth", fake_exchange.BAD_TOKEN)
    result = await send_test(path, "--direct")
    assert result.returncode == 1
    assert "asking Entra ID for a fresh one" in result.stdout  # the daemon's refresh-once
    assert f"FAILED: {fake_exchange.BAD_TOKEN}" in result.stdout
    hint = "Hint: Exchange Online refused the access token. Sign in again: relayd auth login"
    assert f"{hint} -c {path}" in result.stdout
    assert "SMTP.Send" in result.stdout
    assert_no_secret(result, entra)


async def test_direct_smtp_auth_disabled_hints_at_set_casmailbox(
    configure, upstream: FakeExchange
) -> None:
    upstream.fail("auth", fake_exchange.AUTH_DISABLED)
    result = await send_test(configure(), "--direct")
    assert result.returncode == 1
    assert f"FAILED: {fake_exchange.AUTH_DISABLED}\n" in result.stdout  # the upstream's words
    assert result.stderr == ""  # the steps said it all; no log line repeats it
    assert (
        f"Set-CASMailbox -Identity {MAILBOX} -SmtpClientAuthenticationDisabled $false"
        in result.stdout
    )
    assert "Security defaults" in result.stdout


async def test_direct_send_as_denied_hints_at_send_as(configure, upstream: FakeExchange) -> None:
    # relayd may send as SEND_AS (upstream.send_as), but Exchange never granted the right.
    result = await send_test(configure(send_as=[SEND_AS]), "--direct", "--from", SEND_AS)
    assert result.returncode == 1
    assert "x DATA" in result.stdout and "554 5.2.252 SendAsDenied" in result.stdout
    assert f"{MAILBOX} may not send as {SEND_AS}" in result.stdout
    assert upstream.messages == []


async def test_direct_untrusted_certificate_hints_at_ca_file(configure) -> None:
    result = await send_test(configure(trust_upstream=False), "--direct")
    assert result.returncode == 1
    assert "x STARTTLS" in result.stdout and "CERTIFICATE_VERIFY_FAILED" in result.stdout
    assert "TLS-inspecting proxy" in result.stdout and "upstream.ca_file" in result.stdout


async def test_direct_upstream_down_hints_at_the_firewall(
    configure, upstream: FakeExchange
) -> None:
    path = configure()
    await upstream.go_down()
    result = await send_test(path, "--direct")
    assert result.returncode == 1
    assert "x connect" in result.stdout
    assert f"Nothing accepted a connection at 127.0.0.1:{upstream.port}" in result.stdout
    assert "TCP port 587" in result.stdout


async def test_direct_without_a_sign_in_hints_at_auth_login(configure, upstream) -> None:
    path = configure(signed_in=False)
    result = await send_test(path, "--direct")
    assert result.returncode == 1
    assert "FAILED: no access token (no_token)" in result.stdout
    assert f"run relayd auth login -c {path}" in result.stdout
    assert upstream.stats.connections_total == 0


# --- through the relay --------------------------------------------------------------------


async def test_through_the_relay_waits_for_the_delivery(
    configure, upstream: FakeExchange, entra: FakeEntra
) -> None:
    path = configure()
    with running_relay(path) as relay:
        result = await send_test(path)
    assert result.returncode == 0, result.stdout + relay.output()
    assert "DATA      " in result.stdout and "queued as" in result.stdout
    assert "was delivered: 127.0.0.1 accepted it" in result.stdout
    assert len(upstream.received_by(RECIPIENT)) == 1
    assert_no_secret(result, entra)


async def test_through_the_relay_a_deferral_is_shown_with_its_hint(
    configure, upstream: FakeExchange
) -> None:
    upstream.fail("auth", fake_exchange.AUTH_DISABLED)
    path = configure()
    with running_relay(path):
        result = await send_test(path)
    assert result.returncode == 1
    # The first attempt, or a retry after the short auth pause (FAST_RETRY).
    assert re.search(
        r"x queue +\w+ was deferred; relayd retries it \(deferred/, \d attempts\)", result.stdout
    ), result.stdout
    assert "FAILED: 535 5.7.139" in result.stdout
    assert "Set-CASMailbox" in result.stdout


async def test_through_the_relay_without_a_sign_in_stops_waiting_at_once(tmp_path: Path) -> None:
    path = write_config(tmp_path, unreachable_upstream(tmp_path))
    with running_relay(path):
        result = await send_test(path, "--wait", "30s")
    assert result.returncode == 1
    assert "x auth" in result.stdout and "no_token" in result.stdout
    assert "stays queued until relayd has a token" in result.stdout
    assert f"Sign in: relayd auth login -c {path}" in result.stdout


async def test_through_the_relay_when_nothing_listens(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = await send_test(path)
    assert result.returncode == 1
    assert "x connect" in result.stdout
    assert "Is relayd running" in result.stdout

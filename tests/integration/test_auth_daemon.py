"""The token side of `relayd serve` as a subprocess: start-up, keep-alive, revocation,
a new sign-in picked up without a restart, and no secret in anything printed."""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path

from relayd.queue.spool import Spool
from tests.auth_helpers import (
    auth_config_file,
    cached_refresh_tokens,
    log_events,
    login_by_pasting,
    run_auth,
    wait_until,
)
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.helpers import RelayProcess, running_relay


def _login(config_path: Path, ca_file: Path) -> str:
    """`relayd auth login`, answered by pasting; returns everything it printed."""
    cli = login_by_pasting(config_path, ca_file)
    assert cli.process.returncode == 0, cli.everything()
    return cli.everything()


def _send_mail(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            "app@contoso.example",
            ["someone@example.org"],
            f"From: app@contoso.example\r\nSubject: {subject}\r\n\r\nbody\r\n",
        )


def _daemon_state(config_path: Path) -> dict:
    path = config_path.parent / "tokens" / "cache.json.state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_daemon_refuses_a_token_cache_readable_by_others(
    tmp_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    config_path = auth_config_file(tmp_path, entra, ca_file)
    _login(config_path, ca_file)
    cache = tmp_path / "tokens" / "cache.json"
    cache.chmod(0o640)
    relay = RelayProcess(config_path).start(wait=False)
    try:
        assert relay.process.wait(30) == 2
    finally:
        relay.kill()
    assert "oauth.token_cache" in relay.output()
    assert f"chmod 600 {cache}" in relay.output()
    assert str(config_path) in relay.output()


def test_revocation_then_a_new_login_with_the_daemon_running(
    tmp_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    config_path = auth_config_file(tmp_path, entra, ca_file, {"keepalive_interval": "1s"})
    cache = tmp_path / "tokens" / "cache.json"
    spool = Spool(tmp_path / "spool")
    with running_relay(config_path) as relay:
        # Nobody signed in yet: the relay still accepts (and keeps) mail.
        wait_until(lambda: _daemon_state(config_path).get("state") == "no_token")
        _send_mail(relay.port, "before sign-in")
        assert run_auth(config_path, "status").returncode == 1

        _login(config_path, ca_file)
        wait_until(lambda: "token cache changed by another process" in relay.output())
        # Keep-alive: with no mail flowing, the refresh token rotates and is persisted.
        signed_in_with = cached_refresh_tokens(cache)
        wait_until(lambda: cached_refresh_tokens(cache).isdisjoint(signed_in_with))
        assert cached_refresh_tokens(cache) <= entra.valid_refresh_tokens(MAILBOX)
        assert oct(cache.stat().st_mode & 0o777) == "0o600"

        entra.revoke_refresh_tokens(code=50173)
        wait_until(lambda: _daemon_state(config_path).get("state") == "reauth_required")
        _send_mail(relay.port, "while revoked")
        status = run_auth(config_path, "status")
        assert status.returncode == 1  # although the cached access token is valid on paper
        assert "reauth_required" in status.stdout
        assert f"relayd auth login -c {config_path}" in status.stdout
        errors = [e for e in log_events(relay.output()) if e["level"] == "error"]
        assert len(errors) == 1, errors
        assert "AADSTS50173" in errors[0]["event"]
        assert f"relayd auth login -c {config_path}" in errors[0]["event"]

        _login(config_path, ca_file)
        wait_until(lambda: _daemon_state(config_path).get("state") in ("ok", "refreshing"))
        assert run_auth(config_path, "status").returncode == 0
        assert len(list(spool.entries())) == 2  # nothing was bounced or lost
        assert relay.stop() == 0
    assert _daemon_state(config_path)["account"] == MAILBOX


def test_no_token_or_secret_in_anything_printed_or_logged(
    tmp_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    """Every CLI command and the daemon at debug level, through refreshes, retries,
    a revocation and new sign-ins: none of what the fake issued may appear."""
    config_path = auth_config_file(
        tmp_path,
        entra,
        ca_file,
        {"keepalive_interval": "0.5s"},
        logging={"level": "debug", "format": "json"},
    )
    printed: list[str] = [_login(config_path, ca_file)]

    def cli(*args: str, stdin: str = "") -> None:
        result = run_auth(config_path, *args, stdin=stdin)
        printed.append(result.stdout + result.stderr)

    cli("status")
    cli("status", "--json")
    cli("refresh")
    cli("import", stdin=entra.issue_refresh_token(MAILBOX))
    relay = RelayProcess(config_path).start()
    try:
        entra.fail_next(2, status=503, retry_after=0)
        wait_until(lambda: relay.output().count("access token renewed") >= 2)
        entra.revoke_refresh_tokens()
        wait_until(lambda: _daemon_state(config_path).get("state") == "reauth_required")
        cli("refresh")
        cli("status")
        printed.append(_login(config_path, ca_file))
        wait_until(lambda: relay.output().count("access token renewed") >= 3)
        cli("logout")
        wait_until(lambda: "signed out" in relay.output())
    finally:
        relay.stop()
    printed.append(relay.output())
    everything = "\n".join(printed)

    assert re.search(r'"level": "debug".*"logger": "msal', everything)  # debug really on
    assert "AADSTS50173" in everything  # the revocation did happen
    leaked = [secret for secret in entra.issued_secrets() if secret in everything]
    assert leaked == []
    assert entra.client_secret in entra.issued_secrets()

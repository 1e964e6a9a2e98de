"""`relayd auth ...` as a real subprocess against the fake Entra ID."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.auth_helpers import (
    AuthCli,
    auth_config_file,
    cached_refresh_tokens,
    login_by_pasting,
    run_auth,
)
from tests.fakes.entra import MAILBOX, FakeEntra, follow_redirect, sign_in_in_browser

EAP_REDIRECT = "https://eap.contoso.example/wm/externalAuth/redirect.html"


@pytest.fixture
def config_path(tmp_path: Path, entra: FakeEntra, ca_file: Path) -> Path:
    return auth_config_file(tmp_path, entra, ca_file)


def _cache(config_path: Path) -> Path:
    return config_path.parent / "tokens" / "cache.json"


def _status(config_path: Path) -> tuple[int, dict]:
    result = run_auth(config_path, "status", "--json")
    return result.returncode, json.loads(result.stdout)


def test_login_through_the_redirect_listener(
    config_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    cli = AuthCli(config_path, "login")
    try:
        auth_url = cli.wait_for_line("https://127.0.0.1:")
        cli.wait_for_line("Waiting for the browser")
        location = sign_in_in_browser(auth_url, ca_file)
        assert location.startswith("http://localhost:")
        assert "received the sign-in" in follow_redirect(location)  # the browser lands here
        assert cli.finish() == 0, cli.output()
    finally:
        cli.kill()
    assert f"Signed in as {MAILBOX}." in cli.output()
    assert "Access token valid until" in cli.output()
    cache = _cache(config_path)
    assert oct(cache.stat().st_mode & 0o777) == "0o600"
    assert cached_refresh_tokens(cache) <= entra.valid_refresh_tokens(MAILBOX)
    assert _status(config_path)[0] == 0


def test_login_by_pasting_the_address_with_the_eaps_redirect_uri(
    tmp_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    config_path = auth_config_file(tmp_path, entra, ca_file, {"redirect_uri": EAP_REDIRECT})
    cli = AuthCli(config_path, "login")
    try:
        auth_url = cli.wait_for_line("https://127.0.0.1:")
        cli.wait_for_line("and press Enter")
        location = sign_in_in_browser(auth_url, ca_file)
        assert location.startswith(EAP_REDIRECT + "?")
        cli.send("not the address\n")  # a wrong paste gets a hint, not a failure
        cli.wait_for_line("That is not the address")
        cli.send(location + "\n")
        assert cli.finish() == 0, cli.output()
    finally:
        cli.kill()
    assert f"Signed in as {MAILBOX}." in cli.output()
    code, status = _status(config_path)
    assert (code, status["account"], status["state"]) == (0, MAILBOX, "ok")


def test_login_with_a_device_code(config_path: Path, entra: FakeEntra) -> None:
    cli = AuthCli(config_path, "login", "--device-code")
    try:
        message = cli.wait_for_line("To sign in")
        user_code = re.search(r"enter the code (\w+)", message).group(1)
        entra.approve_device_code(user_code)
        assert cli.finish() == 0, cli.output()
    finally:
        cli.kill()
    assert f"Signed in as {MAILBOX}." in cli.output()
    assert entra.requests["token:urn:ietf:params:oauth:grant-type:device_code"] >= 1
    assert _status(config_path)[0] == 0


def test_sign_in_as_another_user_is_refused(
    config_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    entra.signin_user = "someone.else@contoso.example"
    cli = login_by_pasting(config_path, ca_file)
    assert cli.process.returncode == 1
    assert "signed in as someone.else@contoso.example" in cli.output()
    assert f"upstream.mailbox is {MAILBOX}" in cli.output()
    assert "535 5.7.3" in cli.output()
    assert not _cache(config_path).exists()


def test_status_refresh_logout_and_their_exit_codes(
    config_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    code, status = _status(config_path)
    assert (code, status["state"], status["healthy"]) == (1, "no_token", False)
    assert f"relayd auth login -c {config_path}" in status["advice"]

    assert login_by_pasting(config_path, ca_file).process.returncode == 0
    human = run_auth(config_path, "status")
    assert human.returncode == 0
    assert re.search(rf"Account:\s+{re.escape(MAILBOX)}", human.stdout)
    assert re.search(r"Health:\s+OK", human.stdout)
    assert "https://outlook.office.com/SMTP.Send" in human.stdout

    before = cached_refresh_tokens(_cache(config_path))
    refreshed = run_auth(config_path, "refresh")
    assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
    assert cached_refresh_tokens(_cache(config_path)).isdisjoint(before)

    entra.revoke_refresh_tokens(code=70008)
    refused = run_auth(config_path, "refresh")
    assert refused.returncode == 1
    assert "AADSTS70008" in refused.stdout
    assert f"relayd auth login -c {config_path}" in refused.stdout

    out = run_auth(config_path, "logout")
    assert out.returncode == 0 and f"Signed out {MAILBOX}" in out.stdout
    code, status = _status(config_path)
    assert (code, status["state"], status["account"]) == (1, "no_token", None)
    assert run_auth(config_path, "logout").stdout.startswith("Nobody was signed in")


def test_import_redeems_a_refresh_token_from_another_tool(
    config_path: Path, entra: FakeEntra
) -> None:
    legacy = entra.issue_refresh_token(MAILBOX)
    imported = run_auth(config_path, "import", stdin=legacy + "\n")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert f"Imported the refresh token of {MAILBOX}." in imported.stdout
    on_disk = cached_refresh_tokens(_cache(config_path))
    assert legacy not in on_disk and on_disk <= entra.valid_refresh_tokens(MAILBOX)
    assert _status(config_path)[0] == 0

    empty = run_auth(config_path, "import", stdin="")
    assert empty.returncode == 1 and "No refresh token" in empty.stdout


def test_import_of_another_users_token_is_refused(config_path: Path, entra: FakeEntra) -> None:
    foreign = entra.issue_refresh_token("someone.else@contoso.example")
    refused = run_auth(config_path, "import", stdin=foreign)
    assert refused.returncode == 1 and "Import refused" in refused.stdout
    assert not _cache(config_path).exists()


def test_login_says_clearly_when_entra_is_unreachable(config_path: Path, entra: FakeEntra) -> None:
    entra.down = True
    result = run_auth(config_path, "login")
    assert result.returncode == 1
    assert f"Cannot reach Entra ID at {entra.authority}" in result.stdout


@pytest.mark.parametrize("action", ["import", "refresh"])
def test_an_unreachable_entra_id_is_never_called_a_refusal(
    config_path: Path, entra: FakeEntra, ca_file: Path, action: str
) -> None:
    """With the network down, `auth import` used to say "Entra ID refused … sign in
    again"; a person then signed in for nothing. It says where it could not reach, and
    the cache stays as it was."""
    if action == "refresh":
        assert login_by_pasting(config_path, ca_file).process.returncode == 0
    before = _cache(config_path).read_bytes() if _cache(config_path).exists() else None
    token = entra.issue_refresh_token(MAILBOX)
    entra.down = True
    result = run_auth(config_path, action, stdin=token + "\n" if action == "import" else None)
    assert result.returncode == 1
    assert f"Cannot reach Entra ID at {entra.authority}" in result.stdout
    assert "HTTPS_PROXY" in result.stdout
    assert "refused" not in result.stdout.lower() and "sign in again" not in result.stdout.lower()
    after = _cache(config_path).read_bytes() if _cache(config_path).exists() else None
    assert after == before


def test_a_refusal_still_names_the_aadsts_code_and_the_fix(
    config_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    assert login_by_pasting(config_path, ca_file).process.returncode == 0
    entra.revoke_refresh_tokens(50173)
    result = run_auth(config_path, "refresh")
    assert result.returncode == 1
    assert "Entra ID refused: AADSTS50173" in result.stdout
    assert f"Sign in again: relayd auth login -c {config_path}" in result.stdout

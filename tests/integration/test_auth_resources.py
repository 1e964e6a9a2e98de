"""One sign-in for SMTP AUTH and Microsoft Graph: `relayd auth login` (paste and device
code), `auth status`, and the token manager, against the fake Entra ID's consent model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relayd.auth.tokens import OK, REAUTH_REQUIRED, TokenManager
from relayd.ops.metrics import Metrics
from tests.auth_helpers import (
    AuthCli,
    auth_config_file,
    log_events,
    login_by_pasting,
    run_auth,
    sign_in,
    token_settings,
)
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.unit.auth.test_tokens import log_output  # noqa: F401 (fixture)

MAIL_SEND = "https://graph.microsoft.com/Mail.Send"
MAIL_READ_WRITE = "https://graph.microsoft.com/Mail.ReadWrite"
SMTP_SEND = "https://outlook.office.com/SMTP.Send"


def config_for(tmp_path: Path, entra: FakeEntra, ca_file: Path, **upstream) -> Path:
    return auth_config_file(
        tmp_path, entra, ca_file, upstream={"mailbox": MAILBOX, "transport": "auto", **upstream}
    )


def test_login_consents_to_both_apis_and_status_shows_each_token(
    tmp_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    path = config_for(tmp_path, entra, ca_file)

    cli = login_by_pasting(path, ca_file)

    assert cli.process.returncode == 0, cli.everything()
    assert entra.consented(MAILBOX) == {SMTP_SEND, MAIL_SEND}
    assert "Token for sending through Microsoft Graph (Mail.Send): valid until" in cli.output()
    report = json.loads(run_auth(path, "status", "--json").stdout)
    assert set(report["resources"]) == {"smtp", "graph"}
    assert all(r["access_token_expires_at"] for r in report["resources"].values())
    assert report["scopes"] == [SMTP_SEND, MAIL_SEND]
    human = run_auth(path, "status").stdout
    assert f"graph ({MAIL_SEND}): valid until" in human


def test_login_without_graph_consent_says_which_permission_to_grant(
    tmp_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    path = config_for(tmp_path, entra, ca_file)
    entra.withhold_consent(MAIL_SEND)

    cli = login_by_pasting(path, ca_file)

    assert cli.process.returncode == 1  # auto cannot move to Graph without it
    line = next(x for x in cli.lines if x.startswith("Token for sending through Microsoft Graph"))
    assert "AADSTS65001" in line and "Mail.Send" in line and "relayd auth login" in line


def test_device_code_asks_a_second_code_for_the_api_without_consent(
    tmp_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    path = auth_config_file(
        tmp_path,
        entra,
        ca_file,
        {"client_secret": ""},
        upstream={"mailbox": MAILBOX, "transport": "auto"},
    )
    cli = AuthCli(path, "login", "--device-code")
    try:
        for _ in range(2):  # SMTP.Send first, then Mail.Send with a code of its own
            message = cli.wait_for_line("To sign in")
            entra.approve_device_code(re.search(r"enter the code (\w+)", message).group(1))
        assert cli.finish() == 0, cli.output()
    finally:
        cli.kill()
    assert "Consent is needed for Mail.Send too" in cli.output()
    assert entra.consented(MAILBOX) == {SMTP_SEND, MAIL_SEND}


@pytest.fixture
async def manager(tmp_path: Path, entra: FakeEntra, ca_file: Path):
    made: list[TokenManager] = []

    def make(**upstream) -> TokenManager:
        settings = token_settings(tmp_path, entra, ca_file)
        upstream_settings = dataclasses.replace(settings.upstream, transport="auto", **upstream)
        settings = dataclasses.replace(settings, upstream=upstream_settings)
        assert sign_in(settings, ca_file).ok
        made.append(TokenManager(settings, Metrics(CollectorRegistry(), process=False)))
        return made[-1]

    yield make
    for item in made:
        await item.stop()


async def test_consent_missing_for_one_api_stops_that_token_only(
    manager, entra: FakeEntra, tmp_path: Path
) -> None:
    entra.withhold_consent(MAIL_READ_WRITE)
    tokens = manager(graph_large_messages=True)
    await tokens.start()

    assert await tokens.source("graph").access_token()
    with pytest.raises(Exception, match="AADSTS65001"):
        await tokens.source("graph_large").access_token()

    assert tokens.source("graph_large").state == REAUTH_REQUIRED
    assert "Mail.ReadWrite" in tokens.source("graph_large").advice()
    assert tokens.state == OK and tokens.source("smtp").state == OK  # mail still flows
    document = tokens.state_document()
    assert document["state"] == OK
    assert document["resources"]["graph_large"]["aadsts"] == 65001


async def test_a_revoked_sign_in_stops_every_token_with_one_error_line(
    manager,
    entra: FakeEntra,
    log_output,  # noqa: F811 (the fixture)
) -> None:
    tokens = manager()
    await tokens.start()
    await tokens.source("graph").access_token()

    entra.revoke_refresh_tokens(code=50173)
    await tokens.refresh(tokens.source("graph"), "test")

    assert {slot.state for slot in tokens.slots.values()} == {REAUTH_REQUIRED}
    errors = [e for e in log_events(log_output.getvalue()) if e["level"] == "error"]
    assert len(errors) == 1 and "AADSTS50173" in errors[0]["event"]

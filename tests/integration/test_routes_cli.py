"""The commands of a relay with routes, as real processes: `auth --mailbox` against the
fake Entra ID, `auth status` of every mailbox, `queue list --mailbox`, and
`send-test --from` through a running relay (routes to a Maildir)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from relayd import config
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.auth_helpers import auth_config_file, login_showing_the_address, run_auth
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.helpers import REPO, make_message, run_relayd, running_relay, write_config

HR = "hr@contoso.example"
NOTIFY = "notify@contoso.example"
ROUTES = [
    {"mailbox": NOTIFY, "senders": ["app@contoso.example"]},
    {"mailbox": HR, "senders": ["*@hr.contoso.example"], "send_as": ["jobs@contoso.example"]},
]


@pytest.fixture
def config_path(tmp_path: Path, entra: FakeEntra, ca_file: Path) -> Path:
    return auth_config_file(tmp_path, entra, ca_file, routes=ROUTES)


def route_cache(config_path: Path, mailbox: str) -> Path:
    return config_path.parent / "tokens" / f"token_cache.{mailbox}.json"


def test_login_for_a_route_signs_in_that_mailbox_only(
    config_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    entra.signin_user = HR
    cli, auth_url = login_showing_the_address(config_path, ca_file, "--mailbox", HR)
    assert cli.process.returncode == 0, cli.everything()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(auth_url).query)
    assert query["login_hint"] == [HR]  # Entra ID preselects that account
    assert f"Sign in as {HR}" in cli.output() and f"Signed in as {HR}." in cli.output()
    assert route_cache(config_path, HR).exists()
    assert not route_cache(config_path, NOTIFY).exists()
    assert not (config_path.parent / "tokens" / "cache.json").exists()  # the default's

    status = run_auth(config_path, "status", "--mailbox", HR, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["account"] == HR
    every = run_auth(config_path, "status", "--json")
    assert every.returncode == 1  # the default and notify are not signed in
    report = json.loads(every.stdout)
    assert report["account"] is None and report["mailbox"] == MAILBOX  # the default's
    states = {name: item["state"] for name, item in report["mailboxes"].items()}
    assert states == {MAILBOX: "no_token", NOTIFY: "no_token", HR: "ok"}
    assert not report["all_healthy"]
    advice = report["mailboxes"][NOTIFY]["advice"]
    assert f"relayd auth login -c {config_path} --mailbox {NOTIFY}" in advice

    human = run_auth(config_path, "status")
    assert f"Mailbox:        {HR} [routes[1].mailbox]" in human.stdout
    assert f"Mailbox:        {MAILBOX} [default route (upstream.mailbox)]" in human.stdout

    refreshed = run_auth(config_path, "refresh", "--mailbox", HR)
    assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
    out = run_auth(config_path, "logout", "--mailbox", HR)
    assert out.returncode == 0 and f"Signed out {HR}" in out.stdout
    assert run_auth(config_path, "status", "--mailbox", HR).returncode == 1


def test_login_as_anyone_else_is_refused_and_not_saved(
    config_path: Path, entra: FakeEntra, ca_file: Path
) -> None:
    """The person signs in as the default mailbox (or anyone) when asked for HR's."""
    entra.signin_user = MAILBOX
    cli, _ = login_showing_the_address(config_path, ca_file, "--mailbox", HR)
    assert cli.process.returncode == 1
    refusal = [line for line in cli.output().splitlines() if "refused" in line]
    assert len(refusal) == 1, cli.output()
    assert f"signed in as {MAILBOX}, but routes[1].mailbox is {HR}" in refusal[0]
    assert "The token cache was not changed." in refusal[0]
    assert not route_cache(config_path, HR).exists()
    assert not (config_path.parent / "tokens" / "cache.json").exists()


def test_an_unknown_mailbox_is_one_line_naming_the_known(config_path: Path) -> None:
    result = run_auth(config_path, "login", "--mailbox", "nobody@contoso.example")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no route has the mailbox nobody@contoso.example" in result.stderr
    assert f"{NOTIFY}, {HR}, {MAILBOX}" in result.stderr


# --- queue list ----------------------------------------------------------------------------


def _queue_messages(settings: config.Settings, senders: list[str]) -> list[str]:
    spool = Spool(settings.spool.directory)
    spool.ensure_layout()
    ids = []

    async def commit() -> None:
        for sender in senders:
            queue_id = new_queue_id()
            envelope = Envelope(sender, ("u@example.org",), received_at=time.time())
            await spool.commit(queue_id, envelope, make_message(sender=sender or "x@y.example"))
            ids.append(queue_id)

    asyncio.run(commit())
    return ids


def test_queue_list_shows_and_selects_by_mailbox(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"upstream": {"mailbox": MAILBOX}, "routes": ROUTES})
    senders = ["app@contoso.example", "anna@hr.contoso.example", "other@example.org", ""]
    ids = _queue_messages(config.load(path), senders)

    listed = run_relayd("queue", "list", "-c", str(path))
    assert listed.returncode == 0, listed.stderr
    assert "Mailbox" in listed.stdout.splitlines()[0]
    rows = {line.split()[0]: line.split()[5] for line in listed.stdout.splitlines()[1:5]}
    assert rows == dict(zip(ids, [NOTIFY, HR, MAILBOX, MAILBOX], strict=True))

    def selected(mailbox: str) -> list[str]:
        result = run_relayd("queue", "list", "--json", "--mailbox", mailbox, "-c", str(path))
        assert result.returncode == 0, result.stderr
        items = json.loads(result.stdout)
        assert {item["mailbox"] for item in items} <= {mailbox.lower()}
        return [item["id"] for item in items]

    shown = run_relayd("queue", "show", ids[1], "-c", str(path))
    assert f"Mailbox:     {HR}\n" in shown.stdout, shown.stdout
    assert selected(HR) == [ids[1]]
    assert selected("Notify@Contoso.example") == [ids[0]]
    assert selected(MAILBOX) == ids[2:]
    unknown = run_relayd("queue", "list", "--mailbox", "x@contoso.example", "-c", str(path))
    assert unknown.returncode == 2 and "not a mailbox of" in unknown.stderr
    held = run_relayd("queue", "hold", "--mailbox", HR, "-c", str(path))
    assert held.returncode == 0 and "1 message(s) on hold" in held.stdout
    states = json.loads(run_relayd("queue", "list", "--json", "-c", str(path)).stdout)
    assert [item["id"] for item in states if item["state"] == "hold"] == [ids[1]]


def test_queue_list_without_routes_has_no_mailbox_column(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    _queue_messages(config.load(path), ["app@contoso.example"])
    listed = run_relayd("queue", "list", "-c", str(path))
    assert "Mailbox" not in listed.stdout
    assert (
        "mailbox"
        not in json.loads(run_relayd("queue", "list", "--json", "-c", str(path)).stdout)[0]
    )


# --- send-test --from ------------------------------------------------------------------------


def test_send_test_from_a_routed_sender_leaves_as_its_mailbox(tmp_path: Path) -> None:
    """Every route writes into the Maildir here (transport maildir): the envelope the
    Maildir records shows which mailbox the message left as."""
    path = write_config(tmp_path, {"upstream": {"mailbox": MAILBOX}, "routes": ROUTES})
    with running_relay(path) as relay:
        sent = run_relayd(
            "send-test",
            "-c",
            str(path),
            "--to",
            "u@example.org",
            "--from",
            "anna@hr.contoso.example",
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert f"leaves as {HR} (a route)" in sent.stdout
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics").read()
    (stored,) = (tmp_path / "maildir" / "new").iterdir()
    content = stored.read_bytes()
    assert f"Return-Path: <{HR}>".encode() in content  # MAIL FROM: the route's mailbox
    assert b"Reply-To: <anna@hr.contoso.example>" in content  # From: rewritten, kept here
    line = f'relayd_messages_delivered_total{{mailbox="{HR}"}} 1.0'
    assert line in scraped.decode()
    assert REPO.exists()


def test_check_config_shows_the_routes_and_warns_about_a_shadowed_sender(tmp_path: Path) -> None:
    shadowed = {"mailbox": "boss@contoso.example", "senders": ["app@contoso.example"]}
    path = write_config(tmp_path, {"upstream": {"mailbox": MAILBOX}, "routes": [*ROUTES, shadowed]})
    checked = run_relayd("check-config", "-c", str(path))
    assert checked.returncode == 0, checked.stderr
    assert (
        f"relayd: warning: {path}: routes[2].senders: app@contoso.example is routed by"
        f" routes[0] ({NOTIFY}) first (first match wins)"
    ) in checked.stderr
    shown = yaml.safe_load(checked.stdout)["routes"]
    assert [route["mailbox"] for route in shown] == [NOTIFY, HR, "boss@contoso.example"]
    assert shown[1]["token_cache"].endswith(f"token_cache.{HR}.json")
    assert shown[1]["max_connections"] == 3  # upstream.max_connections

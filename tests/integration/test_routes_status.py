"""A running relay with a route that nobody signed in for: its mail waits (auth), the
default route's flows; /readyz, status.json, `queue list` and the metrics say so per
mailbox. (The full two-route load test against the fakes is test_routes_serve.py.)"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from tests.auth_helpers import wait_until
from tests.helpers import (
    deep_merge,
    run_relayd,
    running_relay,
    send_message,
    unreachable_upstream,
    write_config,
)

DEFAULT = "relay@contoso.example"
HR = "hr@contoso.example"


def config_with_a_waiting_route(tmp_path: Path) -> Path:
    """The default route writes into the Maildir; HR's signs in to a closed port."""
    overrides = deep_merge(
        unreachable_upstream(tmp_path),
        {
            "upstream": {"transport": "maildir", "mailbox": DEFAULT},
            "routes": [{"mailbox": HR, "senders": ["*@hr.contoso.example"], "transport": "smtp"}],
        },
    )
    return write_config(tmp_path, overrides)


def fetch(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.read().decode()


def test_a_route_without_a_sign_in_waits_alone(tmp_path: Path) -> None:
    path = config_with_a_waiting_route(tmp_path)
    with running_relay(path) as relay:
        waiting = send_message(relay.port, sender="anna@hr.contoso.example")
        flowing = send_message(relay.port, sender="app@example.com")
        maildir = tmp_path / "maildir" / "new"
        wait_until(lambda: maildir.is_dir() and len(list(maildir.iterdir())) == 1)
        status_file = tmp_path / "spool" / "status.json"
        wait_until(lambda: status_file.exists() and "mailboxes" in status_file.read_text())
        status = json.loads(status_file.read_text())
        assert status["deliveries"] == "running"  # the default mailbox's, as before
        assert status["mailboxes"][HR]["deliveries"] == "paused"
        assert status["mailboxes"][HR]["reason"] == "auth"

        ready = json.loads(fetch(relay.metrics_port, "/readyz"))
        assert ready["auth"] is None  # the default route signs in nowhere (maildir)
        assert ready["mailboxes"][HR]["auth"] == "no_token"
        assert ready["mailboxes"][HR]["paused"] == "auth"
        assert ready["mailboxes"][DEFAULT]["paused"] is None

        listed = run_relayd("queue", "list", "-c", str(path))
        assert waiting in listed.stdout and flowing not in listed.stdout
        assert f"-- {HR}: its deliveries are paused (auth)" in listed.stdout
        assert f"relayd auth login -c {path} --mailbox {HR}" in listed.stdout

        metrics = fetch(relay.metrics_port, "/metrics")
        assert f'relayd_auth_state{{mailbox="{HR}",state="no_token"}} 1.0' in metrics
        assert f'relayd_deliveries_paused{{mailbox="{HR}",reason="auth"}} 1.0' in metrics
        assert f'relayd_messages_delivered_total{{mailbox="{DEFAULT}"}} 1.0' in metrics

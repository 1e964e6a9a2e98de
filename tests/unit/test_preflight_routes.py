"""check-config with routes: senders an earlier route takes, placeholders, token caches."""

from __future__ import annotations

from pathlib import Path

from relayd import config, preflight
from relayd.preflight import ERROR, WARNING
from tests.unit.test_preflight import settings_for

WIDE = {"mailbox": "all@contoso.com", "senders": ["*@hr.contoso.com"]}
NARROW = {"mailbox": "boss@contoso.com", "senders": ["ceo@hr.contoso.com"]}


def with_routes(tmp_path: Path, *routes: dict) -> config.Settings:
    return settings_for(tmp_path, routes=list(routes))


def test_a_sender_an_earlier_route_takes_is_a_warning(tmp_path: Path) -> None:
    findings = preflight.check(with_routes(tmp_path, WIDE, NARROW), serving=True)
    assert findings == [
        preflight.Finding(
            WARNING,
            "routes[1].senders",
            "ceo@hr.contoso.com is routed by routes[0] (all@contoso.com) first (first match wins)",
        )
    ]
    assert findings[0].line("test.yaml").startswith("test.yaml: routes[1].senders: ")


def test_a_placeholder_address_in_a_route(tmp_path: Path) -> None:
    placeholder = {"mailbox": "hr@example.com"}
    (serving,) = preflight.check(with_routes(tmp_path, placeholder), serving=True)
    (checking,) = preflight.check(with_routes(tmp_path, placeholder), serving=False)
    assert (serving.severity, checking.severity, serving.key) == (ERROR, WARNING, "routes[0]")


def test_a_routes_token_cache_directory_must_be_usable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    route = {**WIDE, "token_cache": str(blocker / "cache.json")}
    findings = preflight.check(with_routes(tmp_path, route), serving=True)
    assert [(f.severity, f.key) for f in findings] == [(ERROR, "routes[0].token_cache")]
    maildir = with_routes(tmp_path, {**route, "transport": "maildir"})
    assert preflight.check(maildir, serving=True) == []

"""A relay with routes that cannot start says so in one line naming the route's key."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import deep_merge, unreachable_upstream, write_config
from tests.integration.test_startup_errors import serve, the_one_line

ROUTE = {"mailbox": "hr@contoso.example", "senders": ["*@hr.contoso.example"]}


def test_a_routes_token_cache_others_can_read(tmp_path: Path) -> None:
    cache = tmp_path / "hr-cache.json"
    cache.write_text("{}")
    cache.chmod(0o644)
    overrides = deep_merge(
        unreachable_upstream(tmp_path), {"routes": [{**ROUTE, "token_cache": str(cache)}]}
    )
    line = the_one_line(serve(write_config(tmp_path, overrides)))
    assert line.startswith("relayd: configuration error in ")
    assert ": routes[0].token_cache: refusing to start: " in line


def test_a_bad_route_is_one_line(tmp_path: Path) -> None:
    overrides = deep_merge(
        unreachable_upstream(tmp_path), {"routes": [{**ROUTE, "senders": ["x"]}]}
    )
    line = the_one_line(serve(write_config(tmp_path, overrides)))
    assert line.endswith("routes[0].senders: invalid: 'x' is neither an address nor *@domain")

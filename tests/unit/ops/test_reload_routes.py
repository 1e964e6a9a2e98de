"""SIGHUP with routes: limits and send_as change live; the routes' shape needs a restart."""

from __future__ import annotations

from relayd import config
from relayd.ops.reload import merge_reload

HR = {"mailbox": "hr@contoso.example", "senders": ["*@hr.contoso.example"]}


def settings(*routes: dict, **upstream: object) -> config.Settings:
    document = {
        "upstream": {"transport": "maildir", "mailbox": "relay@contoso.example", **upstream},
        "routes": list(routes),
    }
    return config.from_mapping(document, "test.yaml", environ={})


def test_route_limits_and_send_as_are_applied() -> None:
    changed = {**HR, "rate_limit_per_minute": 5, "send_as": ["jobs@contoso.example"]}
    new, kept = merge_reload(settings(HR), settings(changed, max_connections=2))
    assert kept == []
    (route,) = new.routes
    assert (route.rate_limit_per_minute, route.max_connections) == (5, 2)  # 2: upstream's
    assert route.send_as == ("jobs@contoso.example",)
    hr = config.mailbox_settings(new)["hr@contoso.example"]
    assert hr.upstream.rate_limit_per_minute == 5


def test_new_senders_or_mailboxes_keep_the_running_routes() -> None:
    running = settings(HR)
    other = {"mailbox": "it@contoso.example"}
    for loaded in (
        settings({**HR, "senders": ["*@contoso.example"]}),
        settings(HR, other),
        settings(),
        settings({**HR, "token_cache": "/tmp/elsewhere.json"}),
    ):
        new, kept = merge_reload(running, loaded)
        assert kept == ["routes"]
        assert new.routes == running.routes


def test_without_routes_nothing_is_said() -> None:
    assert merge_reload(settings(), settings())[1] == []

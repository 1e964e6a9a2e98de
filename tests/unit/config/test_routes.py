"""routes: parsing, defaults from upstream.*, one-line errors, and sender matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd import config
from relayd.config import ConfigError
from relayd.config.routes import route_for, sender_matches, shadowed
from tests.helpers import base_config, deep_merge, unreachable_upstream

NOTIFY = {"mailbox": "notify@contoso.example", "senders": ["app@contoso.example"]}
HR = {
    "mailbox": "hr@contoso.example",
    "senders": ["*@hr.contoso.example", "Payroll@Contoso.example"],
    "send_as": ["jobs@contoso.example"],
    "max_connections": 2,
    "rate_limit_per_minute": 10,
}


def relay_config(tmp_path: Path) -> dict:
    """One mailbox (relay@contoso.example) over SMTP, its cache in tmp_path."""
    return deep_merge(base_config(tmp_path), unreachable_upstream(tmp_path))


def load(tmp_path: Path, routes: object, **overrides: object) -> config.Settings:
    document = deep_merge(relay_config(tmp_path), overrides)
    document["routes"] = routes
    return config.from_mapping(document, "relayd.yaml", environ={})


def error(tmp_path: Path, routes: object, **overrides: object) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, routes, **overrides)
    text = str(raised.value)
    assert "\n" not in text
    return text


def test_without_routes_nothing_changes(tmp_path: Path) -> None:
    settings = config.from_mapping(relay_config(tmp_path), "relayd.yaml", environ={})
    assert settings.routes == ()
    assert "routes" not in config.redacted(settings)
    assert list(config.mailbox_settings(settings)) == ["relay@contoso.example"]
    assert config.settings_for_sender(settings, "anyone@else.example") == settings
    assert config.settings_for_mailbox(settings, None) == settings


def test_a_route_takes_its_defaults_from_upstream_and_oauth(tmp_path: Path) -> None:
    settings = load(tmp_path, [NOTIFY, HR], upstream={"daily_recipient_limit": 500})
    notify, hr = settings.routes
    assert notify.mailbox == "notify@contoso.example"
    assert notify.transport == "smtp"
    assert (notify.max_connections, notify.rate_limit_per_minute) == (3, 30)
    assert notify.daily_recipient_limit == hr.daily_recipient_limit == 500
    assert (hr.max_connections, hr.rate_limit_per_minute) == (2, 10)
    # Beside oauth.token_cache, named after the mailbox.
    assert notify.token_cache == tmp_path / "token_cache.notify@contoso.example.json"
    assert hr.token_cache == tmp_path / "token_cache.hr@contoso.example.json"


def test_route_settings_replace_the_default_mailbox(tmp_path: Path) -> None:
    settings = load(tmp_path, [HR])
    hr = config.route_settings(settings, settings.routes[0])
    assert hr.upstream.mailbox == "hr@contoso.example"
    assert hr.upstream.send_as == ("jobs@contoso.example",)
    assert hr.upstream.max_connections == 2
    assert hr.oauth.token_cache == settings.routes[0].token_cache
    assert hr.routes == ()
    assert hr.upstream.host == settings.upstream.host  # everything else as upstream.*
    assert list(config.mailbox_settings(settings)) == [
        "hr@contoso.example",
        "relay@contoso.example",
    ]
    assert config.settings_for_mailbox(settings, "HR@contoso.example") == hr
    assert config.settings_for_mailbox(settings, "nobody@contoso.example") is None
    assert config.settings_for_mailbox(settings, None).upstream.mailbox == "relay@contoso.example"


def test_an_explicit_token_cache_and_transport(tmp_path: Path) -> None:
    route = {**NOTIFY, "token_cache": str(tmp_path / "n.json"), "transport": "graph"}
    (notify,) = load(tmp_path, [route]).routes
    assert notify.token_cache == tmp_path / "n.json"
    assert notify.transport == "graph"


def test_check_config_shows_the_effective_routes(tmp_path: Path) -> None:
    shown = config.redacted(load(tmp_path, [HR]))["routes"]
    assert shown == [
        {
            "mailbox": "hr@contoso.example",
            "senders": ["*@hr.contoso.example", "Payroll@Contoso.example"],
            "send_as": ["jobs@contoso.example"],
            "token_cache": str(tmp_path / "token_cache.hr@contoso.example.json"),
            "transport": "smtp",
            "max_connections": 2,
            "rate_limit_per_minute": 10,
            "daily_recipient_limit": 10000,
        }
    ]


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({"mailbox": "x@contoso.example"}, "relayd.yaml: routes: expected a list of routes"),
        (["hr@contoso.example"], "relayd.yaml: routes[0]: expected a mapping of keys"),
        (
            [NOTIFY, {**HR, "sender": ["a@b.example"]}],
            "relayd.yaml: routes[1].sender: unknown key 'sender'; known: mailbox, senders,",
        ),
        ([{"senders": ["a@contoso.example"]}], "relayd.yaml: routes[0].mailbox: required"),
        (
            [NOTIFY, {**HR, "mailbox": "hr"}],
            "relayd.yaml: routes[1].mailbox: invalid: 'hr' is not an email address",
        ),
        (
            [{**NOTIFY, "senders": ["*@nodot"]}],
            "relayd.yaml: routes[0].senders: invalid: '*@nodot' is neither an address nor",
        ),
        (
            [{**NOTIFY, "senders": "app@contoso.example"}],
            None,  # a single text is a one-item list, as for every list setting
        ),
        (
            [{**NOTIFY, "send_as": ["shared"]}],
            "relayd.yaml: routes[0].send_as: invalid: 'shared' is not an email address",
        ),
        (
            [{**NOTIFY, "max_connections": 0}],
            "relayd.yaml: routes[0].max_connections: must be at least 1, got 0",
        ),
        (
            [{**NOTIFY, "transport": "carrier-pigeon"}],
            "relayd.yaml: routes[0].transport: expected one of smtp, graph, auto, maildir",
        ),
        (
            [NOTIFY, {**HR, "mailbox": "NOTIFY@contoso.example"}],
            "relayd.yaml: routes[1].mailbox: invalid: NOTIFY@contoso.example is the mailbox"
            " of routes[0] too",
        ),
        (
            [{**NOTIFY, "mailbox": "relay@contoso.example"}],
            "relayd.yaml: routes[0].mailbox: invalid: relay@contoso.example is"
            " upstream.mailbox, the default route",
        ),
    ],
)
def test_each_mistake_is_one_line_naming_the_route_and_key(
    tmp_path: Path, routes: object, expected: str | None
) -> None:
    if expected is None:
        load(tmp_path, routes)
        return
    assert error(tmp_path, routes).startswith(expected)


def test_two_routes_may_not_share_a_token_cache(tmp_path: Path) -> None:
    shared = str(tmp_path / "one.json")
    routes = [{**NOTIFY, "token_cache": shared}, {**HR, "token_cache": shared}]
    assert error(tmp_path, routes).startswith(
        f"relayd.yaml: routes[1].token_cache: invalid: {shared} is routes[0].token_cache's"
    )
    default = str(tmp_path / "token_cache.json")
    assert error(tmp_path, [{**NOTIFY, "token_cache": default}]).startswith(
        f"relayd.yaml: routes[0].token_cache: invalid: {default} is oauth.token_cache's"
    )


def test_a_signing_in_route_needs_the_app_registration(tmp_path: Path) -> None:
    smtp_route = {**NOTIFY, "transport": "smtp"}
    document = {"upstream": {"transport": "maildir"}, "routes": [smtp_route]}
    with pytest.raises(ConfigError, match=r"^x: oauth.tenant_id: required when routes\[0\]"):
        config.from_mapping(document, "x", environ={})
    document = {"upstream": {"transport": "maildir"}, "routes": [NOTIFY]}  # inherits maildir
    assert config.from_mapping(document, "x", environ={}).routes[0].transport == "maildir"


def test_an_unknown_top_level_key_names_routes_among_the_known(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"known: listen, .*, logging, routes$"):
        config.from_mapping({"route": []}, "x", environ={})


def test_the_sandbox_never_lets_a_route_send_real_mail(tmp_path: Path) -> None:
    path = tmp_path / "relayd.yaml"
    path.write_text(
        "routes:\n- mailbox: hr@contoso.example\n  transport: smtp\n- mailbox: it@contoso.example\n"
    )
    settings = config.sandbox(path, environ={"RELAYD_SANDBOX_DIR": str(tmp_path)})
    assert [route.transport for route in settings.routes] == ["maildir", "maildir"]


# --- matching ------------------------------------------------------------------------


def test_senders_match_exactly_or_by_domain_case_insensitively() -> None:
    patterns = ("app@contoso.example", "*@hr.contoso.example")
    assert sender_matches(patterns, "app@contoso.example")
    assert sender_matches(patterns, "APP@Contoso.Example")
    assert sender_matches(patterns, "anyone@HR.contoso.example")
    assert not sender_matches(patterns, "app2@contoso.example")
    assert not sender_matches(patterns, "anyone@sub.hr.contoso.example")  # that domain only
    assert not sender_matches(patterns, "anyone@contoso.example")
    assert not sender_matches(patterns, "")  # DSNs (null sender): the default route


def test_the_first_matching_route_wins_and_nothing_matched_is_the_default(
    tmp_path: Path,
) -> None:
    wide = {"mailbox": "all@contoso.example", "senders": ["*@hr.contoso.example"]}
    narrow = {"mailbox": "boss@contoso.example", "senders": ["ceo@hr.contoso.example"]}
    settings = load(tmp_path, [wide, narrow])
    assert route_for(settings.routes, "ceo@hr.contoso.example").mailbox == wide["mailbox"]
    assert route_for(settings.routes, "x@elsewhere.example") is None
    assert route_for(settings.routes, "") is None
    sender_settings = config.settings_for_sender(settings, "x@elsewhere.example")
    assert sender_settings.upstream.mailbox == "relay@contoso.example"
    # check-config says so (a warning, not an error).
    assert shadowed(settings.routes) == [
        "routes[1].senders: ceo@hr.contoso.example is routed by routes[0]"
        " (all@contoso.example) first (first match wins)"
    ]


def test_the_mailbox_and_its_send_as_are_senders_of_the_route(tmp_path: Path) -> None:
    settings = load(tmp_path, [NOTIFY, HR])
    assert route_for(settings.routes, "hr@contoso.example").mailbox == "hr@contoso.example"
    assert route_for(settings.routes, "Jobs@contoso.example").mailbox == "hr@contoso.example"
    assert route_for(settings.routes, "payroll@contoso.example").mailbox == "hr@contoso.example"
    # Listed senders of an earlier route come before a later route's implicit ones.
    first = {"mailbox": "a@contoso.example", "senders": ["jobs@contoso.example"]}
    settings = load(tmp_path, [first, HR])
    assert route_for(settings.routes, "jobs@contoso.example").mailbox == "a@contoso.example"

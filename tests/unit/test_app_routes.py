"""The daemon's wiring with routes: a token manager, transport and scheduler per mailbox,
and SIGHUP reaching each route's scheduler."""

from __future__ import annotations

from pathlib import Path

import yaml

from relayd import app, config
from tests.helpers import base_config, deep_merge, unreachable_upstream

HR = "hr@contoso.example"
DEFAULT = "relay@contoso.example"


def write(tmp_path: Path, rate: int) -> Path:
    document = deep_merge(base_config(tmp_path), unreachable_upstream(tmp_path))
    document["metrics"]["enabled"] = False
    document["routes"] = [{"mailbox": HR, "senders": ["*@hr.contoso.example"]}]
    document["routes"][0]["rate_limit_per_minute"] = rate
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_each_mailbox_gets_its_own_tokens_and_scheduler(tmp_path: Path) -> None:
    path = write(tmp_path, 5)
    relay = app.Relay(config.load(path, environ={}), config_path=path)
    assert set(relay.mailboxes) == {HR, DEFAULT}
    hr_tokens, default_tokens = relay.mailboxes[HR], relay.mailboxes[DEFAULT]
    assert hr_tokens is not None and default_tokens is relay.tokens
    assert hr_tokens.store.cache_path == tmp_path / f"token_cache.{HR}.json"
    assert default_tokens.store.cache_path == tmp_path / "token_cache.json"
    assert hr_tokens.login_command.endswith(f"--mailbox {HR}")
    assert hr_tokens.cache_setting == "routes[0].token_cache"
    schedulers = relay.scheduler.schedulers
    assert schedulers[HR].transport is not schedulers[DEFAULT].transport
    assert schedulers[HR].rate.limit == 5 and schedulers[DEFAULT].rate.limit == 30
    assert relay.metrics.per_mailbox


def test_a_reload_gives_each_route_its_new_limits(tmp_path: Path) -> None:
    path = write(tmp_path, 5)
    relay = app.Relay(config.load(path, environ={}), config_path=path)
    write(tmp_path, 9)
    relay.reload()
    assert relay.scheduler.schedulers[HR].rate.limit == 9
    assert relay.scheduler.schedulers[DEFAULT].rate.limit == 30
    assert relay.settings.routes[0].rate_limit_per_minute == 9


def test_without_routes_one_scheduler_owns_everything(tmp_path: Path) -> None:
    document = deep_merge(base_config(tmp_path), {"metrics": {"enabled": False}})
    relay = app.Relay(config.from_mapping(document, "x", environ={}))
    (only,) = relay.scheduler.schedulers.values()
    assert only._ready.owns is None  # no sender lookups at all
    assert not relay.metrics.per_mailbox

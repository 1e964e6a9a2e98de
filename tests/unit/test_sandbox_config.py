"""The sandbox's settings: built-in defaults, a file on top, the transport kept to maildir."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from relayd import config
from relayd.app import Relay
from relayd.ops.metrics import Metrics
from tests.helpers import CLIENT_ID, TENANT_ID


def test_defaults_need_no_microsoft_account_and_live_under_the_sandbox_directory(
    tmp_path: Path,
) -> None:
    settings = config.sandbox(environ={"RELAYD_SANDBOX_DIR": str(tmp_path / "box")})
    assert settings.upstream.transport == "maildir"
    assert settings.upstream.mailbox == ""
    assert settings.spool.directory == tmp_path / "box" / "spool"
    assert settings.upstream.maildir == tmp_path / "box" / "maildir"
    assert settings.oauth.token_cache == tmp_path / "box" / "token_cache.json"
    assert (settings.listen.address, settings.listen.port) == ("localhost", 2525)
    assert (settings.metrics.address, settings.metrics.port) == ("127.0.0.1", 2526)
    assert str(tmp_path / "box") in settings.source


def test_without_the_variable_the_directory_is_relayd_sandbox_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = config.sandbox(environ={})
    assert settings.spool.directory == tmp_path / "relayd-sandbox" / "spool"
    assert settings.spool.directory.is_absolute()


def test_a_file_applies_on_top_but_never_turns_the_transport_back_to_smtp(tmp_path: Path) -> None:
    path = tmp_path / "staging.yaml"
    document = {
        "listen": {"port": 2600},
        "upstream": {"transport": "smtp", "mailbox": "relay@example.com", "from_rewrite": False},
        "oauth": {"tenant_id": TENANT_ID, "client_id": CLIENT_ID},
        "spool": None,  # an empty section keeps the sandbox's keys
    }
    path.write_text(yaml.safe_dump(document))
    environ = {
        "RELAYD_SANDBOX_DIR": str(tmp_path / "box"),
        "RELAYD_UPSTREAM_TRANSPORT": "smtp",
        "RELAYD_METRICS_PORT": "2700",
    }
    settings = config.sandbox(path, environ)
    assert settings.upstream.transport == "maildir"
    assert settings.upstream.mailbox == "relay@example.com"  # the sender policy still applies
    assert settings.upstream.from_rewrite is False
    assert settings.listen.port == 2600
    assert settings.metrics.port == 2700  # environment overrides still apply
    assert settings.spool.directory == tmp_path / "box" / "spool"
    assert settings.source == str(path)


def test_a_bad_file_is_reported_with_its_name_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstream: [not, a, mapping]\n")
    with pytest.raises(config.ConfigError) as raised:
        config.sandbox(path, environ={})
    assert (raised.value.source, raised.value.key) == (str(path), "upstream")


def test_sighup_reloads_through_the_sandbox_so_the_file_may_lack_an_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAYD_SANDBOX_DIR", str(tmp_path / "box"))
    path = tmp_path / "staging.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"transport": "smtp"}}))  # no mailbox, no oauth
    relay = Relay(
        config.sandbox(path),
        config_path=path,
        loader=config.sandbox,
        metrics=Metrics(process=False),
    )
    root_level = logging.getLogger().level
    try:
        path.write_text(
            yaml.safe_dump({"upstream": {"transport": "smtp"}, "logging": {"level": "debug"}})
        )
        relay.reload()  # config.load would refuse this file: smtp needs upstream.mailbox
    finally:
        logging.getLogger().setLevel(root_level)
    assert relay.settings.logging.level == "debug"
    assert relay.settings.upstream.transport == "maildir"

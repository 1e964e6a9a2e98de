"""Configuration: parsing, defaults, environment overrides, secrets and clear errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relayd import config
from relayd.config import ConfigError, Secret
from relayd.units import format_duration, format_size, parse_duration, parse_size
from tests.helpers import CLIENT_ID, REPO, TENANT_ID

EXAMPLE = REPO / "config" / "relayd.example.yaml"
MAILDIR_ONLY = {"upstream": {"transport": "maildir"}}


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    return path


def test_units_accept_the_documented_forms() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("1h") == 3600
    assert parse_duration("5d") == 5 * 86400
    assert parse_duration(12) == 12
    assert parse_duration("0.5s") == 0.5
    assert parse_size("35MiB") == 35 * 1024 * 1024
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size(1000) == 1000
    assert format_duration(86400) == "1d"
    assert format_size(35 * 1024 * 1024) == "35MiB"
    for bad in ("soon", "5 parsecs", "-3s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("huge", "12 apples", False):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_defaults_match_the_issue(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, MAILDIR_ONLY), environ={})
    assert settings.listen.address == "localhost"  # 127.0.0.1 and ::1: config.listen_hosts
    assert settings.listen.port == 2525
    assert settings.listen.max_message_size == 35 * 1024 * 1024
    assert settings.listen.max_recipients == 500
    assert ipaddress.ip_address("127.0.0.1") in settings.listen.allowed_clients[0]
    assert settings.upstream.host == "smtp.office365.com"
    assert settings.upstream.port == 587
    assert settings.upstream.max_connections == 3
    assert settings.upstream.rate_limit_per_minute == 30
    assert settings.retry.min_delay == 60
    assert settings.retry.max_delay == 3600
    assert settings.retry.max_age == 5 * 86400
    assert settings.oauth.scopes == ("https://outlook.office.com/SMTP.Send",)


def test_shipped_example_passes_check_config_as_is() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["listen"]["port"] == 2525
    assert shown["oauth"]["authority"].startswith("https://login.microsoftonline.com/")


def test_authority_defaults_to_the_tenant(tmp_path: Path) -> None:
    document = {
        "upstream": {"mailbox": "relay@example.com"},
        "oauth": {"tenant_id": "contoso.onmicrosoft.com", "client_id": CLIENT_ID},
    }
    settings = config.load(write(tmp_path, document), environ={})
    assert (
        settings.oauth.effective_authority
        == "https://login.microsoftonline.com/contoso.onmicrosoft.com"
    )


def test_environment_overrides_every_key(tmp_path: Path) -> None:
    environ = {
        "RELAYD_LISTEN_PORT": "2600",
        "RELAYD_LISTEN_ALLOWED_CLIENTS": "127.0.0.1/32, 10.0.0.0/8",
        "RELAYD_RETRY_MAX_AGE": "2d",
        "RELAYD_UPSTREAM_FROM_REWRITE": "false",
        "RELAYD_LISTEN_MAX_MESSAGE_SIZE": "10MiB",
    }
    settings = config.load(write(tmp_path, MAILDIR_ONLY), environ=environ)
    assert settings.listen.port == 2600
    assert [str(n) for n in settings.listen.allowed_clients] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert settings.retry.max_age == 2 * 86400
    assert settings.upstream.from_rewrite is False
    assert settings.listen.max_message_size == 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("document", "key", "words"),
    [
        ({"listen": {"port": "abc"}}, "listen.port", "whole number"),
        ({"listen": {"port": 70000}}, "listen.port", "65535"),
        ({"listen": {"prot": 25}}, "listen.prot", "unknown key"),
        ({"lsten": {}}, "lsten", "unknown section"),
        ({"listen": {"idle_timeout": "forever"}}, "listen.idle_timeout", "duration"),
        ({"listen": {"max_message_size": "big"}}, "listen.max_message_size", "size"),
        ({"listen": {"allowed_clients": ["localhost"]}}, "listen.allowed_clients", "CIDR"),
        ({"listen": {"bare_line_endings": "ignore"}}, "listen.bare_line_endings", "one of"),
        ({"listen": []}, "listen", "mapping"),
        ({"retry": {"min_delay": "2h", "max_delay": "1h"}}, "retry.min_delay", "max_delay"),
    ],
)
def test_bad_values_name_the_file_and_the_key(
    tmp_path: Path, document: dict, key: str, words: str
) -> None:
    path = write(tmp_path, {**MAILDIR_ONLY, **document})
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert caught.value.key == key
    assert str(path) in str(caught.value)
    assert words in str(caught.value)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, MAILDIR_ONLY), environ={"RELAYD_LISTEN_PORT": "x"})
    assert "RELAYD_LISTEN_PORT" in str(caught.value)
    assert caught.value.key == "listen.port"


# Waits where 0 would close every session at once (listen.idle_timeout), fail every
# upstream or Entra ID call (the timeouts), or repeat one without a pause (the rest).
WAITS_THAT_CANNOT_BE_ZERO = [
    ("listen", "idle_timeout"),
    ("upstream", "timeout"),
    ("upstream", "data_timeout"),
    ("upstream", "smtp_probe_interval"),
    ("retry", "min_delay"),
    ("oauth", "keepalive_interval"),
    ("oauth", "http_timeout"),
    ("oauth", "cache_poll_interval"),
    ("oauth", "retry_min_delay"),
]


@pytest.mark.parametrize(("section", "key"), WAITS_THAT_CANNOT_BE_ZERO)
def test_a_wait_of_zero_is_refused_with_its_key(section: str, key: str) -> None:
    document = {"upstream": {"transport": "maildir"}}
    document.setdefault(section, {})[key] = "0s"
    with pytest.raises(ConfigError) as in_file:
        config.from_mapping(document, "relayd.yaml", environ={})
    variable = f"RELAYD_{section.upper()}_{key.upper()}"
    with pytest.raises(ConfigError) as in_environment:
        config.from_mapping(MAILDIR_ONLY, "relayd.yaml", environ={variable: "0"})
    for refused in (in_file.value, in_environment.value):
        assert (refused.key, refused.problem) == (f"{section}.{key}", "must be longer than 0s")
    document[section][key] = "1s"
    loaded = config.from_mapping(document, "relayd.yaml", environ={})
    assert getattr(getattr(loaded, section), key) == 1.0


def test_a_zero_stays_allowed_where_it_means_at_once_or_never() -> None:
    zeros = {
        "listen": {"shutdown_grace": "0s"},  # SIGTERM closes open sessions at once
        "upstream": {"transport": "maildir", "idle_timeout": "0s", "throttle_pause": "0s"},
        "retry": {"max_age": "0s"},  # one attempt, as Postfix's maximal_queue_lifetime = 0
        "oauth": {"refresh_margin": "0s"},
    }
    loaded = config.from_mapping(zeros, "relayd.yaml", environ={})
    assert (loaded.listen.shutdown_grace, loaded.retry.max_age) == (0.0, 0.0)


def test_smtp_transport_requires_mailbox_and_app_registration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, {}), environ={})
    assert caught.value.key == "upstream.mailbox"
    document = {"upstream": {"mailbox": "relay@example.com"}, "oauth": {"tenant_id": TENANT_ID}}
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, document), environ={})
    assert caught.value.key == "oauth.client_id"


def test_invalid_yaml_is_reported_with_a_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, "listen:\n  port: [1,\n"), environ={})
    assert "not valid YAML" in str(caught.value)
    assert caught.value.key.startswith("line")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "nope.yaml", environ={})
    assert str(caught.value) == f"{tmp_path / 'nope.yaml'}: (file): the file does not exist"


SMTP_DOCUMENT = {
    "upstream": {"mailbox": "relay@example.com"},
    "oauth": {"tenant_id": TENANT_ID, "client_id": CLIENT_ID},
}


def test_secret_from_file_and_its_errors(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cr3t-value\n")
    document = {**SMTP_DOCUMENT, "oauth": {**SMTP_DOCUMENT["oauth"]}}
    document["oauth"]["client_secret_file"] = str(secret_file)
    settings = config.load(write(tmp_path, document), environ={})
    assert isinstance(settings.oauth.client_secret, Secret)
    assert settings.oauth.client_secret.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(settings)
    document["oauth"]["client_secret_file"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, document), environ={})
    assert caught.value.key == "oauth.client_secret_file"
    assert "cannot read" in str(caught.value)


def test_secret_from_systemd_credentials(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "client_secret").write_text("from-systemd")
    settings = config.load(
        write(tmp_path, SMTP_DOCUMENT), environ={"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    assert settings.oauth.client_secret.reveal() == "from-systemd"


def test_check_config_redacts_secrets(tmp_path: Path) -> None:
    document = {**SMTP_DOCUMENT, "oauth": {**SMTP_DOCUMENT["oauth"], "client_secret": "hunter2x"}}
    path = write(tmp_path, document)
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2x" not in result.stdout + result.stderr
    assert "client_secret: <redacted>" in result.stdout


def test_check_config_exits_non_zero_with_the_problem(tmp_path: Path) -> None:
    path = write(tmp_path, {"listen": {"port": "abc"}})
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert f"{path}: listen.port: expected a whole number" in result.stderr


def test_every_key_is_documented_in_the_readme_and_the_example() -> None:
    readme = (REPO / "README.md").read_text()
    example = EXAMPLE.read_text()
    missing = []
    for section, cls in config.SECTIONS.items():
        for spec in dataclasses.fields(cls):
            if f"`{spec.name}`" not in readme:
                missing.append(f"README: {section}.{spec.name}")
            if not re.search(rf"^\s+#?\s*{spec.name}:", example, re.MULTILINE):
                missing.append(f"example: {section}.{spec.name}")
    assert missing == []


@pytest.mark.parametrize(
    ("upstream", "key", "words"),
    [
        ({"transport": "carrier-pigeon"}, "upstream.transport", "expected one of smtp, graph"),
        ({"graph_url": "http://graph.example"}, "upstream.graph_url", "must be an https:// URL"),
        ({"graph_large_messages": "maybe"}, "upstream.graph_large_messages", "true or false"),
        ({"smtp_probe_interval": "0s"}, "upstream.smtp_probe_interval", "longer than 0s"),
        ({"transport": "graph", "mailbox": ""}, "upstream.mailbox", "required"),
    ],
)
def test_the_graph_keys_are_checked(upstream: dict, key: str, words: str) -> None:
    document = {
        "upstream": {"mailbox": "relay@example.com", **upstream},
        "oauth": {"tenant_id": TENANT_ID, "client_id": CLIENT_ID},
    }
    with pytest.raises(config.ConfigError) as refused:
        config.from_mapping(document, "relayd.yaml", environ={})
    assert refused.value.key == key and words in refused.value.problem


def test_graph_needs_the_app_registration_as_smtp_does() -> None:
    document = {"upstream": {"transport": "auto", "mailbox": "relay@example.com"}}
    with pytest.raises(config.ConfigError, match=r"required when upstream\.transport=auto"):
        config.from_mapping(document, "relayd.yaml", environ={})


# --- what an operator copies in: ids, addresses, ranges, YAML ---------------------------


def test_a_port_out_of_range_says_between() -> None:
    with pytest.raises(ConfigError) as caught:
        config.from_mapping({**MAILDIR_ONLY, "listen": {"port": 70000}}, environ={})
    assert caught.value.problem == "must be between 0 and 65535, got 70000"


def test_yaml_error_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "listen:\n  port: 2525\n   address: x\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    assert caught.value.key == "line 3, column 11"
    assert "\n" not in str(caught.value)
    assert caught.value.problem.startswith("not valid YAML: mapping values are not allowed")


@pytest.mark.parametrize(
    ("oauth", "key", "words"),
    [
        ({"tenant_id": "tenant"}, "oauth.tenant_id", "neither a GUID nor a domain name"),
        ({"tenant_id": "0c7a3f5e-1d2b-4e6f-8a9b"}, "oauth.tenant_id", "Directory (tenant) ID"),
        ({"client_id": "my-app"}, "oauth.client_id", "not a GUID"),
        ({"client_id": "contoso.onmicrosoft.com"}, "oauth.client_id", "Application (client) ID"),
    ],
)
def test_entra_ids_must_have_their_shape(oauth: dict, key: str, words: str) -> None:
    document = {**SMTP_DOCUMENT, "oauth": {**SMTP_DOCUMENT["oauth"], **oauth}}
    with pytest.raises(ConfigError) as caught:
        config.from_mapping(document, environ={})
    assert caught.value.key == key
    assert caught.value.problem.startswith("invalid: ")
    assert words in caught.value.problem


@pytest.mark.parametrize("tenant", [TENANT_ID, TENANT_ID.upper(), "contoso.onmicrosoft.com"])
def test_a_guid_or_a_domain_is_a_tenant(tenant: str) -> None:
    document = {**SMTP_DOCUMENT, "oauth": {**SMTP_DOCUMENT["oauth"], "tenant_id": tenant}}
    assert config.from_mapping(document, environ={}).oauth.tenant_id == tenant


@pytest.mark.parametrize("mailbox", ["relay", "relay@localhost", "<relay@contoso.com>", "a b@c.de"])
def test_a_mailbox_that_is_not_an_address_is_invalid_not_required(mailbox: str) -> None:
    document = {**SMTP_DOCUMENT, "upstream": {"mailbox": mailbox}}
    with pytest.raises(ConfigError) as caught:
        config.from_mapping(document, environ={})
    assert caught.value.key == "upstream.mailbox"
    assert caught.value.problem.startswith(f"invalid: {mailbox!r} is not an email address")


def test_a_missing_mailbox_is_required() -> None:
    document = {**SMTP_DOCUMENT, "upstream": {}}
    with pytest.raises(ConfigError) as caught:
        config.from_mapping(document, environ={})
    assert caught.value.problem.startswith("required")


def test_send_as_entries_must_be_addresses() -> None:
    document = {**SMTP_DOCUMENT, "upstream": {"mailbox": "a@b.cd", "send_as": ["alerts"]}}
    with pytest.raises(ConfigError) as caught:
        config.from_mapping(document, environ={})
    assert caught.value.key == "upstream.send_as"


def test_localhost_means_both_loopbacks_and_other_addresses_stay_as_given(monkeypatch) -> None:
    assert config.listen_hosts("127.0.0.1") == ["127.0.0.1"]
    assert config.listen_hosts("0.0.0.0") == ["0.0.0.0"]
    assert config.listen_hosts("::1") == ["::1"]
    monkeypatch.setattr(config, "_has_ipv6_loopback", lambda: True)
    assert config.listen_hosts("localhost") == ["127.0.0.1", "::1"]
    monkeypatch.setattr(config, "_has_ipv6_loopback", lambda: False)  # IPv6 switched off
    assert config.listen_hosts("LOCALHOST") == ["127.0.0.1"]

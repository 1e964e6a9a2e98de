"""SIGHUP's rule: apply what can change live, keep what needs a restart."""

from __future__ import annotations

from relayd.config import from_mapping
from relayd.ops.reload import merge_reload

BASE = {
    "listen": {"port": 2525, "max_recipients": 100},
    "spool": {"directory": "/var/lib/relayd/spool"},
    "upstream": {"transport": "maildir", "rate_limit_per_minute": 30},
    "logging": {"level": "info", "format": "json"},
}


def settings(**overrides: dict):
    document = {name: {**BASE.get(name, {}), **overrides.get(name, {})} for name in BASE}
    return from_mapping(document, "test.yaml", environ={})


def test_live_settings_are_applied() -> None:
    new, kept = merge_reload(
        settings(),
        settings(
            listen={"max_recipients": 5, "allowed_clients": ["10.0.0.0/8"]},
            upstream={"rate_limit_per_minute": 10},
            logging={"level": "debug"},
        ),
    )
    assert kept == []
    assert new.listen.max_recipients == 5
    assert [str(n) for n in new.listen.allowed_clients] == ["10.0.0.0/8"]
    assert new.upstream.rate_limit_per_minute == 10
    assert new.logging.level == "debug"


def test_restart_only_settings_keep_their_running_values() -> None:
    running = settings()
    new, kept = merge_reload(
        running,
        settings(
            listen={"port": 2600, "max_recipients": 5},
            spool={"directory": "/elsewhere"},
            upstream={"maildir": "/other/maildir"},
            logging={"format": "console"},
        ),
    )
    assert sorted(kept) == [
        "listen.port",
        "logging.format",
        "spool.directory",
        "upstream.maildir",
    ]
    assert new.listen.port == 2525 and new.listen.max_recipients == 5
    assert new.spool == running.spool
    assert new.upstream.maildir == running.upstream.maildir
    assert new.logging.format == "json"

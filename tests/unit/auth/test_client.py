"""What Entra ID's answers mean (classify), and the token cache/state files."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from relayd.auth.outcomes import CONFIG, REAUTH, SUCCESS, TRANSIENT, classify
from relayd.auth.store import TokenStore, exposure
from relayd.config import ConfigError, from_mapping
from relayd.ops.logging import redactor


@pytest.mark.parametrize(
    ("aadsts", "words"),
    [
        (70008, "expired or was revoked"),
        (700082, "90 days"),
        (50173, "revoked"),
        (65001, "consented"),
        (50076, "multi-factor"),
    ],
)
def test_invalid_grant_needs_a_new_sign_in_and_names_the_code(aadsts: int, words: str) -> None:
    outcome = classify(
        {
            "error": "invalid_grant",
            "error_description": f"AADSTS{aadsts}: Entra's own text. Trace ID: abc Timestamp: x",
            "error_codes": [aadsts],
        }
    )
    assert (outcome.kind, outcome.aadsts, outcome.error) == (REAUTH, aadsts, "invalid_grant")
    assert outcome.explain().startswith(f"AADSTS{aadsts} (")
    assert words in outcome.explain()
    assert "Entra's own text." in outcome.explain()
    assert "Trace ID" not in outcome.explain()


def test_the_code_is_read_from_the_text_when_error_codes_are_missing() -> None:
    outcome = classify({"error": "invalid_grant", "error_description": "AADSTS50173: Revoked."})
    assert (outcome.kind, outcome.aadsts) == (REAUTH, 50173)


def test_transient_and_configuration_errors() -> None:
    assert classify({"error": "temporarily_unavailable"}).kind == TRANSIENT
    wrong_secret = classify(
        {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret."}
    )
    assert (wrong_secret.kind, wrong_secret.aadsts) == (CONFIG, 7000215)
    assert "oauth.client_secret" in wrong_secret.explain()


def test_success_registers_the_tokens_for_redaction_and_hides_them_in_repr() -> None:
    outcome = classify(
        {
            "access_token": "opaque-access-token-value",
            "refresh_token": "opaque-refresh-token-value",
            "expires_in": 3600,
            "id_token_claims": {"preferred_username": "relay@contoso.example"},
        }
    )
    assert (outcome.kind, outcome.username) == (SUCCESS, "relay@contoso.example")
    assert "opaque-access-token-value" not in repr(outcome)
    line = redactor("token opaque-access-token-value and opaque-refresh-token-value")
    assert "opaque" not in line


def test_cache_is_written_private_and_atomically(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "state" / "cache.json")
    first = store.write_cache('{"a": 1}')
    assert stat.S_IMODE(store.cache_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.cache_path.parent.stat().st_mode) == 0o700
    second = store.write_cache('{"a": 2}')
    assert first != second  # a rename gives a new inode: readers notice the change
    assert store.read_cache() == ('{"a": 2}', second)
    assert sorted(p.name for p in store.cache_path.parent.iterdir()) == ["cache.json"]
    store.write_state({"state": "ok"})
    assert store.read_state() == {"state": "ok"}
    assert stat.S_IMODE(store.state_path.stat().st_mode) == 0o600


def test_a_damaged_state_file_reads_as_nothing(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "cache.json")
    assert store.read_state() is None
    store.state_path.write_text("{not json")
    assert store.read_state() is None


def test_exposure_names_the_file_and_the_fix(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "cache.json")
    assert exposure(store.cache_path) is None  # no file yet: nothing to protect
    store.write_cache("{}")
    assert exposure(store.cache_path) is None
    store.cache_path.chmod(0o640)
    problem = exposure(store.cache_path)
    assert problem is not None
    assert "0640" in problem and f"chmod 600 {store.cache_path}" in problem


def test_lock_excludes_other_holders(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "cache.json")
    with store.locked():
        other = os.open(store.lock_path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    other = os.open(store.lock_path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after the block
    finally:
        os.close(other)


def _maildir(oauth: dict) -> dict:
    return {"upstream": {"transport": "maildir"}, "oauth": oauth}


def test_token_settings_are_checked_with_file_and_key() -> None:
    with pytest.raises(ConfigError) as wrong:
        from_mapping(_maildir({"retry_min_delay": "1h", "retry_max_delay": "1m"}), "r.yaml")
    assert (wrong.value.source, wrong.value.key) == ("r.yaml", "oauth.retry_min_delay")
    with pytest.raises(ConfigError) as zero:
        from_mapping(_maildir({"cache_poll_interval": "0s"}), "r.yaml")
    assert zero.value.key == "oauth.cache_poll_interval"

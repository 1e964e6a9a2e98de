"""The token cache's files: never through a planted link, whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relayd.auth.store import TokenStore


def test_a_symlink_planted_at_the_lock_file_is_never_followed(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens" / "token_cache.json")
    store.cache_path.parent.mkdir()
    target = tmp_path / "somewhere-else"
    store.lock_path.symlink_to(target)
    with pytest.raises(OSError), store.locked():
        pass
    assert not target.exists()  # not created, not opened
    assert store.lock_path.is_symlink()  # left for the operator to see


def test_a_fifo_at_the_lock_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "token_cache.json")
    os.mkfifo(store.lock_path)
    with pytest.raises(OSError), store.locked():
        pass


def test_the_lock_file_is_created_private_and_reused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens" / "token_cache.json")
    with store.locked():
        pass
    assert store.lock_path.stat().st_mode & 0o777 == 0o600
    with store.locked():  # opened again, not created again
        pass


def test_a_cache_write_replaces_a_planted_symlink_instead_of_writing_through_it(
    tmp_path: Path,
) -> None:
    store = TokenStore(tmp_path / "token_cache.json")
    target = tmp_path / "target"
    target.write_text("untouched")
    store.cache_path.symlink_to(target)
    store.write_cache(json.dumps({"RefreshToken": {}}))
    assert target.read_text() == "untouched"
    assert not store.cache_path.is_symlink()
    assert store.cache_path.stat().st_mode & 0o777 == 0o600

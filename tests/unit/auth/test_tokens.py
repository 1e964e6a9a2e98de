"""TokenManager against the fake Entra ID: states, refresher, keep-alive, revocation."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

from relayd.auth import store as token_store
from relayd.auth.client import MailboxMismatch
from relayd.auth.outcomes import TRANSIENT, Outcome
from relayd.auth.tokens import (
    NO_TOKEN,
    OK,
    REAUTH_REQUIRED,
    REFRESHING,
    REJECTED,
    UNAVAILABLE,
    AuthUnavailable,
    TokenManager,
)
from relayd.config import ConfigError
from relayd.ops import logging as relay_logging
from relayd.ops.metrics import Metrics
from tests.auth_helpers import cached_refresh_tokens, sign_in, token_settings
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.helpers import load_settings, unreachable_upstream


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything relayd logs (debug level, JSON lines) during the test."""
    stream = io.StringIO()
    relay_logging.configure("json", "debug", stream=stream)
    yield stream
    logging.getLogger().handlers[:] = []
    structlog.reset_defaults()


def _log_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(0.05)


class Harness:
    """A TokenManager on a test registry, stopped at the end of the test."""

    def __init__(self, tmp_path: Path, entra: FakeEntra, ca_file: Path, **oauth: str) -> None:
        self.settings = token_settings(tmp_path, entra, ca_file, oauth)
        self.ca_file = ca_file
        self.registry = CollectorRegistry()
        self.manager = TokenManager(
            self.settings, Metrics(self.registry, process=False), config_path=Path("/etc/r.yaml")
        )

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def refreshes(self, result: str) -> float:
        return self.sample("relayd_token_refresh_total", result=result) or 0.0

    def sign_in(self) -> None:
        assert sign_in(self.settings, self.ca_file).ok


@pytest.fixture
async def harness(tmp_path: Path, entra: FakeEntra, ca_file: Path):
    made: list[Harness] = []

    def make(**oauth: str) -> Harness:
        made.append(Harness(tmp_path, entra, ca_file, **oauth))
        return made[-1]

    yield make
    for item in made:
        await item.manager.stop()


HarnessFactory = Callable[..., Harness]


async def test_starts_without_sign_in_and_picks_up_a_later_login(
    harness: HarnessFactory, entra: FakeEntra
) -> None:
    h = harness()
    await h.manager.start()
    assert h.manager.state == NO_TOKEN
    assert h.sample("relayd_auth_state", state="no_token") == 1
    assert h.sample("relayd_auth_healthy") == 0
    with pytest.raises(AuthUnavailable) as refused:
        await h.manager.access_token()
    assert "relayd auth login -c /etc/r.yaml" in refused.value.detail

    waiter = asyncio.create_task(h.manager.wait_until_usable())
    h.sign_in()  # as `relayd auth login` in another process would
    await asyncio.wait_for(waiter, 10)
    token = await h.manager.access_token()
    assert entra.is_valid_access_token(MAILBOX, token)
    assert h.manager.state == OK
    assert h.sample("relayd_auth_healthy") == 1
    await eventually(lambda: (h.manager.store.read_state() or {}).get("state") == OK)


async def test_keepalive_rotates_the_refresh_token_with_no_mail(
    harness: HarnessFactory, entra: FakeEntra
) -> None:
    h = harness(keepalive_interval="1s")
    h.sign_in()
    cache = h.settings.oauth.token_cache
    first = cached_refresh_tokens(cache)
    await h.manager.start()
    rotated_before = h.sample("relayd_refresh_token_last_rotated_timestamp_seconds")
    await eventually(lambda: h.refreshes("success") >= 2)
    on_disk = cached_refresh_tokens(cache)
    assert on_disk.isdisjoint(first)
    assert entra.latest_refresh_token() in on_disk or h.refreshes("success") > 2
    assert on_disk <= entra.valid_refresh_tokens(MAILBOX)
    assert h.sample("relayd_refresh_token_last_rotated_timestamp_seconds") > rotated_before
    assert oct(cache.stat().st_mode & 0o777) == "0o600"


async def test_access_token_is_renewed_before_it_expires(
    harness: HarnessFactory, entra: FakeEntra
) -> None:
    entra.access_token_lifetime = 4  # renewed at half its life when that is under the margin
    h = harness()
    h.sign_in()
    await h.manager.start()
    first = await h.manager.access_token()
    await eventually(lambda: h.refreshes("success") >= 1)
    second = await h.manager.access_token()
    assert second != first
    assert entra.is_valid_access_token(MAILBOX, second)
    assert entra.requests["token:refresh_token"] >= 1
    expiry = h.sample("relayd_access_token_expiry_timestamp_seconds")
    assert expiry is not None and expiry > time.time()


async def test_transient_failures_retry_with_growing_backoff(
    harness: HarnessFactory, entra: FakeEntra, log_output: io.StringIO
) -> None:
    h = harness(keepalive_interval="1s")
    h.sign_in()
    # Retry-After: 0 keeps MSAL's HTTP throttle cache out of the way, so each retry
    # really reaches the fake and the count below is exact.
    entra.fail_next(3, status=500, retry_after=0)
    await h.manager.start()
    await eventually(lambda: h.refreshes("success") >= 1)
    assert h.refreshes("transient") == 3
    assert entra.requests["failed"] == 3
    retries = [
        line["retry_in_seconds"]
        for line in _log_lines(log_output)
        if line["event"].startswith("cannot renew")
    ]
    assert retries == sorted(retries) and retries[0] < retries[-1]
    assert h.sample("relayd_auth_healthy") == 1  # the cached access token served meanwhile


async def test_unavailable_when_entra_is_down_and_no_token_is_left(
    harness: HarnessFactory, entra: FakeEntra
) -> None:
    entra.access_token_lifetime = 1
    h = harness()
    h.sign_in()
    await asyncio.sleep(1.1)  # the only cached access token expires
    entra.down = True
    await h.manager.start()
    await eventually(lambda: h.manager.state == UNAVAILABLE)
    with pytest.raises(AuthUnavailable) as refused:
        await h.manager.access_token()
    assert refused.value.state == UNAVAILABLE
    assert h.sample("relayd_auth_healthy") == 0
    entra.down = False
    entra.access_token_lifetime = 3600
    await asyncio.wait_for(h.manager.wait_until_usable(), 10)
    assert entra.is_valid_access_token(MAILBOX, await h.manager.access_token())


async def test_revocation_requires_sign_in_and_says_how(
    harness: HarnessFactory, entra: FakeEntra, log_output: io.StringIO
) -> None:
    h = harness(keepalive_interval="0.3s")
    h.sign_in()
    await h.manager.start()
    await eventually(lambda: h.refreshes("success") >= 1)
    entra.revoke_refresh_tokens(code=50173)
    await eventually(lambda: h.manager.state == REAUTH_REQUIRED)
    with pytest.raises(AuthUnavailable) as refused:
        await h.manager.access_token()  # even though the old access token has not expired
    assert refused.value.state == REAUTH_REQUIRED
    await asyncio.sleep(0.5)  # several refresher rounds: the ERROR must not repeat
    errors = [line for line in _log_lines(log_output) if line["level"] == "error"]
    assert len(errors) == 1
    assert "AADSTS50173" in errors[0]["event"]
    assert "revoked" in errors[0]["event"]
    assert "relayd auth login -c /etc/r.yaml" in errors[0]["event"]
    assert h.refreshes("reauth") == 1
    state = h.manager.store.read_state() or {}
    assert (state.get("state"), state.get("aadsts")) == (REAUTH_REQUIRED, 50173)

    h.sign_in()
    await asyncio.wait_for(h.manager.wait_until_usable(), 10)
    assert h.manager.state in (OK, REFRESHING)  # the short keep-alive may be under way
    assert h.sample("relayd_auth_healthy") == 1
    assert entra.is_valid_access_token(MAILBOX, await h.manager.access_token())


async def test_a_restart_remembers_the_revocation_without_asking_again(
    harness: HarnessFactory, entra: FakeEntra
) -> None:
    first = harness(keepalive_interval="0.3s")
    first.sign_in()
    await first.manager.start()
    entra.revoke_refresh_tokens(code=700082)
    await eventually(lambda: first.manager.state == REAUTH_REQUIRED)
    await first.manager.stop()
    asked = entra.requests["token:refresh_token"]

    second = harness(keepalive_interval="0.3s")
    await second.manager.start()
    assert second.manager.state == REAUTH_REQUIRED
    assert "AADSTS700082" in second.manager.advice()
    await asyncio.sleep(0.5)
    assert entra.requests["token:refresh_token"] == asked


async def test_stop_ends_the_refresher_even_as_a_cache_change_wakes_it(
    harness: HarnessFactory,
) -> None:
    """A stop in the same loop turn as a wake-up (a cache change) still ends the
    refresher: on Python 3.11 asyncio.wait_for swallowed that cancellation (CPython
    gh-86296), the refresher ran on and stop() never returned."""
    manager = harness(cache_poll_interval="5s").manager
    await manager.start()
    await asyncio.sleep(0.2)  # the refresher is waiting for a wake-up or 5 s
    manager._wake.set()  # as a cache change written by `relayd auth login` does
    stopping = asyncio.ensure_future(manager.stop())
    done, _ = await asyncio.wait([stopping], timeout=3)
    assert done, "stop() did not return: the refresher ignored its cancellation"


async def test_rejected_token_is_replaced_once_then_state_follows_upstream(
    harness: HarnessFactory, entra: FakeEntra
) -> None:
    h = harness()
    h.sign_in()
    await h.manager.start()
    old = await h.manager.access_token()
    await h.manager.token_rejected(old, "535 5.7.3 Authentication unsuccessful")
    new = await h.manager.access_token()
    assert new != old and entra.is_valid_access_token(MAILBOX, new)
    calls = entra.requests["token:refresh_token"]
    await h.manager.token_rejected(old, "535 5.7.3 Authentication unsuccessful")  # stale
    assert entra.requests["token:refresh_token"] == calls

    h.manager.mark_rejected("535 5.7.3 Authentication unsuccessful")
    assert h.manager.state == REJECTED
    assert h.sample("relayd_auth_state", state="rejected") == 1
    assert await h.manager.access_token() == new  # delivery may still try, with backoff
    h.manager.mark_accepted()
    assert h.manager.state == OK


async def test_refuses_a_cache_readable_by_others(harness: HarnessFactory, tmp_path: Path) -> None:
    h = harness()
    h.sign_in()
    cache = h.settings.oauth.token_cache
    cache.chmod(0o644)
    with pytest.raises(ConfigError) as refused:
        await h.manager.start()
    assert refused.value.key == "oauth.token_cache"
    assert f"chmod 600 {cache}" in str(refused.value)


async def test_sign_in_as_another_user_is_refused_and_changes_nothing(
    harness: HarnessFactory, entra: FakeEntra
) -> None:
    h = harness()
    entra.signin_user = "someone.else@contoso.example"
    with pytest.raises(MailboxMismatch) as refused:
        h.sign_in()
    assert "535 5.7.3" in str(refused.value)
    assert not h.settings.oauth.token_cache.exists()


# --- issue 12: backoff ceiling, a token cache the disk will not take, unsafe directories ---


def standalone_manager(tmp_path: Path, oauth: dict | None = None) -> TokenManager:
    """A TokenManager that never reaches a network (for its arithmetic and start checks)."""
    overrides = unreachable_upstream(tmp_path)
    overrides["oauth"].update(oauth or {})
    settings = load_settings(tmp_path, overrides)
    return TokenManager(settings, Metrics(CollectorRegistry(), process=False))


def test_backoff_has_a_ceiling_for_any_number_of_failures(tmp_path: Path) -> None:
    """Ten days of an expired client secret are about a thousand failures: 2**1000 once
    overflowed a float, and the refresher then spun. (A configured delay is a float;
    the built-in default, an int, hid it.)"""
    manager = standalone_manager(tmp_path, {"retry_min_delay": "15s"})
    tokens = manager.source("smtp")
    tokens._failures = 10_000
    before = time.time()
    tokens.fail(Outcome(TRANSIENT, "ConnectionError: connection refused"))
    assert tokens._failures == 10_001
    assert before < tokens._retry_at <= time.time() + manager.oauth.retry_max_delay


def test_backoff_doubles_from_the_minimum_up_to_the_maximum() -> None:
    from relayd.auth.source import backoff

    assert [backoff(n, 1.0, 100.0) for n in (1, 2, 3, 8)] == [1.0, 2.0, 4.0, 100.0]
    assert backoff(10**9, 15.0, 900.0) == 900.0


async def test_a_token_cache_directory_others_may_write_refuses_the_start(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    manager = standalone_manager(tmp_path, {"token_cache": str(shared / "token_cache.json")})
    with pytest.raises(ConfigError) as refused:
        await manager.load()
    source = manager._source
    assert str(refused.value) == (
        f"{source}: oauth.token_cache: {shared} is writable by others (mode 0777); "
        f"run: chmod 700 {shared}"
    )


async def test_a_cache_that_cannot_be_written_keeps_the_new_tokens_and_retries_the_write(
    harness: HarnessFactory,
    entra: FakeEntra,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = harness(keepalive_interval="1h", retry_min_delay="0.05s", retry_max_delay="0.2s")
    h.sign_in()
    cache = h.settings.oauth.token_cache
    signed_in = cached_refresh_tokens(cache)
    await h.manager.start()
    old_token = await h.manager.access_token()
    disk = {"full": True}
    real_write = token_store.write_private

    def write_private(path: Path, data: bytes) -> None:
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(token_store, "write_private", write_private)
    redeemed = entra.requests["token:refresh_token"]
    # Entra ID rotates the refresh token; the disk is full.
    await h.manager.refresh(h.manager.source("smtp"), "keep-alive")

    new_token = await h.manager.access_token()  # the fresh tokens are used at once
    assert new_token != old_token and entra.is_valid_access_token(MAILBOX, new_token)
    assert h.manager.state == OK
    assert h.refreshes("storage") >= 1 and h.refreshes("transient") == 0
    events = [line for line in _log_lines(log_output) if line["level"] == "error"]
    assert events and events[0]["event"].startswith("cannot save the token cache")
    assert "No space left on device" in events[0]["problem"]
    assert not any(line["event"].startswith("cannot renew") for line in _log_lines(log_output))
    await asyncio.sleep(0.5)  # several retries of the write while the disk is still full
    assert cached_refresh_tokens(cache) == signed_in
    disk["full"] = False
    await eventually(lambda: cached_refresh_tokens(cache) != signed_in)
    assert entra.requests["token:refresh_token"] == redeemed + 1  # never redeemed again
    assert cached_refresh_tokens(cache) == {entra.latest_refresh_token()}
    assert any(line["event"] == "token cache saved" for line in _log_lines(log_output))

"""Fault injection at every file-system call of the token store and client (the
spool's and the Maildir's: test_fault_injection.py; the injector: tests/faults.py).

The operation: two keep-alive redemptions (each: lock, catch up with the file, rotate
the refresh token, write the cache) and the auth state file after each. Every call in
turn fails (the daemon goes on: tokens it could not save are written once the disk is
fine) or is the last before a crash (each state a crash may leave is checked). The
invariant: no rotated refresh token is lost. The cache file is the old one or the new
one, whole, and never older than one a returned write holds; after a failed write the
newest is in memory and reaches the file.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from relayd.auth.client import TokenClient
from relayd.auth.outcomes import STORAGE, SUCCESS
from relayd.auth.store import TokenStore
from relayd.config import Settings
from tests.fakes.entra import CLIENT_ID, TENANT_ID
from tests.faults import Crash, Injector, Tally, points
from tests.helpers import load_settings

MAILBOX = "relay@example.com"


# --- the token store --------------------------------------------------------------------

HOME, CLOUD = "uid.utid", "login.example"


def cache_document(refresh_token: str) -> str:
    """A token cache as MSAL serializes it: one account and its refresh token."""
    return json.dumps(
        {
            "Account": {
                f"{HOME}-{CLOUD}-utid": {
                    "home_account_id": HOME,
                    "environment": CLOUD,
                    "realm": "utid",
                    "local_account_id": "uid",
                    "username": MAILBOX,
                    "authority_type": "MSSTS",
                }
            },
            "RefreshToken": {
                f"{HOME}-{CLOUD}-refreshtoken-{CLIENT_ID}--": {
                    "credential_type": "RefreshToken",
                    "secret": refresh_token,
                    "home_account_id": HOME,
                    "environment": CLOUD,
                    "client_id": CLIENT_ID,
                    "target": "",
                    "last_modification_time": "1700000000",
                }
            },
            "AccessToken": {},
            "IdToken": {},
            "AppMetadata": {},
        }
    )


def refresh_token_in(text: str | None) -> str | None:
    if text is None:
        return None
    tokens = json.loads(text)["RefreshToken"]
    return next(iter(tokens.values()))["secret"]


class RotatingEntra:
    """Stands in for the MSAL application: every redemption rotates the refresh token
    in the client's in-memory cache, as Entra ID does (REFERENCE.md)."""

    def __init__(self, client: TokenClient) -> None:
        self.client = client

    def acquire_token_silent_with_error(self, scopes, account, force_refresh=False) -> dict:
        cache = self.client.cache
        (entry,) = cache.search(cache.CredentialType.REFRESH_TOKEN)
        number = int(entry["secret"].removeprefix("RT")) + 1
        cache.update_rt(entry, f"RT{number}")
        return {"access_token": f"AT{number}", "expires_in": 3600, "token_type": "Bearer"}


class TokenWorld:
    """The daemon's token client and what it was told was saved."""

    def __init__(self, settings: Settings) -> None:
        self.store = TokenStore(settings.oauth.token_cache)
        self.client = TokenClient(settings.oauth, MAILBOX, self.store)
        self.client._app = RotatingEntra(self.client)
        self.acked: str | None = "RT1"  # the newest refresh token known to be on disk
        self.state_acked: int = 1

    def refresh(self) -> None:
        outcome = self.client.refresh()
        assert outcome.kind in (SUCCESS, STORAGE), outcome  # never "Entra unreachable"
        if outcome.kind == SUCCESS:
            self.acked = self.newest()

    def newest(self) -> str:
        (entry,) = self.client.cache.search(self.client.cache.CredentialType.REFRESH_TOKEN)
        return entry["secret"]


def token_setup(settings: Settings) -> None:
    store = TokenStore(settings.oauth.token_cache)
    store.write_cache(cache_document("RT1"))
    store.write_state({"state": "ok", "n": 1})


def token_operation(world: TokenWorld) -> None:
    """Two keep-alive redemptions (each: lock, catch up, rotate, write the cache), and
    the auth state file written after each, as the daemon does."""
    for number in (2, 3):
        world.refresh()
        try:
            world.store.write_state({"state": "ok", "n": number})
            world.state_acked = number
        except OSError:
            pass


def token_violations(settings: Settings, world: TokenWorld | None, acked: str | None) -> list[str]:
    """The cache file is whole and holds the newest refresh token known saved (or a
    newer one); the state file is whole JSON."""
    store = TokenStore(settings.oauth.token_cache)
    found = []
    try:
        text, _ = store.read_cache()
        on_disk = refresh_token_in(text)
    except (ValueError, KeyError, StopIteration) as error:
        return [f"token cache damaged: {error!r}"]
    if on_disk is None:
        found.append("token cache file gone")
    elif acked and int(on_disk[2:]) < int(acked[2:]):
        found.append(f"rotated refresh token lost: {acked} was saved, the file has {on_disk}")
    if world is not None and on_disk != world.newest():
        found.append(f"memory has {world.newest()}, the file {on_disk} after the disk was fine")
    if store.read_state() is None:
        found.append("auth state file damaged or gone")
    with store.locked():  # no stale lock, no damaged lock file
        pass
    return found


def test_every_file_system_call_of_the_token_store_fails_and_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(
        tmp_path,
        {
            "upstream": {"mailbox": MAILBOX},
            "oauth": {
                "tenant_id": TENANT_ID,
                "client_id": CLIENT_ID,
                "token_cache": str(tmp_path / "tokens" / "token_cache.json"),
            },
        },
    )
    root = settings.oauth.token_cache.parent
    injector = Injector([root]).install(monkeypatch)
    tally = Tally()

    def fresh() -> TokenWorld:
        shutil.rmtree(root, ignore_errors=True)
        token_setup(settings)
        return TokenWorld(settings)

    world = fresh()
    injector.run(lambda: token_operation(world))
    calls = list(injector.calls)
    assert calls and world.acked == "RT3" and not token_violations(settings, world, "RT3")
    tally.points = len(calls)
    reached: set[int] = set()
    for fault in points(calls):
        tally.runs += 1
        world = fresh()
        where = f"token store: {fault.kind} at {calls[fault.index]}"
        try:
            injector.run(functools.partial(token_operation, world), fault)
        except Crash:
            reached.add(fault.index)
            for label, image in injector.crash_states():
                tally.crash_states += 1
                injector.restore(image)
                found = token_violations(settings, None, world.acked)
                tally.found += [f"{where} ({label}): {v}" for v in found]
            continue
        if injector.fired is None or injector.fired.name != calls[fault.index].name:
            tally.found.append(f"{where}: call not reached as recorded")
            continue
        reached.add(fault.index)
        if world.client.unsaved:  # the daemon retries the write, not the redemption
            world.client.save()
        tally.found += [f"{where}: {v}" for v in token_violations(settings, world, world.acked)]
    tally.ran = len(reached)
    print(
        f"fault injection (token store): {tally.points} injection points enumerated, "
        f"{tally.ran} run, {tally.runs} runs ({tally.crash_states} crash states), "
        f"{len(tally.found)} invariant violations"
    )
    assert tally.points > 0 and tally.ran == tally.points and tally.runs >= tally.points * 2
    assert tally.found == [], "\n".join(tally.found[:40])

"""Delegated OAuth 2.0 tokens for one sending mailbox (MSAL), as delivery sees them.

Delivery depends only on the ``TokenSource`` protocol (``relayd.auth.source``), one per
resource: SMTP AUTH, Microsoft Graph, Graph drafts for large messages. A
``TokenManager`` serves every resource one mailbox needs from one sign-in: it loads
the cache, keeps each access token fresh ahead of its expiry, redeems the refresh
token every ``oauth.keepalive_interval`` even when no mail flows (refresh tokens die
after 90 days unused), retries Entra ID outages with backoff, and notices a sign-in
made by ``relayd auth login`` in another process. It holds nothing keyed by the
mailbox outside itself, so a relay with several mailboxes runs one manager for each.
MSAL work runs in a thread (``relayd.auth.client``); files are in ``relayd.auth.store``.

The manager is also the ``TokenSource`` of its *lead* resource (the one the transport
uses now): the auth state in the metrics and at the top of the state file is the
lead's; every resource's own state is in the state file's ``resources``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import structlog

from relayd.auth.client import CacheView, TokenClient
from relayd.auth.outcomes import NO_ACCOUNT, REAUTH, STORAGE, Outcome
from relayd.auth.resources import Resource, resources_for, smtp_resource
from relayd.auth.source import (
    CONSENT_MISSING,
    AuthUnavailable,
    ResourceTokens,
    TokenSource,
    backoff,
)
from relayd.auth.store import CacheStorageError, TokenStore, exposure, stamp_to_json
from relayd.config import ConfigError, Settings
from relayd.ops.auth_states import (
    BLOCKED_STATES,
    NO_TOKEN,
    OK,
    REAUTH_REQUIRED,
    REFRESHING,
    REJECTED,
    UNAVAILABLE,
)
from relayd.ops.metrics import Metrics

__all__ = [
    "BLOCKED_STATES",
    "NO_TOKEN",
    "OK",
    "REAUTH_REQUIRED",
    "REFRESHING",
    "REJECTED",
    "UNAVAILABLE",
    "AuthUnavailable",
    "ResourceTokens",
    "TokenManager",
    "TokenSource",
]

log = structlog.get_logger("relayd.tokens")

STATE_WRITE_TIMEOUT = 10.0  # seconds stop() waits for the last auth state write


class TokenManager:
    """Every token one mailbox needs: cache, refresher, auth states, the state file."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        config_path: Path | None = None,
        client: TokenClient | None = None,
        resources: tuple[Resource, ...] | None = None,
        login_mailbox: str | None = None,
        cache_setting: str = "oauth.token_cache",
    ) -> None:
        """``login_mailbox``: a route's mailbox (not upstream.mailbox), named in the
        sign-in command this manager advises (``--mailbox``); ``cache_setting``: the
        key that names its cache in errors (a route's: ``routes[N].token_cache``)."""
        self.cache_setting = cache_setting
        self.oauth = settings.oauth
        self.mailbox = settings.upstream.mailbox
        self.metrics = metrics
        self._source = settings.source
        self.store = TokenStore(self.oauth.token_cache)
        self.client = client or TokenClient(self.oauth, self.mailbox, self.store)
        self.login_command = f"relayd auth login -c {config_path or settings.source}"
        if login_mailbox:
            self.login_command += f" --mailbox {login_mailbox}"
        chosen = resources or resources_for(settings) or (smtp_resource(settings),)
        self.slots = {resource.name: ResourceTokens(self, resource) for resource in chosen}
        self._lead = next(iter(self.slots.values()))
        # One TokenClient call at a time: it holds MSAL's in-memory cache, not thread-safe.
        self._client_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._state_dirty = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._save_failures = 0  # writes of tokens kept in memory that failed (disk)
        self._save_at = math.inf
        metrics.set_auth_state(NO_TOKEN)

    def source(self, name: str) -> ResourceTokens:
        """The ``TokenSource`` of one resource ("smtp", "graph", "graph_large")."""
        return self.slots[name]

    def has(self, name: str) -> bool:
        return name in self.slots

    def lead_with(self, name: str) -> None:
        """The transport now depends on ``name`` (auto moved to Graph, or back)."""
        if name in self.slots and self.slots[name] is not self._lead:
            self._lead = self.slots[name]
            self.shown(self._lead)
            self.state_changed(self._lead)

    # --- TokenSource of the lead resource ---------------------------------------------

    @property
    def state(self) -> str:
        return self._lead.state

    async def access_token(self) -> str:
        return await self._lead.access_token()

    async def token_rejected(self, token: str, reply: str) -> None:
        await self._lead.token_rejected(token, reply)

    def mark_rejected(self, reply: str) -> None:
        self._lead.mark_rejected(reply)

    def mark_accepted(self) -> None:
        self._lead.mark_accepted()

    async def wait_until_usable(self) -> None:
        await self._lead.wait_until_usable()

    def advice(self) -> str:
        return self._lead.advice()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check and load the cache (no network), then start the refresher."""
        await self.load()
        self._tasks = [
            asyncio.create_task(self._refresher(), name="token-refresher"),
            asyncio.create_task(self._state_writer(), name="auth-state-writer"),
        ]

    async def load(self) -> None:
        """Check and load the cache (no network), without the background tasks: alone,
        for one-off commands (`relayd send-test --direct`), which must neither refresh
        in the background nor write the daemon's auth state file."""
        problem = exposure(self.store.cache_path)
        if problem:
            raise ConfigError(self._source, self.cache_setting, f"refusing to start: {problem}")
        problem = self.store.directory_exposure()
        if problem:
            raise ConfigError(self._source, self.cache_setting, problem)
        views = await self._in_thread(self._reload)
        previous = await asyncio.to_thread(self.store.read_state) or {}
        self._adopt(views, startup=True)
        if previous.get("cache") != stamp_to_json(self.client.stamp):
            return
        for slot in self.slots.values():
            before = self._previous_state(previous, slot)
            if before.get("state") == REAUTH_REQUIRED and slot.view.account:
                # The last run saw Entra refuse this very cache: do not redeem it again.
                outcome = Outcome(REAUTH, before.get("detail") or "", before.get("aadsts"))
                slot.fail(outcome)

    def _previous_state(self, previous: dict[str, Any], slot: ResourceTokens) -> dict[str, Any]:
        resources = previous.get("resources")
        if isinstance(resources, dict):
            return resources.get(slot.name) or {}
        return previous if slot is next(iter(self.slots.values())) else {}

    async def stop(self) -> None:
        """Stop the refresher; the cache is already persisted after every change."""
        if not self._tasks:
            return  # never started (start-up refused): leave the state file as it was
        refresher, writer = self._tasks
        self._tasks = []
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await refresher
        if self.client.unsaved:  # a last chance for a rotated refresh token
            with contextlib.suppress(Exception):
                await self._save()
        # The writer finishes its last write itself: cancelling it mid-write could let
        # an older document land on disk after the final one.
        self._closing = True
        self._state_dirty.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(writer, STATE_WRITE_TIMEOUT)

    def state_document(self) -> dict[str, Any]:
        """The auth state file's content, read by `relayd auth status`: the lead's state
        at the top (as before there were several resources), each resource's below."""
        lead = self._lead
        return {
            **{key: value for key, value in lead.document().items() if key != "scopes"},
            "lead": lead.name,
            "account": lead.view.account,
            "refresh_token_rotated_at": lead.view.rotated_at,
            "resources": {name: slot.document() for name, slot in self.slots.items()},
            "cache": stamp_to_json(self.client.stamp),
            "pid": os.getpid(),
            "updated_at": time.time(),
        }

    # --- the refresher ------------------------------------------------------------------

    async def _refresher(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # a bug must not stop the keep-alive for good
                log.exception("token refresher step failed")
            delay = min(self._next_due() - time.time(), self.oauth.cache_poll_interval)
            await self._wait_for_wake(max(0.0, delay))
            self._wake.clear()

    async def _wait_for_wake(self, seconds: float) -> None:
        """Until a cache change wakes the refresher, or for ``seconds``.

        Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that arrives
        as its timeout fires (CPython gh-86296), and stop() then waited for ever on a
        refresher that kept running. asyncio.wait never cancels on a timeout."""
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([woken], timeout=seconds)
        finally:
            woken.cancel()

    async def _tick(self) -> None:
        if self.client.changed_on_disk():  # one stat(): `relayd auth` wrote the cache
            self._adopt(await self._in_thread(self._reload))
        if self.client.unsaved and time.time() >= self._save_at:
            await self._save()
        for slot in self.slots.values():
            now = time.time()
            if now >= slot.next_due():
                keepalive = slot.keepalive_due() <= now
                await self.refresh(slot, "keep-alive" if keepalive else "access token expiring")

    def _next_due(self) -> float:
        due = min(slot.next_due() for slot in self.slots.values())
        return min(due, self._save_at) if self.client.unsaved else due

    async def refresh(self, slot: ResourceTokens, reason: str, replace: str | None = None) -> None:
        """Redeem the refresh token for ``slot``'s resource (one caller at a time)."""
        async with self._client_lock:
            if replace is not None and replace != slot.token:
                return  # another delivery already caused a renewal
            if reason == "expired" and slot.token_usable():
                return
            slot.refreshing()
            outcome = await asyncio.to_thread(self.client.refresh, slot.scopes)
            views = await asyncio.to_thread(self._views)
        self.metrics.token_refresh.labels(outcome.kind).inc()
        if outcome.ok or (outcome.kind == STORAGE and outcome.access_token):
            # STORAGE with a token: Entra ID rotated the tokens, the disk did not take
            # them. They are good: use them, keep them in memory, retry the write.
            slot.succeed(views[slot.name], reason)
            for other in self.slots.values():
                if other is not slot:  # the shared refresh token was rotated
                    other.rotated(views[other.name].rotated_at)
            if outcome.kind == STORAGE:
                self._not_saved(outcome.detail)
            elif not self.client.unsaved:
                self._save_failures, self._save_at = 0, math.inf
        elif outcome.kind == NO_ACCOUNT:
            self._adopt(views)
        elif outcome.kind == REAUTH and outcome.aadsts != CONSENT_MISSING:
            # The refresh token itself was refused: the sign-in is gone for every
            # resource. One ERROR line says so, not one per resource.
            slot.fail(outcome)
            for other in self.slots.values():
                if other is not slot:
                    other.fail(outcome, announce=False)
        else:
            slot.fail(outcome)

    # --- tokens the cache file could not take ---------------------------------------------

    def _not_saved(self, detail: str) -> None:
        """The refresh worked, the write did not: keep the tokens, retry the write (with
        the refresh backoff), never the redemption."""
        self._save_failures += 1
        oauth = self.oauth
        delay = backoff(self._save_failures, oauth.retry_min_delay, oauth.retry_max_delay)
        self._save_at = time.time() + delay
        self._wake.set()  # the refresher's next wake-up is now the write's retry
        log.error(
            "cannot save the token cache; the new tokens are kept in memory and the write "
            "is retried (free space or make it writable: a restart before then loses the "
            "rotated refresh token)",
            problem=detail,
            file=str(self.store.cache_path),
            attempt=self._save_failures,
            retry_in_seconds=round(delay, 3),
        )

    async def _save(self) -> None:
        try:
            async with self._client_lock:
                await asyncio.to_thread(self.client.save)
        except CacheStorageError as error:
            self.metrics.token_refresh.labels(STORAGE).inc()
            self._not_saved(f"token cache: {error.strerror or error}")
            return
        if self._save_failures:
            log.info("token cache saved", file=str(self.store.cache_path))
        self._save_failures, self._save_at = 0, math.inf

    # --- cache changes --------------------------------------------------------------------

    def _views(self) -> dict[str, CacheView]:
        return {name: self.client.view(slot.scopes) for name, slot in self.slots.items()}

    def _reload(self) -> dict[str, CacheView]:
        self.client.reload()
        return self._views()

    async def _in_thread(self, function: Any) -> dict[str, CacheView]:
        async with self._client_lock:
            return await asyncio.to_thread(function)

    def _adopt(self, views: dict[str, CacheView], startup: bool = False) -> None:
        """Take over what the cache file holds (at start, or written by `relayd auth`)."""
        before = self._lead.state
        view = views[self._lead.name]
        for name, slot in self.slots.items():
            slot.adopt(views[name])
        if view.account is None:
            if view.others:
                log.error(
                    f"the token cache holds {', '.join(view.others)}, not upstream.mailbox "
                    f"{self.mailbox}: run {self.login_command}"
                )
            elif startup:
                log.warning(f"mail stays queued until someone signs in: {self.advice()}")
            elif before != NO_TOKEN:
                log.info("the token cache no longer holds an account (signed out)")
            return
        if startup:
            log.info("token cache loaded", account=view.account, file=str(self.store.cache_path))
        else:
            log.info("token cache changed by another process; using it", account=view.account)
        self._wake.set()

    # --- what the resources report ------------------------------------------------------

    def shown(self, slot: ResourceTokens) -> None:
        """``slot`` took a new view of the cache: export the lead's."""
        if slot is not self._lead:
            return
        self.metrics.access_token_expiry.set(slot.view.expires_at)
        if slot.view.rotated_at:
            self.metrics.refresh_token_rotated.set(slot.view.rotated_at)

    def state_changed(self, slot: ResourceTokens) -> None:
        if slot is self._lead:
            self.metrics.set_auth_state(slot.state)
        self._state_dirty.set()

    async def _state_writer(self) -> None:
        """One writer for the state file, so the last state always wins on disk."""
        while True:
            await self._state_dirty.wait()
            self._state_dirty.clear()
            try:
                await asyncio.to_thread(self.store.write_state, self.state_document())
            except OSError as error:
                log.warning("cannot write the auth state file", error=str(error))
            if self._closing and not self._state_dirty.is_set():
                return

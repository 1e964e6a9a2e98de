"""Delegated OAuth 2.0 tokens for the sending mailbox (MSAL), as delivery sees them.

Delivery depends only on the ``TokenSource`` protocol below. ``TokenManager``
implements it for the daemon: it loads the cache, keeps the access token fresh ahead
of its expiry, redeems the refresh token every ``oauth.keepalive_interval`` even when
no mail flows (refresh tokens die after 90 days unused), retries Entra ID outages with
backoff, and notices a sign-in made by ``relayd auth login`` in another process.
MSAL work runs in a thread (``relayd.auth.client``); files are in ``relayd.auth.store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import structlog

from relayd.auth.client import (
    CONFIG,
    NO_ACCOUNT,
    REAUTH,
    REAUTH_CODES,
    STORAGE,
    CacheView,
    Outcome,
    TokenClient,
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

log = structlog.get_logger("relayd.tokens")

STATE_WRITE_TIMEOUT = 10.0  # seconds stop() waits for the last auth state write
# 2**30 × retry_min_delay is far beyond any retry_max_delay: the exponent stops there,
# so a secret expired for weeks (thousands of failures) never overflows a float.
MAX_BACKOFF_EXPONENT = 30


def backoff(failures: int, min_delay: float, max_delay: float) -> float:
    """min_delay × 2^(failures − 1), at most max_delay, for any number of failures."""
    exponent = min(max(failures - 1, 0), MAX_BACKOFF_EXPONENT)
    return min(max_delay, min_delay * 2**exponent)


class AuthUnavailable(Exception):
    """No usable access token right now. Deliveries wait; mail is never bounced for it."""

    def __init__(self, state: str, detail: str) -> None:
        super().__init__(f"{state}: {detail}")
        self.state, self.detail = state, detail


class TokenSource(Protocol):
    """What delivery needs from the token module."""

    @property
    def state(self) -> str:
        """One of AUTH_STATES."""
        ...

    async def access_token(self) -> str:
        """A valid access token for XOAUTH2 (usually cached). Raises AuthUnavailable."""
        ...

    async def token_rejected(self, token: str, reply: str) -> None:
        """The upstream answered 535 5.7.3 to ``token``: drop it and refresh once.

        The next ``access_token()`` returns the fresh token. Delivery calls
        ``mark_rejected`` if the fresh token is refused as well.
        """
        ...

    def mark_rejected(self, reply: str) -> None:
        """A fresh token was refused too: state REJECTED, logged loudly, until a new
        sign-in or a later successful authentication (``mark_accepted``)."""
        ...

    def mark_accepted(self) -> None:
        """The upstream accepted a token (235): the state is OK again."""
        ...

    async def wait_until_usable(self) -> None:
        """Return when the state changes away from a blocked one (e.g. after login)."""
        ...


class TokenManager:
    """The daemon's ``TokenSource``: cache, refresher task and auth state."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        config_path: Path | None = None,
        client: TokenClient | None = None,
    ) -> None:
        self.oauth = settings.oauth
        self.mailbox = settings.upstream.mailbox
        self.metrics = metrics
        self._source = settings.source
        self.store = TokenStore(self.oauth.token_cache)
        self.client = client or TokenClient(self.oauth, self.mailbox, self.store)
        self.login_command = f"relayd auth login -c {config_path or settings.source}"
        self._state = NO_TOKEN
        self._view = CacheView(None, (), None, 0.0, 0.0, None)
        self._problem: Outcome | None = None
        self._last_refresh: float | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._save_failures = 0  # writes of tokens kept in memory that failed (disk)
        self._save_at = math.inf
        # One TokenClient call at a time: it holds MSAL's in-memory cache, not thread-safe.
        self._client_lock = asyncio.Lock()
        self._usable = asyncio.Event()  # set while the state is not in BLOCKED_STATES
        self._wake = asyncio.Event()
        self._state_dirty = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        metrics.set_auth_state(NO_TOKEN)

    # --- TokenSource ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    async def access_token(self) -> str:
        if self._state in (NO_TOKEN, REAUTH_REQUIRED):
            raise AuthUnavailable(self._state, self.advice())
        if not self._token_usable() and self._state != UNAVAILABLE:
            await self._refresh("expired")  # unusual: the refresher renews ahead of expiry
        if self._token_usable() and self._view.token:
            return self._view.token
        raise AuthUnavailable(self._state, self.advice())

    async def token_rejected(self, token: str, reply: str) -> None:
        log.warning("upstream refused the access token; renewing it", reply=reply)
        await self._refresh("rejected by upstream", replace=token)

    def mark_rejected(self, reply: str) -> None:
        if self._state != REJECTED:
            log.error(
                "Exchange Online refused a freshly issued token too: check that SMTP AUTH is "
                f"enabled for {self.mailbox} (Set-CASMailbox -Identity {self.mailbox} "
                "-SmtpClientAuthenticationDisabled $false) and that the app has SMTP.Send; "
                f"then sign in again: {self.login_command}",
                reply=reply,
            )
        self._set_state(REJECTED)

    def mark_accepted(self) -> None:
        if self._state == REJECTED:
            log.info("upstream accepts the token again")
            self._set_state(OK)

    async def wait_until_usable(self) -> None:
        await self._usable.wait()

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
            raise ConfigError(self._source, "oauth.token_cache", f"refusing to start: {problem}")
        problem = self.store.directory_exposure()
        if problem:
            raise ConfigError(self._source, "oauth.token_cache", problem)
        view = await self._in_thread(self._reload)
        previous = await asyncio.to_thread(self.store.read_state) or {}
        self._adopt(view, startup=True)
        if (
            previous.get("state") == REAUTH_REQUIRED
            and previous.get("cache") == stamp_to_json(self.client.stamp)
            and view.account
        ):  # the last run saw Entra refuse this very cache: do not redeem it again
            self._fail(Outcome(REAUTH, previous.get("detail", ""), previous.get("aadsts")))

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

    # --- what a person reads ------------------------------------------------------------

    def advice(self) -> str:
        if self._state == NO_TOKEN:
            return f"nobody has signed in as {self.mailbox}: run {self.login_command}"
        if self._state == REAUTH_REQUIRED and self._problem is not None:
            return f"{self._problem.explain().rstrip('.')}. Sign in again: {self.login_command}"
        if self._problem is not None:
            return f"Entra ID token endpoint failing ({self._problem.explain()}); retrying"
        return f"state {self._state}"

    def state_document(self) -> dict[str, Any]:
        """The auth state file's content, read by `relayd auth status`."""
        problem = self._problem
        return {
            "state": self._state,
            "account": self._view.account,
            "aadsts": problem.aadsts if problem else None,
            "detail": problem.detail if problem else None,
            "advice": self.advice() if self._state != OK else None,
            "access_token_expires_at": self._view.expires_at or None,
            "refresh_token_rotated_at": self._view.rotated_at,
            "last_refresh": self._last_refresh,
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
        now = time.time()
        if self.client.unsaved and now >= self._save_at:
            await self._save()
        if now >= self._next_due():
            keepalive = self._keepalive_due() <= now
            await self._refresh("keep-alive" if keepalive else "access token expiring")

    def _next_due(self) -> float:
        if self.client.unsaved:  # the write is retried, never the redemption
            return min(self._save_at, self._refresh_due())
        return self._refresh_due()

    def _refresh_due(self) -> float:
        if self._state in (NO_TOKEN, REAUTH_REQUIRED):
            # Only a new sign-in (a cache change) helps. Asking again would not even reach
            # Entra ID: MSAL answers a repeated request from its 60-second cache of 400s.
            return math.inf
        if self._failures:
            return self._retry_at
        view = self._view
        lifetime = max(0.0, view.expires_at - view.issued_at)
        renew_at = view.expires_at - min(self.oauth.refresh_margin, lifetime / 2)
        return min(renew_at, self._keepalive_due())

    def _keepalive_due(self) -> float:
        return (self._view.rotated_at or 0.0) + self.oauth.keepalive_interval

    async def _refresh(self, reason: str, replace: str | None = None) -> None:
        async with self._client_lock:
            if replace is not None and replace != self._view.token:
                return  # another delivery already caused a renewal
            if reason == "expired" and self._token_usable():
                return
            if self._state == OK:
                self._set_state(REFRESHING)
            outcome = await asyncio.to_thread(self.client.refresh)
            view = await asyncio.to_thread(self.client.view)
        self.metrics.token_refresh.labels(outcome.kind).inc()
        if outcome.ok:
            self._succeed(view, reason)
        elif outcome.kind == STORAGE and outcome.access_token:
            self._succeed(view, reason)  # the new tokens are good: use them
            self._not_saved(outcome.detail)
        elif outcome.kind == NO_ACCOUNT:
            self._adopt(view)
        else:
            self._fail(outcome)

    def _succeed(self, view: CacheView, reason: str) -> None:
        self._failures, self._problem, self._last_refresh = 0, None, time.time()
        if not self.client.unsaved:
            self._save_failures, self._save_at = 0, math.inf
        self._show(view)
        log.info(
            "access token renewed",
            reason=reason,
            account=view.account,
            expires_in_seconds=round(view.expires_at - time.time()),
        )
        self._set_state(REJECTED if self._state == REJECTED else OK)

    def _fail(self, outcome: Outcome) -> None:
        self._problem = outcome
        if outcome.kind == REAUTH:
            self._view = CacheView(self._view.account, (), None, 0.0, 0.0, self._view.rotated_at)
            self.metrics.access_token_expiry.set(0)
            if self._state != REAUTH_REQUIRED:
                log.error(self._reauth_message(outcome), aadsts=outcome.aadsts)
            self._set_state(REAUTH_REQUIRED)
            return
        self._failures += 1
        delay = backoff(self._failures, self.oauth.retry_min_delay, self.oauth.retry_max_delay)
        if outcome.kind == CONFIG:  # only a configuration change helps: retry slowly
            delay = self.oauth.retry_max_delay
        self._retry_at = time.time() + delay
        level = log.error if outcome.kind in (CONFIG, STORAGE) else log.warning
        level(
            "cannot use the token cache file; retrying"
            if outcome.kind == STORAGE
            else "cannot renew the access token; retrying",
            problem=outcome.explain(),
            attempt=self._failures,
            retry_in_seconds=round(delay, 3),
        )
        if not self._token_usable():
            self._set_state(UNAVAILABLE)
        elif self._state == REFRESHING:  # the cached token still serves meanwhile
            self._set_state(OK)

    # --- tokens the cache file could not take ---------------------------------------------

    def _not_saved(self, detail: str) -> None:
        """The refresh worked, the write did not: keep the tokens, retry the write."""
        self._save_failures += 1
        delay = backoff(self._save_failures, self.oauth.retry_min_delay, self.oauth.retry_max_delay)
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

    def _reauth_message(self, outcome: Outcome) -> str:
        meaning = REAUTH_CODES.get(outcome.aadsts or 0, "the sign-in is no longer valid")
        return (
            f"Entra ID refused the refresh token: AADSTS{outcome.aadsts} ({meaning}). "
            f"Deliveries are paused and mail stays queued. Sign in again: {self.login_command}"
        )

    # --- cache changes --------------------------------------------------------------------

    def _reload(self) -> CacheView:
        self.client.reload()
        return self.client.view()

    async def _in_thread(self, function: Any) -> CacheView:
        async with self._client_lock:
            return await asyncio.to_thread(function)

    def _adopt(self, view: CacheView, startup: bool = False) -> None:
        """Take over what the cache file holds (at start, or written by `relayd auth`)."""
        before = self._state
        self._show(view)
        self._failures, self._problem = 0, None
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
            self._set_state(NO_TOKEN)
            return
        if startup:
            log.info("token cache loaded", account=view.account, file=str(self.store.cache_path))
        else:
            log.info("token cache changed by another process; using it", account=view.account)
        self._set_state(OK if self._token_usable() else REFRESHING)
        self._wake.set()

    def _show(self, view: CacheView) -> None:
        self._view = view
        self.metrics.access_token_expiry.set(view.expires_at)
        if view.rotated_at:
            self.metrics.refresh_token_rotated.set(view.rotated_at)

    def _token_usable(self) -> bool:
        """A cached token with a useful time left (a quarter of its life, at most 60 s)."""
        view = self._view
        needed = min(60.0, (view.expires_at - view.issued_at) / 4)
        return view.token is not None and view.expires_at - time.time() > needed

    # --- state ----------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self._state:
            log.debug("auth state", state=state, previous=self._state)
        self._state = state
        self.metrics.set_auth_state(state)
        if state in BLOCKED_STATES:
            self._usable.clear()
        else:
            self._usable.set()
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

"""One resource's access token as delivery sees it: the ``TokenSource`` protocol and
``ResourceTokens``, the auth state of one token (SMTP AUTH, Graph, Graph drafts).

A ``TokenManager`` (``relayd.auth.tokens``) owns one ``ResourceTokens`` per resource
that the transport needs, and the things they share: the token cache, the MSAL client,
the refresher and the auth state file. Each resource has its own state because Entra
ID can refuse one and not another (AADSTS65001: no consent for that permission) and an
upstream can refuse one token and not the other (SMTP AUTH disabled, Graph fine).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from relayd.auth.client import CacheView
from relayd.auth.outcomes import CONFIG, REAUTH, REAUTH_CODES, STORAGE, Outcome, failure_text
from relayd.auth.resources import Resource
from relayd.ops.auth_states import (
    BLOCKED_STATES,
    NO_TOKEN,
    OK,
    REAUTH_REQUIRED,
    REFRESHING,
    REJECTED,
    UNAVAILABLE,
)

if TYPE_CHECKING:
    from relayd.auth.tokens import TokenManager

log = structlog.get_logger("relayd.tokens")

CONSENT_MISSING = 65001  # AADSTS65001: the one resource lacks consent, the sign-in is fine
EMPTY_VIEW = CacheView(None, (), None, 0.0, 0.0, None)
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
    """What delivery needs from the token module, for one resource."""

    @property
    def state(self) -> str:
        """One of AUTH_STATES."""
        ...

    async def access_token(self) -> str:
        """A valid access token (usually cached). Raises AuthUnavailable."""
        ...

    async def token_rejected(self, token: str, reply: str) -> None:
        """The upstream refused ``token`` (535 5.7.3, Graph's 401): drop it and refresh
        once. The next ``access_token()`` returns the fresh token. Delivery calls
        ``mark_rejected`` if the fresh token is refused as well.
        """
        ...

    def mark_rejected(self, reply: str) -> None:
        """A fresh token was refused too: state REJECTED, logged loudly, until a new
        sign-in or a later successful authentication (``mark_accepted``)."""
        ...

    def mark_accepted(self) -> None:
        """The upstream accepted a token: the state is OK again."""
        ...

    async def wait_until_usable(self) -> None:
        """Return when the state changes away from a blocked one (e.g. after login)."""
        ...


class ResourceTokens:
    """The access token and auth state of one resource; a ``TokenSource``."""

    def __init__(self, manager: TokenManager, resource: Resource) -> None:
        self.manager = manager
        self.resource = resource
        self.scopes = list(resource.scopes)
        self.oauth = manager.oauth
        self._state = NO_TOKEN
        self._view = EMPTY_VIEW
        self._problem: Outcome | None = None
        self._last_refresh: float | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._rejection = ""  # the upstream's last refusal of a fresh token
        self._usable = asyncio.Event()  # set while the state is not in BLOCKED_STATES

    @property
    def name(self) -> str:
        return self.resource.name

    # --- TokenSource ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    async def access_token(self) -> str:
        if self._state in (NO_TOKEN, REAUTH_REQUIRED):
            raise AuthUnavailable(self._state, self.advice())
        if not self.token_usable() and self._state != UNAVAILABLE:
            await self.manager.refresh(self, "expired")  # the refresher renews ahead of time
        if self.token_usable() and self._view.token:
            return self._view.token
        raise AuthUnavailable(self._state, self.advice())

    async def token_rejected(self, token: str, reply: str) -> None:
        log.warning("upstream refused the access token; renewing it", reply=reply)
        await self.manager.refresh(self, "rejected by upstream", replace=token)

    def mark_rejected(self, reply: str) -> None:
        self._rejection = reply
        if self._state != REJECTED:
            log.error(self._rejected_message(), reply=reply, resource=self.name)
        self._set_state(REJECTED)

    def mark_accepted(self) -> None:
        if self._state == REJECTED:
            log.info("upstream accepts the token again", resource=self.name)
            self._set_state(OK)

    async def wait_until_usable(self) -> None:
        await self._usable.wait()

    # --- what a person reads ------------------------------------------------------------

    def advice(self) -> str:
        login, mailbox = self.manager.login_command, self.manager.mailbox
        problem = self._problem
        if self._state == NO_TOKEN:
            return f"nobody has signed in as {mailbox}: run {login}"
        if self._state == REAUTH_REQUIRED and problem is not None:
            if problem.aadsts == CONSENT_MISSING:
                return f"AADSTS{CONSENT_MISSING}: {self.resource.consent_advice(login)}"
            return f"{problem.explain().rstrip('.')}. Sign in again: {login}"
        if self._state == REJECTED:
            return f"{self._rejected_message()} (refused with: {self._rejection})"
        if problem is not None:
            return f"{failure_text(problem, self.oauth.effective_authority)}; retrying"
        return f"state {self._state}"

    def document(self) -> dict[str, Any]:
        """This resource's part of the auth state file."""
        problem = self._problem
        return {
            "state": self._state,
            "scopes": self.scopes,
            "aadsts": problem.aadsts if problem else None,
            "detail": problem.detail if problem else None,
            "advice": self.advice() if self._state != OK else None,
            "access_token_expires_at": self._view.expires_at or None,
            "last_refresh": self._last_refresh,
        }

    def _rejected_message(self) -> str:
        mailbox, login = self.manager.mailbox, self.manager.login_command
        if self.name == "smtp" and "5.7.139" in self._rejection:
            # Not the token: a new sign-in does not help (auto sends through Graph).
            return (
                f"Exchange Online refuses SMTP AUTH for {mailbox} (535 5.7.139): it is"
                " disabled for the tenant or the mailbox; an administrator enables it with"
                f" Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false"
            )
        if self.name == "smtp":
            return (
                "Exchange Online refused a freshly issued token too: check that SMTP AUTH is "
                f"enabled for {mailbox} (Set-CASMailbox -Identity {mailbox} "
                "-SmtpClientAuthenticationDisabled $false) and that the app has SMTP.Send; "
                f"then sign in again: {login}"
            )
        return (
            f"Microsoft Graph refused a freshly issued token too: check that the app has the"
            f" delegated permission {self.resource.permissions} with consent granted, and"
            f" that {mailbox} has an Exchange Online mailbox; then sign in again: {login}"
        )

    # --- schedule ------------------------------------------------------------------------

    def next_due(self) -> float:
        if self._state in (NO_TOKEN, REAUTH_REQUIRED):
            # Only a new sign-in (a cache change) helps. Asking again would not even reach
            # Entra ID: MSAL answers a repeated request from its 60-second cache of 400s.
            return float("inf")
        if self._failures:
            return self._retry_at
        view = self._view
        lifetime = max(0.0, view.expires_at - view.issued_at)
        renew_at = view.expires_at - min(self.oauth.refresh_margin, lifetime / 2)
        return min(renew_at, self.keepalive_due())

    def keepalive_due(self) -> float:
        return (self._view.rotated_at or 0.0) + self.oauth.keepalive_interval

    def token_usable(self) -> bool:
        """A cached token with a useful time left (a quarter of its life, at most 60 s)."""
        view = self._view
        needed = min(60.0, (view.expires_at - view.issued_at) / 4)
        return view.token is not None and view.expires_at - time.time() > needed

    @property
    def token(self) -> str | None:
        return self._view.token

    @property
    def view(self) -> CacheView:
        return self._view

    # --- what the manager tells it -------------------------------------------------------

    def refreshing(self) -> None:
        if self._state == OK:
            self._set_state(REFRESHING)

    def rotated(self, rotated_at: float | None) -> None:
        """A sibling redeemed the shared refresh token: only its age changed here."""
        self._view = CacheView(
            self._view.account,
            self._view.others,
            self._view.token,
            self._view.issued_at,
            self._view.expires_at,
            rotated_at,
        )

    def adopt(self, view: CacheView) -> None:
        """The cache file changed (a sign-in, or at start): start afresh from it."""
        self._show(view)
        self._failures, self._problem = 0, None
        if view.account is None:
            self._set_state(NO_TOKEN)
        else:
            self._set_state(OK if self.token_usable() else REFRESHING)

    def succeed(self, view: CacheView, reason: str) -> None:
        self._failures, self._problem, self._last_refresh = 0, None, time.time()
        self._show(view)
        log.info(
            "access token renewed",
            reason=reason,
            account=view.account,
            resource=self.name,
            expires_in_seconds=round(view.expires_at - time.time()),
        )
        self._set_state(REJECTED if self._state == REJECTED else OK)

    def fail(self, outcome: Outcome, announce: bool = True) -> None:
        self._problem = outcome
        if outcome.kind == REAUTH:
            self._show(CacheView(self._view.account, (), None, 0.0, 0.0, self._view.rotated_at))
            if self._state != REAUTH_REQUIRED and announce:
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
            _retry_event(outcome),
            problem=outcome.explain(),
            resource=self.name,
            attempt=self._failures,
            retry_in_seconds=round(delay, 3),
        )
        if not self.token_usable():
            self._set_state(UNAVAILABLE)
        elif self._state == REFRESHING:  # the cached token still serves meanwhile
            self._set_state(OK)

    def _reauth_message(self, outcome: Outcome) -> str:
        login = self.manager.login_command
        if outcome.aadsts == CONSENT_MISSING:
            return (
                f"Entra ID refused the token for {self.resource.purpose}: AADSTS65001"
                f" ({self.resource.consent_advice(login)}). Mail that needs it waits."
            )
        meaning = REAUTH_CODES.get(outcome.aadsts or 0, "the sign-in is no longer valid")
        return (
            f"Entra ID refused the refresh token: AADSTS{outcome.aadsts} ({meaning}). "
            f"Deliveries are paused and mail stays queued. Sign in again: {login}"
        )

    def _show(self, view: CacheView) -> None:
        self._view = view
        self.manager.shown(self)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            log.debug("auth state", state=state, previous=self._state, resource=self.name)
        self._state = state
        if state in BLOCKED_STATES:
            self._usable.clear()
        else:
            self._usable.set()
        self.manager.state_changed(self)


def _retry_event(outcome: Outcome) -> str:
    """The log line's event: what failed, in the words an operator searches for."""
    if outcome.kind == STORAGE:  # a local disk problem, not Entra ID's
        return "cannot use the token cache file; retrying"
    if outcome.unreachable:
        return "cannot reach Entra ID; retrying"
    return "cannot renew the access token; retrying"

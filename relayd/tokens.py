"""Delegated OAuth 2.0 tokens for the sending mailbox (MSAL), as delivery sees them.

Delivery depends only on the ``TokenSource`` protocol below; the MSAL-backed
implementation, the cache and the refresher live in this module too.
"""

from __future__ import annotations

from typing import Protocol

# Auth states, as exported in relayd_auth_state{state} and shown by `relayd auth status`.
OK = "ok"  # a usable access token is cached or can be obtained silently
REFRESHING = "refreshing"  # a refresh is under way
NO_TOKEN = "no_token"  # noqa: S105 (a state name) — nobody has signed in yet: run `relayd auth login`
REAUTH_REQUIRED = "reauth_required"  # invalid_grant (expired/revoked): sign in again
UNAVAILABLE = "unavailable"  # token endpoint unreachable or failing: retried by itself
REJECTED = "rejected"  # upstream refused a fresh token (535 5.7.3 twice)
AUTH_STATES = (OK, REFRESHING, NO_TOKEN, REAUTH_REQUIRED, UNAVAILABLE, REJECTED)


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

"""A stand-in for the token module: a ``TokenSource`` whose tokens the fake Exchange checks.

It issues opaque random tokens and remembers which are valid, so the fake Exchange
can ask ``is_valid_access_token(user, token)`` just as it will ask the fake Entra ID.
Switches let a test revoke the current token (the refresh-once path), refuse every
token (the mark-rejected path) or make tokens unavailable (the waiting path).
Its tokens are deliberately not registered with the log redactor, so a test can
prove that delivery itself never prints one.
"""

from __future__ import annotations

import asyncio
import secrets

from relayd.auth import tokens as auth


class StandInTokens:
    """Implements ``relayd.tokens.TokenSource`` for tests."""

    def __init__(
        self, mailbox: str, scopes: tuple[str, ...] = ("https://outlook.office.com/SMTP.Send",)
    ) -> None:
        self.mailbox = mailbox
        self.scopes = scopes  # what each token is for (the fake Graph checks it)
        self._state = auth.OK
        self._valid: set[str] = set()
        self.issued: list[str] = []
        self._current = self._issue()
        self.refuse_all = False
        self.unavailable: str | None = None
        self.rejections: list[str] = []  # replies given to token_rejected
        self.rejected_marks: list[str] = []  # replies given to mark_rejected
        self.accepted = 0
        self._usable: asyncio.Event | None = None  # made on first use, inside the loop

    # --- TokenSource ---------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    async def access_token(self) -> str:
        if self.unavailable:
            raise auth.AuthUnavailable(self.unavailable, "stand-in token source switched off")
        return self._current

    async def token_rejected(self, token: str, reply: str) -> None:
        self.rejections.append(reply)
        if token == self._current:
            self._valid.discard(token)
            self._current = self._issue()

    def mark_rejected(self, reply: str) -> None:
        self.rejected_marks.append(reply)
        self._set_state(auth.REJECTED)

    def mark_accepted(self) -> None:
        self.accepted += 1
        self._set_state(auth.OK)

    async def wait_until_usable(self) -> None:
        """As TokenManager: returns while the state is not one of BLOCKED_STATES."""
        if self._usable is None:
            self._usable = asyncio.Event()
            self._set_state(self._state)
        await self._usable.wait()

    # --- for the fake Exchange -------------------------------------------------------

    def is_valid_access_token(self, user: str, token: str) -> bool:
        return user == self.mailbox and token in self._valid and not self.refuse_all

    def grant(self, token: str) -> tuple[str, str, tuple[str, ...]] | None:
        """(user, resource, scopes) as the fake Entra ID's ``token_grant`` answers."""
        if not self.is_valid_access_token(self.mailbox, token):
            return None
        return self.mailbox, self.scopes[0].rsplit("/", 1)[0], self.scopes

    # --- switches ----------------------------------------------------------------------

    @property
    def current(self) -> str:
        return self._current

    def revoke_current(self) -> None:
        """The upstream refuses the current token; a refresh yields a good one."""
        self._valid.discard(self._current)

    def make_unavailable(self, state: str = auth.REAUTH_REQUIRED) -> None:
        self.unavailable = state
        self._set_state(state)

    def make_available(self) -> None:
        """A person signed in again: a fresh token, state OK, waiters released."""
        self.unavailable = None
        self.refuse_all = False
        self._current = self._issue()
        self._set_state(auth.OK)

    def _set_state(self, state: str) -> None:
        self._state = state
        if self._usable is not None:
            if state in auth.BLOCKED_STATES:
                self._usable.clear()
            else:
                self._usable.set()

    def _issue(self) -> str:
        token = f"standin.{secrets.token_urlsafe(24)}"
        self._valid.add(token)
        self.issued.append(token)
        return token

"""A fake Microsoft Entra ID (v2.0 endpoints) on a real HTTPS socket, for MSAL to talk to.

MSAL reaches it through its normal HTTP stack (``requests``) with
``oauth.authority=https://127.0.0.1:PORT/<tenant>`` and ``oauth.ca_file`` pointing at
the test CA. It serves what MSAL and a browser use:

- ``GET  /<tenant>/v2.0/.well-known/openid-configuration``
- ``GET  /<tenant>/oauth2/v2.0/authorize`` → 302 to the redirect URI with code + state
- ``POST /<tenant>/oauth2/v2.0/token`` (authorization_code with PKCE, refresh_token
  with rotation, device_code)
- ``POST /<tenant>/oauth2/v2.0/devicecode``

Switches let a test revoke refresh tokens (everyone's, or one user's), make the token
endpoint fail with 5xx, take the whole service down, or shorten the access-token
lifetime.

Several users: ``FakeEntra(ca, users=(...))`` or ``add_user``. At the browser step the
person signs in as the account MSAL named in ``login_hint`` when that is a known user;
without a hint (or an unknown one) as ``signin_user`` (the default user), as before.
Setting ``signin_user`` makes the person sign in as that account whatever the hint
(someone who types another address). Each user's tokens are their own, the ID token's
``preferred_username`` is that user, and ``revoke_refresh_tokens(user=...)`` /
``revoke_sessions(user)`` touch only that user's grants. Everything it issued is
recorded so a test can check a token (``is_valid_access_token``, used by the fake
Exchange server too) or prove that none leaked. All public methods are thread-safe.

Consent and resources work as Entra's do: the user consents in the browser (or at the
device login page) to the scopes that were asked for, minus any ``withhold_consent``
names; a token request names the scopes of one resource (two: AADSTS28000), and a
scope nobody consented to answers ``invalid_grant`` with AADSTS65001. Each access token
remembers its resource and scopes (``token_grant``), so the fake Exchange and the fake
Graph can refuse a token issued for the other API, as the real ones do.

The endpoints' logic is in entra_endpoints.py, the HTTP server and the browser a test
plays in entra_http.py; this module holds the state, the switches and the fixture.
"""

from __future__ import annotations

import collections
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from tests.fakes.entra_endpoints import RESERVED_SCOPES, EntraEndpoints, _Grant, _scopes, _User
from tests.fakes.entra_http import Handler, TLSServer, follow_redirect, sign_in_in_browser

__all__ = ["CLIENT_ID", "MAILBOX", "TENANT_ID", "FakeEntra", "entra"]
__all__ += ["follow_redirect", "sign_in_in_browser"]  # the browser (entra_http.py)

TENANT_ID = "0c7a3f5e-1d2b-4e6f-8a9b-0c1d2e3f4a5b"
CLIENT_ID = "5d3e1a2b-7c4f-4a6e-9b8d-1e2f3a4b5c6d"
MAILBOX = "relay@contoso.example"

SMTP_SEND = "https://outlook.office.com/SMTP.Send"


class FakeEntra(EntraEndpoints):
    """The fake identity provider. Use the ``entra`` fixture, or ``with FakeEntra(ca):``."""

    def __init__(
        self,
        ca: trustme.CA,
        *,
        tenant_id: str = TENANT_ID,
        client_id: str = CLIENT_ID,
        user: str = MAILBOX,
        users: tuple[str, ...] = (),
    ) -> None:
        self.tenant_id, self.client_id = tenant_id, client_id
        self.client_secret = "fake-secret~" + secrets.token_urlsafe(24)
        self._cert = ca.issue_cert("127.0.0.1", "localhost")
        self._lock = threading.Lock()
        self._users: dict[str, _User] = {}
        self._known: set[str] = {user.lower(), *(u.lower() for u in users)}  # login_hint
        self._codes: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}
        self._access: dict[str, tuple[str, float]] = {}  # token → (user, expires_at)
        self._grants: dict[str, tuple[str, tuple[str, ...]]] = {}  # token → (resource, scopes)
        self._consents: dict[str, set[str]] = {}  # user → scopes consented to
        self._withheld: set[str] = set()  # scopes the user declines in the browser
        self._devices: dict[str, _Grant] = {}  # device_code → grant (user "" = pending)
        self._user_codes: dict[str, str] = {}  # user_code → device_code
        self._issued: set[str] = {self.client_secret}
        # --- switches ---
        self._default_user = user  # who signs in without a (known) login_hint
        self._forced_user: str | None = None  # who signs in whatever the hint
        self.access_token_lifetime = 3600  # seconds; Entra gives 60-90 min
        self.refresh_token_lifetime = 90 * 86400
        self.down = False  # drop every connection without a word
        self._failures: list[tuple[int, int | None]] = []  # (status, retry_after) per request
        self.revocation_code = 50173
        # --- observations ---
        self.requests: collections.Counter[str] = collections.Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeEntra:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        self._server = TLSServer(("127.0.0.1", 0), Handler, fake=self, context=context)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeEntra:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def authority(self) -> str:
        """The value for ``oauth.authority``."""
        return f"{self.base_url}/{self.tenant_id}"

    def oauth_config(self, ca_file: Path, *, secret: bool = True) -> dict:
        """The ``oauth:`` section of a relayd config that points at this fake."""
        section = {
            "tenant_id": self.tenant_id,
            "client_id": self.client_id,
            "authority": self.authority,
            "ca_file": str(ca_file),
        }
        if secret:
            section["client_secret"] = self.client_secret
        return section

    # --- switches ----------------------------------------------------------------------

    @property
    def signin_user(self) -> str:
        """Who signs in in the browser / approves a device code (without a known hint)."""
        return self._forced_user or self._default_user

    @signin_user.setter
    def signin_user(self, user: str) -> None:
        """From now on the person signs in as ``user``, whatever login_hint says."""
        self._forced_user = user

    def add_user(self, *users: str) -> None:
        """Accounts in the tenant: a sign-in whose login_hint names one signs in as it."""
        with self._lock:
            self._known.update(user.lower() for user in users)

    def user_for_hint(self, login_hint: str | None) -> str:
        """The account the person signs in as when MSAL sent ``login_hint``."""
        if self._forced_user:
            return self._forced_user
        if login_hint and login_hint.lower() in self._known:
            return login_hint
        return self._default_user

    def revoke_refresh_tokens(self, code: int = 50173, user: str | None = None) -> None:
        """Every refresh token issued so far (to ``user`` only, if given) answers
        invalid_grant with this AADSTS code; other users' tokens keep working."""
        with self._lock:
            if user is None:
                self.revocation_code = code
            for grant in self._refresh.values():
                if user is None or grant.user.lower() == user.lower():
                    grant.revoked, grant.revoked_code = True, code

    def revoke_sessions(self, user: str, code: int = 50173) -> None:
        """An administrator's "Revoke sessions" for ``user``: its refresh tokens are
        refused, and so are its access tokens (Exchange, with continuous access
        evaluation, stops taking them at once)."""
        self.revoke_refresh_tokens(code, user)
        with self._lock:
            for token, (owner, _) in list(self._access.items()):
                if owner.lower() == user.lower():
                    self._access[token] = (owner, 0.0)

    def fail_next(self, count: int, status: int = 500, retry_after: int | None = None) -> None:
        """The next ``count`` token/devicecode requests answer ``status`` (5xx: transient)."""
        with self._lock:
            self._failures.extend([(status, retry_after)] * count)

    def approve_device_code(self, user_code: str, user: str | None = None) -> None:
        """The person entered ``user_code`` at the verification page and signed in."""
        with self._lock:
            device_code = self._user_codes[user_code]
            grant = self._devices[device_code]
            grant.user = user or self.signin_user
        self._consent(grant.user, grant.scopes)

    def withhold_consent(self, *scopes: str) -> None:
        """The user declines these scopes at the next sign-ins (not an admin's grant)."""
        with self._lock:
            self._withheld.update(scopes)

    def grant_consent(self, user: str, *scopes: str) -> None:
        """An administrator consented for ``user`` (API permissions → Grant admin consent)."""
        with self._lock:
            self._withheld.difference_update(scopes)
        self._consent(user, scopes)

    def revoke_consent(self, user: str, *scopes: str) -> None:
        with self._lock:
            self._consents.setdefault(user.lower(), set()).difference_update(scopes)

    def consented(self, user: str) -> set[str]:
        with self._lock:
            return set(self._consents.get(user.lower(), ()))

    def _consent(self, user: str, scopes: tuple[str, ...]) -> None:
        with self._lock:
            given = {s for s in scopes if s not in RESERVED_SCOPES and s not in self._withheld}
            self._consents.setdefault(user.lower(), set()).update(given)

    def issue_refresh_token(self, user: str | None = None, scopes: str = "") -> str:
        """A refresh token as another tool would hold it (for `relayd auth import`)."""
        scope_list = _scopes(scopes or f"{SMTP_SEND} offline_access")
        self._consent(user or self.signin_user, scope_list)  # the other tool had consent
        return self._issue(user or self.signin_user, scope_list)["refresh_token"]

    # --- observations ------------------------------------------------------------------

    def is_valid_access_token(self, user: str, token: str, scope: str | None = SMTP_SEND) -> bool:
        """True if ``token`` was issued here to ``user``, has not expired, and carries
        ``scope`` (default SMTP.Send: what Exchange's SMTP AUTH accepts; None: any)."""
        with self._lock:
            owner, expires_at = self._access.get(token, ("", 0.0))
            _, scopes = self._grants.get(token, ("", ()))
        if scope is not None and scope not in scopes:
            return False
        return owner.lower() == user.lower() and time.time() < expires_at

    def token_grant(self, token: str) -> tuple[str, str, tuple[str, ...]] | None:
        """(user, resource, scopes) of a valid access token issued here, else None."""
        with self._lock:
            owner, expires_at = self._access.get(token, ("", 0.0))
            resource, scopes = self._grants.get(token, ("", ()))
        if not owner or time.time() >= expires_at:
            return None
        return owner, resource, scopes

    def valid_access_tokens(self, user: str | None = None) -> set[str]:
        now = time.time()
        with self._lock:
            return {
                token
                for token, (owner, expires_at) in self._access.items()
                if now < expires_at and (user is None or owner.lower() == user.lower())
            }

    def valid_refresh_tokens(self, user: str | None = None) -> set[str]:
        now = time.time()
        with self._lock:
            return {
                token
                for token, grant in self._refresh.items()
                if not grant.revoked
                and now < grant.expires_at
                and (user is None or grant.user.lower() == user.lower())
            }

    def latest_refresh_token(self, user: str | None = None) -> str | None:
        with self._lock:
            for token in reversed(self._refresh):
                if user is None or self._refresh[token].user.lower() == user.lower():
                    return token
            return None

    def issued_secrets(self) -> set[str]:
        """Every token, code and the client secret this fake ever handed out."""
        with self._lock:
            return set(self._issued)


# --- pytest fixture ----------------------------------------------------------------------


@pytest.fixture
def entra(ca: trustme.CA) -> Iterator[FakeEntra]:
    """A running fake Entra ID; ``entra.oauth_config(ca_file)`` is a ready config section."""
    with FakeEntra(ca) as fake:
        yield fake

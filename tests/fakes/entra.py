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
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import secrets
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

TENANT_ID = "0c7a3f5e-1d2b-4e6f-8a9b-0c1d2e3f4a5b"
CLIENT_ID = "5d3e1a2b-7c4f-4a6e-9b8d-1e2f3a4b5c6d"
MAILBOX = "relay@contoso.example"
RESERVED_SCOPES = {"openid", "profile", "offline_access"}

# What Entra says for each switch (codes from the Microsoft docs, texts shortened).
AADSTS_TEXTS = {
    50173: "The provided grant has expired due to it being revoked, a fresh auth token "
    "is needed. The user might have changed or reset their password.",
    70008: "The provided authorization code or refresh token has expired due to inactivity.",
    700082: "The refresh token has expired due to inactivity.",
    65001: "The user or administrator has not consented to use the application.",
    50076: "Due to a configuration change made by your administrator, you must use "
    "multi-factor authentication to access the resource.",
    70016: "OAuth 2.0 device flow error. Authorization is pending.",
    7000215: "Invalid client secret provided.",
    700016: "Application was not found in the directory.",
    501481: "The Code_Verifier does not match the code_challenge supplied in the "
    "authorization request.",
    70000: "The provided value for the 'code' parameter is not valid.",
    90002: "Tenant not found.",
    28000: "Provided value for the input parameter scope is not valid because it contains "
    "more than one resource.",
}
SMTP_SEND = "https://outlook.office.com/SMTP.Send"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned_jwt(claims: dict) -> str:
    """An ID token. MSAL decodes it without checking the signature (it came over TLS)."""
    header = _b64url(json.dumps({"typ": "JWT", "alg": "none"}).encode())
    return f"{header}.{_b64url(json.dumps(claims).encode())}."


@dataclass
class _User:
    username: str
    oid: str = field(default_factory=lambda: secrets.token_hex(16))


@dataclass
class _Grant:
    """An issued code, refresh token or device code: who it is for and what it allows."""

    user: str
    scopes: tuple[str, ...]
    expires_at: float = float("inf")
    nonce: str | None = None
    redirect_uri: str | None = None
    code_challenge: str | None = None
    used: bool = False
    revoked: bool = False
    revoked_code: int | None = None  # the AADSTS code a revoked grant answers with


class FakeEntra:
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
        self._server = _TLSServer(("127.0.0.1", 0), _Handler, fake=self, context=context)
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

    # --- request handling (called from the server threads) ---------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self.requests[name] += 1

    def _openid_configuration(self) -> dict:
        prefix = f"{self.authority}/oauth2/v2.0"
        return {
            "issuer": f"{self.authority}/v2.0",
            "authorization_endpoint": f"{prefix}/authorize",
            "token_endpoint": f"{prefix}/token",
            "device_authorization_endpoint": f"{prefix}/devicecode",
            "jwks_uri": f"{self.authority}/discovery/v2.0/keys",
            "response_types_supported": ["code"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        }

    def _next_failure(self) -> tuple[int, int | None] | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def _authorize(self, query: dict[str, str]) -> str:
        """The browser step: the user signs in and is sent back with a code."""
        if query.get("client_id") != self.client_id:
            return _with_query(
                query["redirect_uri"],
                error="unauthorized_client",
                error_description="AADSTS700016: " + AADSTS_TEXTS[700016],
                state=query.get("state", ""),
            )
        code = self._new_secret("code")
        user = self.user_for_hint(query.get("login_hint"))
        self._consent(user, _scopes(query.get("scope", "")))
        with self._lock:
            self._codes[code] = _Grant(
                user=user,
                scopes=_scopes(query.get("scope", "")),
                expires_at=time.time() + 600,
                nonce=query.get("nonce"),
                redirect_uri=query["redirect_uri"],
                code_challenge=query.get("code_challenge"),
            )
        return _with_query(query["redirect_uri"], code=code, state=query.get("state", ""))

    def _device_authorization(self, form: dict[str, str]) -> tuple[int, dict]:
        device_code, user_code = self._new_secret("device"), secrets.token_hex(4).upper()
        with self._lock:
            self._devices[device_code] = _Grant(
                user="", scopes=_scopes(form.get("scope", "")), expires_at=time.time() + 900
            )
            self._user_codes[user_code] = device_code
        url = f"{self.base_url}/devicelogin"
        return 200, {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": url,
            "expires_in": 900,
            "interval": 1,
            "message": f"To sign in, use a web browser to open the page {url} and enter the "
            f"code {user_code} to authenticate.",
        }

    def _token(self, form: dict[str, str], basic_secret: str | None) -> tuple[int, dict]:
        if form.get("client_id") != self.client_id:
            return _error(400, "unauthorized_client", 700016)
        secret = form.get("client_secret", basic_secret)
        if secret is not None and secret != self.client_secret:
            return _error(401, "invalid_client", 7000215)
        grant_type = form.get("grant_type", "")
        self._count(f"token:{grant_type}")
        if grant_type == "authorization_code":
            return self._redeem_code(form)
        if grant_type == "refresh_token":
            return self._redeem_refresh_token(form)
        if grant_type == "urn:ietf:params:oauth:grant-type:device_code":
            return self._redeem_device_code(form)
        return 400, {"error": "unsupported_grant_type", "error_description": grant_type}

    def _redeem_code(self, form: dict[str, str]) -> tuple[int, dict]:
        with self._lock:
            grant = self._codes.get(form.get("code", ""))
            valid = grant is not None and not grant.used and time.time() < grant.expires_at
            if valid:
                grant.used = True
        if not valid or grant is None or grant.redirect_uri != form.get("redirect_uri"):
            return _error(400, "invalid_grant", 70000)
        verifier = form.get("code_verifier", "")
        if _b64url(hashlib.sha256(verifier.encode()).digest()) != grant.code_challenge:
            return _error(400, "invalid_grant", 501481)
        return self._issue_checked(grant.user, _scopes(form.get("scope", "")), grant.nonce)

    def _redeem_refresh_token(self, form: dict[str, str]) -> tuple[int, dict]:
        with self._lock:
            grant = self._refresh.get(form.get("refresh_token", ""))
        if grant is None or time.time() >= grant.expires_at:
            return _error(400, "invalid_grant", 70008)
        if grant.revoked:
            return _error(400, "invalid_grant", grant.revoked_code or self.revocation_code)
        # Entra replaces the refresh token on every use; the old one is not revoked at once.
        return self._issue_checked(grant.user, _scopes(form.get("scope", "")) or grant.scopes)

    def _redeem_device_code(self, form: dict[str, str]) -> tuple[int, dict]:
        with self._lock:
            grant = self._devices.get(form.get("device_code", ""))
            if grant is not None and grant.user and not grant.used:
                grant.used = True
                user = grant.user
            else:
                user = ""
        if grant is None or (grant.used and not user):
            return _error(400, "invalid_grant", 70000)
        if not user:
            return _error(400, "authorization_pending", 70016)
        return self._issue_checked(user, grant.scopes)

    def _issue_checked(
        self, username: str, scopes: tuple[str, ...], nonce: str | None = None
    ) -> tuple[int, dict]:
        """Entra's checks before it issues: one resource per request, all consented."""
        wanted = [scope for scope in scopes if scope not in RESERVED_SCOPES]
        if len({_resource_of(scope) for scope in wanted}) > 1:
            return _error(400, "invalid_scope", 28000)
        if not set(wanted) <= self.consented(username):
            return _error(400, "invalid_grant", 65001)
        return 200, self._issue(username, scopes, nonce)

    def _issue(self, username: str, scopes: tuple[str, ...], nonce: str | None = None) -> dict:
        """A token response shaped like Entra's, with fresh opaque tokens."""
        now = int(time.time())
        access_token, refresh_token = self._new_secret("at"), self._new_secret("rt")
        with self._lock:
            user = self._users.setdefault(username.lower(), _User(username))
            lifetime = self.access_token_lifetime
            self._access[access_token] = (username, now + lifetime)
            resource_scopes = tuple(s for s in scopes if s not in RESERVED_SCOPES)
            resource = _resource_of(resource_scopes[0]) if resource_scopes else ""
            self._grants[access_token] = (resource, resource_scopes)
            self._refresh[refresh_token] = _Grant(
                user=username, scopes=scopes, expires_at=now + self.refresh_token_lifetime
            )
        claims = {
            "aud": self.client_id,
            "iss": f"{self.authority}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "name": username.split("@")[0].title(),
            "oid": user.oid,
            "preferred_username": username,
            "sub": _b64url(hashlib.sha256(user.oid.encode()).digest()),
            "tid": self.tenant_id,
            "ver": "2.0",
        }
        if nonce:
            claims["nonce"] = nonce
        id_token = _unsigned_jwt(claims)
        with self._lock:
            self._issued.add(id_token)
        resource_scopes = [s for s in scopes if s not in RESERVED_SCOPES]
        return {
            "token_type": "Bearer",
            "scope": " ".join(resource_scopes),
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
            "refresh_token": refresh_token,
            "id_token": id_token,
            "client_info": _b64url(json.dumps({"uid": user.oid, "utid": self.tenant_id}).encode()),
        }

    def _new_secret(self, kind: str) -> str:
        # Opaque like Entra's refresh tokens, so only registration (not a JWT pattern)
        # can keep them out of logs: the leak test then proves the registration works.
        token = secrets.token_urlsafe(32) + kind
        with self._lock:
            self._issued.add(token)
        return token


def _scopes(text: str) -> tuple[str, ...]:
    return tuple(scope for scope in text.split() if scope)


def _resource_of(scope: str) -> str:
    """https://graph.microsoft.com/Mail.Send → https://graph.microsoft.com; a bare name
    (Mail.Send) is Microsoft Graph's, as Entra reads it."""
    if "://" not in scope:
        return "https://graph.microsoft.com"
    return scope.rsplit("/", 1)[0]


def _error(status: int, error: str, aadsts: int) -> tuple[int, dict]:
    return status, {
        "error": error,
        "error_description": f"AADSTS{aadsts}: {AADSTS_TEXTS.get(aadsts, error)} "
        f"Trace ID: {secrets.token_hex(8)} Timestamp: {time.strftime('%Y-%m-%d %H:%M:%SZ')}",
        "error_codes": [aadsts],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "trace_id": secrets.token_hex(8),
        "correlation_id": secrets.token_hex(8),
    }


def _with_query(url: str, **params: str) -> str:
    separator = "&" if urllib.parse.urlsplit(url).query else "?"
    return url + separator + urllib.parse.urlencode(params)


class _TLSServer(ThreadingHTTPServer):
    """Accepts on the server thread, does the TLS handshake on the request's thread."""

    daemon_threads = True

    def __init__(self, address, handler, *, fake: FakeEntra, context: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.fake, self.context = fake, context

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        if self.fake.down:  # "down": the connection is reset before any answer
            _reset(request)
            return
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            request.close()
            return
        super().finish_request(tls, client_address)


def _reset(connection: socket.socket) -> None:
    """Close with a TCP reset, as a host with nothing behind the port would."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


class _Handler(BaseHTTPRequestHandler):
    server: _TLSServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test output is about relayd."""

    @property
    def fake(self) -> FakeEntra:
        return self.server.fake

    def hung_up(self) -> bool:
        """While "down", a request on a kept-alive connection is not answered either:
        MSAL's requests.Session reuses connections, so a daemon would never notice."""
        if not self.fake.down:
            return False
        self.close_connection = True
        _reset(self.connection)
        return True

    def do_GET(self) -> None:
        if self.hung_up():
            return
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        tenant = f"/{self.fake.tenant_id}"
        if url.path == f"{tenant}/v2.0/.well-known/openid-configuration":
            self.fake._count("discovery")
            self._send_json(200, self.fake._openid_configuration())
        elif url.path == f"{tenant}/oauth2/v2.0/authorize":
            self.fake._count("authorize")
            self._send(302, b"", {"Location": self.fake._authorize(query)})
        elif url.path.endswith("/.well-known/openid-configuration"):
            self._send_json(400, _error(400, "invalid_tenant", 90002)[1])
        else:
            self._send(404, b"not found", {"Content-Type": "text/plain"})

    def do_POST(self) -> None:
        if self.hung_up():
            return
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        path = urllib.parse.urlsplit(self.path).path
        prefix = f"/{self.fake.tenant_id}/oauth2/v2.0"
        if path not in (f"{prefix}/token", f"{prefix}/devicecode"):
            self._send(404, b"not found", {"Content-Type": "text/plain"})
            return
        failure = self.fake._next_failure()
        if failure is not None:
            self.fake._count("failed")
            status, retry_after = failure
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            body = {"error": "temporarily_unavailable", "error_description": "AADSTS90033"}
            self._send_json(status, body, headers)
        elif path.endswith("/devicecode"):
            self.fake._count("devicecode")
            self._send_json(*self.fake._device_authorization(form))
        else:
            self._send_json(*self.fake._token(form, self._basic_secret()))

    def _basic_secret(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        _, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        return urllib.parse.unquote_plus(secret)

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        payload = json.dumps(body).encode()
        self._send(status, payload, {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, payload: bytes, headers: dict) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)


# --- the browser, played by a test -----------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def sign_in_in_browser(auth_url: str, ca_file: Path) -> str:
    """Open the sign-in URL as a browser would; return where Entra sends the browser."""
    context = ssl.create_default_context(cafile=str(ca_file))
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    try:
        opener.open(auth_url, timeout=10)
    except urllib.error.HTTPError as answer:
        if answer.code == 302:
            return answer.headers["Location"]
        raise
    raise AssertionError(f"the authorize endpoint did not redirect: {auth_url}")


def follow_redirect(location: str) -> str:
    """The browser lands on the redirect URI (relayd's one-shot listener); its page text."""
    with urllib.request.urlopen(location, timeout=10) as page:
        return page.read().decode()


# --- pytest fixture ----------------------------------------------------------------------


@pytest.fixture
def entra(ca: trustme.CA) -> Iterator[FakeEntra]:
    """A running fake Entra ID; ``entra.oauth_config(ca_file)`` is a ready config section."""
    with FakeEntra(ca) as fake:
        yield fake

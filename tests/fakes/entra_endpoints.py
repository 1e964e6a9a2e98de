"""The fake Entra ID's endpoints: what it answers to discovery, the browser's
authorize step, the device-code request and the token requests (codes with PKCE,
refresh tokens with rotation, device codes), and how it issues tokens. ``FakeEntra``
(tests/fakes/entra.py) holds the state and the switches; this mixin reads them."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from tests.fakes.entra_http import AADSTS_TEXTS, b64url, error_answer, unsigned_jwt

RESERVED_SCOPES = {"openid", "profile", "offline_access"}


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


class EntraEndpoints:
    """Request handling for ``FakeEntra`` (called from the server threads)."""

    # Set by FakeEntra.__init__.
    tenant_id: str
    client_id: str
    client_secret: str
    access_token_lifetime: int
    refresh_token_lifetime: int
    revocation_code: int
    _lock: threading.Lock
    _users: dict[str, _User]
    _codes: dict[str, _Grant]
    _refresh: dict[str, _Grant]
    _access: dict[str, tuple[str, float]]
    _grants: dict[str, tuple[str, tuple[str, ...]]]
    _devices: dict[str, _Grant]
    _user_codes: dict[str, str]
    _issued: set[str]
    _failures: list[tuple[int, int | None]]

    # Provided by FakeEntra.
    authority: str
    base_url: str

    def user_for_hint(self, login_hint: str | None) -> str:
        raise NotImplementedError

    def consented(self, user: str) -> set[str]:
        raise NotImplementedError

    def _consent(self, user: str, scopes: tuple[str, ...]) -> None:
        raise NotImplementedError

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
            return error_answer(400, "unauthorized_client", 700016)
        secret = form.get("client_secret", basic_secret)
        if secret is not None and secret != self.client_secret:
            return error_answer(401, "invalid_client", 7000215)
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
            return error_answer(400, "invalid_grant", 70000)
        verifier = form.get("code_verifier", "")
        if b64url(hashlib.sha256(verifier.encode()).digest()) != grant.code_challenge:
            return error_answer(400, "invalid_grant", 501481)
        return self._issue_checked(grant.user, _scopes(form.get("scope", "")), grant.nonce)

    def _redeem_refresh_token(self, form: dict[str, str]) -> tuple[int, dict]:
        with self._lock:
            grant = self._refresh.get(form.get("refresh_token", ""))
        if grant is None or time.time() >= grant.expires_at:
            return error_answer(400, "invalid_grant", 70008)
        if grant.revoked:
            return error_answer(400, "invalid_grant", grant.revoked_code or self.revocation_code)
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
            return error_answer(400, "invalid_grant", 70000)
        if not user:
            return error_answer(400, "authorization_pending", 70016)
        return self._issue_checked(user, grant.scopes)

    def _issue_checked(
        self, username: str, scopes: tuple[str, ...], nonce: str | None = None
    ) -> tuple[int, dict]:
        """Entra's checks before it issues: one resource per request, all consented."""
        wanted = [scope for scope in scopes if scope not in RESERVED_SCOPES]
        if len({_resource_of(scope) for scope in wanted}) > 1:
            return error_answer(400, "invalid_scope", 28000)
        if not set(wanted) <= self.consented(username):
            return error_answer(400, "invalid_grant", 65001)
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
            "sub": b64url(hashlib.sha256(user.oid.encode()).digest()),
            "tid": self.tenant_id,
            "ver": "2.0",
        }
        if nonce:
            claims["nonce"] = nonce
        id_token = unsigned_jwt(claims)
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
            "client_info": b64url(json.dumps({"uid": user.oid, "utid": self.tenant_id}).encode()),
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


def _with_query(url: str, **params: str) -> str:
    separator = "&" if urllib.parse.urlsplit(url).query else "?"
    return url + separator + urllib.parse.urlencode(params)

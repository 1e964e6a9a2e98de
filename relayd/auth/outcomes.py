"""What a token call came to, and the words for it: Entra ID's answers classified
(the AADSTS codes that a sign-in fixes, those that only a configuration change fixes),
and the one sentence a person reads, which tells "cannot reach Entra ID" from "Entra ID
refused". No MSAL and no network here: relayd.auth.client makes the calls.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from relayd.ops.logging import redactor

# Entra ID's AADSTS codes that a new sign-in fixes, and what each means for a person.
# Microsoft warns the texts may change: match on the code, show their text too.
REAUTH_CODES: dict[int, str] = {
    70008: "the refresh token expired or was revoked",
    700082: "the refresh token expired after 90 days without use",
    50173: "the grant was revoked by a password reset or by an administrator",
    65001: "the user or an administrator has not consented to the app's permissions",
    50076: "multi-factor authentication is now required",
    50079: "the user must register for multi-factor authentication",
    50132: "the session is no longer valid: the password changed or expired",
    50133: "the session is no longer valid after a password change",
    70043: "a sign-in frequency policy requires signing in again",
}
# Codes that a sign-in cannot fix: the configuration or the app registration is wrong.
CONFIG_CODES: dict[int, str] = {
    7000215: "the client secret in oauth.client_secret is wrong",
    7000222: "the client secret has expired: create a new one in the app registration",
    700016: "the application oauth.client_id was not found in the tenant",
    90002: "the tenant oauth.tenant_id was not found",
    700025: "the app registration is a public client: remove oauth.client_secret",
}
TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error"}
_AADSTS = re.compile(r"AADSTS(\d+)")

# Outcome kinds.
SUCCESS = "success"
NO_ACCOUNT = "no_account"
REAUTH = "reauth"  # invalid_grant and friends: a person must sign in again
TRANSIENT = "transient"  # network, 5xx, temporarily_unavailable: retry later
CONFIG = "config"  # invalid_client, unknown tenant…: fix the configuration
# The token cache file could not be written or locked (disk full, read-only): a local
# problem. With an access token: the tokens are good and kept in memory, the write is
# retried (``TokenClient.save``); without: nothing was redeemed, try again later.
STORAGE = "storage"


@dataclass(frozen=True)
class Outcome:
    """What a token call came to. ``access_token`` never shows in repr()."""

    kind: str
    detail: str = ""
    aadsts: int | None = None
    error: str | None = None  # the OAuth error code, e.g. invalid_grant
    access_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    username: str | None = None
    # No answer from Entra ID at all (network, DNS, proxy, TLS), as opposed to an answer
    # that refuses (AADSTS code) or a 5xx: the words and the advice differ.
    unreachable: bool = False

    @property
    def ok(self) -> bool:
        return self.kind == SUCCESS

    def explain(self) -> str:
        """One sentence a person can act on, naming the AADSTS code when there is one."""
        if self.aadsts is None:
            return self.detail
        meaning = REAUTH_CODES.get(self.aadsts) or CONFIG_CODES.get(self.aadsts)
        prefix = f"AADSTS{self.aadsts}" + (f" ({meaning})" if meaning else "")
        return f"{prefix}: {self.detail}" if self.detail else prefix


def classify(result: dict[str, Any] | None) -> Outcome:
    """Turn an MSAL result dict into an Outcome (tokens are registered for redaction)."""
    if not result:
        return Outcome(NO_ACCOUNT, "no refresh token in the cache")
    if "access_token" in result:
        redactor.register(result.get("access_token"))
        redactor.register(result.get("refresh_token"))
        claims = result.get("id_token_claims") or {}
        return Outcome(
            SUCCESS,
            access_token=result["access_token"],
            expires_at=time.time() + int(result.get("expires_in", 0)),
            username=claims.get("preferred_username") or claims.get("upn"),
        )
    error = str(result.get("error", "unknown_error"))
    description = str(result.get("error_description") or error)
    codes = result.get("error_codes") or [int(m) for m in _AADSTS.findall(description)[:1]]
    aadsts = int(codes[0]) if codes else None
    summary = _first_sentence(description)
    if error in TRANSIENT_ERRORS:
        kind = TRANSIENT
    elif aadsts in CONFIG_CODES or error in ("invalid_client", "unauthorized_client"):
        kind = CONFIG
    else:
        kind = REAUTH
    return Outcome(kind, summary, aadsts, error)


def _first_sentence(description: str) -> str:
    """AADSTS50173: The grant was revoked. Trace ID: … → "The grant was revoked."."""
    text = _AADSTS.sub("", description.split("\r\n")[0].split(" Trace ID:")[0])
    return text.lstrip(": ").strip()


def storage_problem(outcome: Outcome | None, error: OSError) -> Outcome:
    """The cache file could not be used: with the fresh tokens when Entra ID gave some."""
    detail = f"token cache: {error.strerror or error}"
    if outcome is not None and outcome.ok:
        return replace(outcome, kind=STORAGE, detail=detail)
    return outcome or Outcome(STORAGE, detail)


def failure_text(outcome: Outcome, authority: str) -> str:
    """What a person reads when a token call failed: Entra ID could not be reached, or
    it answered and refused (with the AADSTS code), or the cache file is the problem."""
    if outcome.kind == TRANSIENT and outcome.unreachable:
        return f"cannot reach Entra ID at {authority}: {outcome.detail} ({network_advice()})"
    if outcome.kind == TRANSIENT:
        return f"Entra ID could not answer now ({outcome.explain()}); it retries by itself"
    if outcome.kind == STORAGE:
        return f"Entra ID answered, but {outcome.detail}"
    return f"Entra ID refused: {outcome.explain()}"


def network_advice(environ: Mapping[str, str] | None = None) -> str:
    """Where to look when nothing answers: the network, DNS, and the proxy that requests
    (MSAL's HTTP stack) takes from HTTPS_PROXY, named without its credentials."""
    environ = os.environ if environ is None else environ
    proxy = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    if not proxy:
        return (
            "check the network, DNS and the firewall; behind a proxy set HTTPS_PROXY,"
            " behind a TLS-inspecting one oauth.ca_file"
        )
    parts = urllib.parse.urlsplit(proxy)
    if parts.hostname:  # never print user:password@ from the proxy address
        port = f":{parts.port}" if parts.port else ""
        proxy = parts._replace(netloc=f"{parts.hostname}{port}").geturl()
    return f"it goes through the proxy HTTPS_PROXY={proxy}: check that the proxy is up"

"""MSAL, the token cache and what Entra ID's answers mean. Synchronous: run it in a thread.

``TokenClient`` is the only code that holds the MSAL application and the in-memory
token cache. Every operation that may change the cache runs as a transaction: take
the cross-process lock, re-read the file if another process replaced it, call MSAL,
write the file back if MSAL changed anything. Reading what is cached (account, access
token, refresh-token age) needs no network and no MSAL application.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msal
import requests

from relayd.auth.outcomes import (
    CONFIG,
    NO_ACCOUNT,
    TRANSIENT,
    Outcome,
    classify,
    storage_problem,
)
from relayd.auth.store import CacheStorageError, FileStamp, TokenStore
from relayd.config import OAuthSettings
from relayd.ops.logging import redactor

CredentialType = msal.TokenCache.CredentialType


class AuthorityError(Exception):
    """The authority's OIDC discovery document could not be used (wrong tenant or URL)."""


@dataclass(frozen=True)
class CacheView:
    """What the token cache holds for the mailbox, read without the network."""

    account: str | None
    others: tuple[str, ...]
    token: str | None = field(repr=False)
    issued_at: float
    expires_at: float
    rotated_at: float | None


class MailboxMismatch(Exception):
    """The person signed in as someone other than ``upstream.mailbox``."""

    def __init__(self, signed_in: str, mailbox: str, setting: str = "upstream.mailbox") -> None:
        super().__init__(
            f"signed in as {signed_in}, but {setting} is {mailbox}: Exchange Online "
            f"would refuse every message (535 5.7.3). Sign in as {mailbox} (a private "
            "browser window avoids reusing another signed-in account)."
        )
        self.signed_in, self.mailbox = signed_in, mailbox


def transient(error: Exception) -> Outcome:
    """A network error or a 5xx: the text names the problem, never a request body."""
    detail = f"{type(error).__name__}: {error}"[:300]
    return Outcome(TRANSIENT, detail, unreachable=_no_answer(error))


def _no_answer(error: Exception) -> bool:
    """Whether Entra ID never answered: a connection, DNS, proxy or TLS failure, or a
    timeout. MSAL's own service errors are answers."""
    if isinstance(error, msal.exceptions.MsalServiceError):
        return False
    return isinstance(error, requests.ConnectionError | requests.Timeout | OSError)


# What MSAL and requests raise when Entra ID cannot be reached or answers 5xx.
NETWORK_ERRORS = (requests.RequestException, msal.exceptions.MsalServiceError, OSError)


class _ExtraCAAdapter(requests.adapters.HTTPAdapter):
    """Trusts ``oauth.ca_file`` in addition to the usual CAs.

    ``requests`` lets $REQUESTS_CA_BUNDLE replace a session's ``verify``; a CA loaded
    into the pool's SSL context is added to whatever bundle requests picks instead.
    """

    def __init__(self, ca_file: Path, **kwargs: Any) -> None:
        self._context = ssl.create_default_context(cafile=str(ca_file))
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


def http_session(oauth: OAuthSettings) -> requests.Session:
    """The HTTP client MSAL uses: a timeout (MSAL's default is none) and our CA."""
    session = requests.Session()
    if oauth.ca_file is not None:
        session.mount("https://", _ExtraCAAdapter(oauth.ca_file, max_retries=1))
    session.request = functools.partial(  # type: ignore[method-assign]
        session.request, timeout=oauth.http_timeout
    )
    return session


class TokenClient:
    """MSAL application + token cache for one mailbox. Not thread-safe: one at a time."""

    def __init__(
        self,
        oauth: OAuthSettings,
        mailbox: str,
        store: TokenStore,
        *,
        public: bool = False,
        mailbox_setting: str = "upstream.mailbox",
    ) -> None:
        self.oauth, self.mailbox, self.store = oauth, mailbox, store
        self.mailbox_setting = mailbox_setting  # a route's: routes[N].mailbox
        self.scopes = list(oauth.scopes)
        self.cache = msal.SerializableTokenCache()
        self._public = public or oauth.client_secret is None
        self._app: msal.ClientApplication | None = None
        self._stamp: FileStamp | None = None
        self.unsaved = False  # the in-memory cache holds tokens the file does not
        if oauth.client_secret is not None:
            redactor.register(oauth.client_secret.reveal())

    # --- the MSAL application (built lazily: construction fetches OIDC discovery) ------

    def app(self) -> msal.ClientApplication:
        if self._app is None:
            try:
                self._app = self._build_app()
            except ValueError as error:  # OIDC discovery refused: wrong tenant or authority
                raise AuthorityError(f"{self.oauth.effective_authority}: {error}") from None
        return self._app

    def _build_app(self) -> msal.ClientApplication:
        options: dict[str, Any] = {
            "authority": self.oauth.effective_authority,
            "token_cache": self.cache,
            "http_client": http_session(self.oauth),
        }
        if self.oauth.authority:  # sovereign cloud or test IdP: not in Microsoft's list
            options["instance_discovery"] = False
        if self._public:
            return msal.PublicClientApplication(self.oauth.client_id, **options)
        secret = self.oauth.client_secret.reveal()  # type: ignore[union-attr]
        return msal.ConfidentialClientApplication(
            self.oauth.client_id, client_credential=secret, **options
        )

    # --- cache file transactions ------------------------------------------------------

    def changed_on_disk(self) -> bool:
        """Cheap (one stat): did another process write the cache since we read it?"""
        return self.store.stamp() != self._stamp

    def reload(self) -> None:
        """Re-read the cache file (under the lock) if another process replaced it."""
        with self.store.locked():
            self._reload()

    def read(self) -> None:
        """Read the cache file without the lock (rename makes that safe): for readers
        such as `relayd auth status` that may not be allowed to create the lock file."""
        self._reload()

    def _reload(self, force: bool = False) -> None:
        if not force and self.store.stamp() == self._stamp:
            return  # unchanged on disk (unsaved tokens in memory stay, to be saved)
        text, stamp = self.store.read_cache()
        self.cache.deserialize(text or "{}")
        self._stamp = stamp
        self.unsaved = False  # another process wrote the file since: its tokens win
        for secret in self._secrets():
            redactor.register(secret)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Lock, catch up with the file, run, persist MSAL's changes. On an exception
        the file is left as it was and the in-memory cache goes back to what it was.

        When the write fails (CacheStorageError), the new tokens stay in memory
        (``unsaved``): a rotated refresh token must not be dropped because the disk is
        full; the next transaction or ``save()`` writes them."""
        with self.store.locked():
            self._reload()
            before = self.cache.serialize() if self.unsaved else None
            try:
                yield
            except BaseException:
                if before is None:
                    self._reload(force=True)
                else:
                    self.cache.deserialize(before)
                raise
            if self.cache.has_state_changed or self.unsaved:
                self._write()

    def save(self) -> None:
        """Write tokens a failed write left in memory (raises CacheStorageError)."""
        with self.store.locked():
            self._reload()  # another process wrote the file meanwhile: nothing to save
            if self.unsaved:
                self._write()

    def _write(self) -> None:
        text = self.cache.serialize()
        try:
            self._stamp = self.store.write_cache(text)
        except CacheStorageError:
            self.unsaved = True
            raise
        self.unsaved = False

    @property
    def stamp(self) -> FileStamp | None:
        return self._stamp

    # --- reading the cache (no network) ------------------------------------------------

    def account(self) -> dict[str, Any] | None:
        """The signed-in account: the one named like the mailbox, else the only one."""
        accounts = list(self.cache.search(CredentialType.ACCOUNT))
        for account in accounts:
            if account.get("username", "").lower() == self.mailbox.lower():
                return account
        return accounts[0] if len(accounts) == 1 else None

    def usernames(self) -> list[str]:
        return [a.get("username", "?") for a in list(self.cache.search(CredentialType.ACCOUNT))]

    def cached_access_token(
        self, scopes: list[str] | None = None
    ) -> tuple[str, float, float] | None:
        """The longest-lived cached access token for ``scopes`` (default: oauth.scopes):
        (token, issued at, expires at)."""
        account = self.account()
        if account is None:
            return None
        query = {"home_account_id": account["home_account_id"], "client_id": self.oauth.client_id}
        best: tuple[str, float, float] | None = None
        wanted = scopes or self.scopes
        for entry in self.cache.search(CredentialType.ACCESS_TOKEN, wanted, query=query):
            expires_at = float(entry.get("expires_on", 0))
            if best is None or expires_at > best[2]:
                best = (entry["secret"], float(entry.get("cached_at", 0)), expires_at)
        return best

    def refresh_token_rotated_at(self) -> float | None:
        """When the refresh token was last issued (redeemed or signed in)."""
        account = self.account()
        if account is None:
            return None
        query = {"home_account_id": account["home_account_id"]}
        times = [
            float(entry.get("last_modification_time", 0))
            for entry in self.cache.search(CredentialType.REFRESH_TOKEN, query=query)
        ]
        return max(times) if times else None

    def view(self, scopes: list[str] | None = None) -> CacheView:
        account = self.account()
        cached = self.cached_access_token(scopes)
        token, issued_at, expires_at = cached if cached else (None, 0.0, 0.0)
        return CacheView(
            account=account.get("username") if account else None,
            others=tuple(self.usernames()) if account is None else (),
            token=token,
            issued_at=issued_at,
            expires_at=expires_at,
            rotated_at=self.refresh_token_rotated_at(),
        )

    def _secrets(self) -> Iterator[str]:
        for kind in (CredentialType.ACCESS_TOKEN, CredentialType.REFRESH_TOKEN):
            for entry in self.cache.search(kind):
                yield entry.get("secret", "")

    # --- token operations (network; call inside or as transactions) --------------------

    def start_auth_code_flow(
        self, redirect_uri: str, scopes: list[str] | None = None
    ) -> dict[str, Any]:
        """MSAL's authorization code flow with PKCE; ``auth_uri`` is for the browser.

        ``scopes`` may span several resources: the browser asks consent for all of
        them; the code is then redeemed for one (``finish_auth_code_flow``)."""
        with warnings.catch_warnings():
            # MSAL suggests response_mode=form_post; the code must be in the URL so a
            # person can paste it back. PKCE protects the code either way.
            warnings.simplefilter("ignore", UserWarning)
            return self.app().initiate_auth_code_flow(
                scopes or self.scopes, redirect_uri=redirect_uri, login_hint=self.mailbox
            )

    def finish_auth_code_flow(
        self, flow: dict[str, Any], response: dict[str, str], scopes: list[str] | None = None
    ) -> Outcome:
        """Redeem the code the browser brought back (state and PKCE checked by MSAL), for
        ``scopes`` of one resource (Entra ID answers AADSTS28000 to two)."""
        wanted = scopes or self.scopes
        return self.redeem(
            lambda app: app.acquire_token_by_auth_code_flow(flow, response, scopes=wanted)
        )

    def refresh(self, scopes: list[str] | None = None) -> Outcome:
        """Redeem the refresh token now (rotating it) for ``scopes`` (default:
        oauth.scopes; the same refresh token serves every resource) and persist it."""
        result: dict[str, Any] | None = None
        try:
            with self.transaction():
                account = self.account()
                if account is None:
                    return Outcome(NO_ACCOUNT, "nobody has signed in")
                result = self.app().acquire_token_silent_with_error(
                    scopes or self.scopes, account, force_refresh=True
                )
        except CacheStorageError as error:
            return storage_problem(classify(result) if result else None, error)
        except NETWORK_ERRORS as error:
            return transient(error)
        except AuthorityError as error:
            return Outcome(CONFIG, str(error))
        return classify(result)

    def redeem(self, result_of: Any, *args: Any) -> Outcome:
        """Run an MSAL acquire_* call that signs someone in; keep it only for the mailbox.

        ``result_of`` is called with the MSAL application and ``args``. Other accounts
        are removed: one cache serves one mailbox.
        """
        try:
            with self.transaction():
                outcome = classify(result_of(self.app(), *args))
                if outcome.ok:
                    self._keep_only_mailbox(outcome)
        except CacheStorageError as error:  # a sign-in not saved is no sign-in
            return storage_problem(None, error)
        except NETWORK_ERRORS as error:
            return transient(error)
        except AuthorityError as error:
            return Outcome(CONFIG, str(error))
        return outcome

    def _keep_only_mailbox(self, outcome: Outcome) -> None:
        signed_in = outcome.username or "an account without a user name"
        if signed_in.lower() != self.mailbox.lower():
            # transaction() rolls back: a sign-in as anyone else is never saved.
            raise MailboxMismatch(signed_in, self.mailbox, self.mailbox_setting)
        for account in list(self.cache.search(CredentialType.ACCOUNT)):
            if account.get("username", "").lower() != self.mailbox.lower():
                self._forget(account)

    def logout(self) -> list[str]:
        """Remove every account and its tokens from the cache; returns their names."""
        with self.transaction():
            accounts = list(self.cache.search(CredentialType.ACCOUNT))
            for account in accounts:
                self._forget(account)
        return [a.get("username", "?") for a in accounts]

    def _forget(self, account: dict[str, Any]) -> None:
        """Offline equivalent of MSAL's remove_account (which needs OIDC discovery)."""
        query = {"home_account_id": account["home_account_id"]}
        removers = (
            (CredentialType.REFRESH_TOKEN, self.cache.remove_rt),
            (CredentialType.ACCESS_TOKEN, self.cache.remove_at),
            (CredentialType.ID_TOKEN, self.cache.remove_idt),
            (CredentialType.ACCOUNT, self.cache.remove_account),
        )
        for kind, remove in removers:
            for entry in list(self.cache.search(kind, query=query)):
                remove(entry)

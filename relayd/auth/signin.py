"""`relayd auth login|import|status|refresh|logout`: the work behind the commands.

Sign-in is made for a server without a browser: the sign-in URL is printed on a line of
its own, the person opens it anywhere, and the answer comes back either to a one-shot
listener on the redirect URI's port (``http://localhost:PORT/``) or as the address the
browser ended on, pasted on standard input — whichever comes first. Pasting also lets
relayd reuse an existing app registration with its own (non-local) redirect URI.
"""

from __future__ import annotations

import getpass
import html
import json
import queue
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, TextIO

from relayd.auth.client import NETWORK_ERRORS, AuthorityError, MailboxMismatch, TokenClient
from relayd.auth.outcomes import (
    CONFIG,
    NO_ACCOUNT,
    REAUTH,
    TRANSIENT,
    Outcome,
    failure_text,
    network_advice,
)
from relayd.auth.resources import Resource, all_scopes, resources_for
from relayd.auth.source import CONSENT_MISSING
from relayd.auth.store import TokenStore, stamp_to_json
from relayd.auth.tokens import NO_TOKEN, OK, REAUTH_REQUIRED
from relayd.auth.wording import daemon_line, expiry, rotation, when
from relayd.config import Settings
from relayd.ops.logging import redactor

__all__ = ["AuthCommands", "LoginAborted", "RedirectListener", "parse_redirect", "when"]

LOGIN_TIMEOUT = 900.0  # seconds a person has to finish signing in
_PENDING = ("authorization_pending", "slow_down")  # device flow: keep polling (RFC 8628 §3.5)


class AuthCommands:
    """One instance per command run. Prints for a person; never prints a token."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        mailbox_setting: str = "upstream.mailbox",
    ) -> None:
        """``settings`` are one mailbox's (``config.route_settings`` for a route, whose
        ``mailbox_setting`` is then ``routes[N].mailbox``)."""
        self.settings, self.oauth = settings, settings.oauth
        self.mailbox = settings.upstream.mailbox
        self.mailbox_setting = mailbox_setting
        # The tokens the transport needs; the sign-in asks consent for all of them and
        # redeems the code for the first (Entra ID issues one resource per request).
        self.resources = resources_for(settings)
        self.lead_scopes = list(self.resources[0].scopes)
        self.store = TokenStore(self.oauth.token_cache)
        self.login_command = f"relayd auth login -c {config_path}"
        if mailbox_setting != "upstream.mailbox":
            self.login_command += f" --mailbox {self.mailbox}"
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout

    def say(self, text: str = "") -> None:
        print(redactor(text), file=self.stdout, flush=True)

    def client(self, public: bool = False) -> TokenClient:
        return TokenClient(
            self.oauth,
            self.mailbox,
            self.store,
            public=public,
            mailbox_setting=self.mailbox_setting,
        )

    # --- login ---------------------------------------------------------------------------

    def login(self, device_code: bool = False) -> int:
        if not self.mailbox:
            self.say("upstream.mailbox is not set: relayd needs to know who signs in.")
            return 1
        try:
            outcome = self._device_code_login() if device_code else self._browser_login()
        except (AuthorityError, *NETWORK_ERRORS) as error:
            self.say(
                f"Cannot reach Entra ID at {self.oauth.effective_authority}: {error}"
                f" ({network_advice()}). The token cache was not changed."
            )
            return 1
        except MailboxMismatch as error:
            self.say(f"Sign-in refused: {error} The token cache was not changed.")
            return 1
        except (LoginAborted, ValueError) as error:  # MSAL: state mismatch, bad response
            self.say(f"Sign-in failed: {error}")
            return 1
        return self._report(outcome, "Signed in as")

    def _browser_login(self) -> Outcome:
        client = self.client()
        redirect_uri = self.oauth.redirect_uri
        flow = client.start_auth_code_flow(redirect_uri, all_scopes(self.resources))
        answers: queue.Queue[tuple[str, dict[str, str] | None]] = queue.Queue()
        listener = RedirectListener.start(redirect_uri, answers)
        self.say(f"Sign in as {self.mailbox}: open this address in a browser (any machine):")
        self.say()
        self.say(flow["auth_uri"])
        self.say()
        if listener is not None:
            self.say(f"Waiting for the browser to return to {redirect_uri} ... or paste the")
            self.say("address the browser ends on (it has a code in it) here and press Enter:")
        else:
            self.say("Then paste the address the browser ends on (it has a code in it) here")
            self.say("and press Enter:")
        threading.Thread(target=self._read_pasted, args=(answers,), daemon=True).start()
        try:
            response = self._wait_for_answer(answers, listener is not None)
        finally:
            if listener is not None:
                listener.stop()
        for value in response.values():
            redactor.register(value)  # the authorization code, in case anything logs it
        return client.finish_auth_code_flow(flow, response, self.lead_scopes)

    def _read_pasted(self, answers: queue.Queue) -> None:
        for line in self.stdin:
            if not line.strip():
                continue
            response = parse_redirect(line)
            if response is not None:
                answers.put(("pasted", response))
                return
            self.say("That is not the address the browser ended on (it has a code and a state).")
        answers.put(("end of input", None))

    def _wait_for_answer(self, answers: queue.Queue, listening: bool) -> dict[str, str]:
        deadline = time.monotonic() + LOGIN_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                _source, response = answers.get(timeout=remaining)
            except queue.Empty:
                break
            if response is not None:
                return response
            if not listening:
                raise LoginAborted("standard input ended before an address was pasted")
        raise LoginAborted(f"no answer within {LOGIN_TIMEOUT / 60:.0f} minutes")

    def _device_code_login(self) -> Outcome:
        client = self.client(public=True)  # the device code flow is for public clients
        outcome = self._device_code(client, self.lead_scopes)
        if not outcome.ok:
            return outcome
        # Entra ID refuses a device code for two resources at the token endpoint
        # (AADSTS28000), so consent for the others is asked with a code of their own,
        # and only when the refresh token does not already cover them.
        for resource in self.resources[1:]:
            if client.refresh(list(resource.scopes)).aadsts == CONSENT_MISSING:
                self.say(f"Consent is needed for {resource.permissions} too ({resource.purpose}):")
                self._device_code(client, list(resource.scopes))
        return outcome

    def _device_code(self, client: TokenClient, scopes: list[str]) -> Outcome:
        flow = client.app().initiate_device_flow(scopes=scopes)
        if "user_code" not in flow:
            raise LoginAborted(f"Entra ID refused the device code flow: {flow.get('error')}")
        self.say(flow["message"])
        while True:
            # One poll per call, each under the cache lock for a moment only, so a running
            # daemon is never kept waiting for the person at the other end.
            outcome = client.redeem(
                lambda app, flow_: app.acquire_token_by_device_flow(
                    flow_, exit_condition=lambda _flow: True
                ),
                flow,
            )
            if outcome.error not in _PENDING:
                return outcome
            if time.time() > flow["expires_at"]:
                raise LoginAborted("the device code expired before anyone signed in")
            time.sleep(flow.get("interval", 5))

    # --- import / refresh / logout -------------------------------------------------------

    def import_token(self) -> int:
        if self.stdin.isatty():
            refresh_token = getpass.getpass("Refresh token (input hidden): ")
        else:
            refresh_token = self.stdin.read()
        refresh_token = refresh_token.strip()
        if not refresh_token:
            self.say("No refresh token on standard input.")
            return 1
        redactor.register(refresh_token)
        client = self.client()
        try:
            outcome = client.redeem(
                lambda app, token: app.acquire_token_by_refresh_token(token, self.lead_scopes),
                refresh_token,
            )
        except MailboxMismatch as error:
            self.say(f"Import refused: {error} The token cache was not changed.")
            return 1
        return self._report(outcome, "Imported the refresh token of")

    def refresh(self) -> int:
        outcome = self.client().refresh(self.lead_scopes)
        return self._report(outcome, "Refreshed the tokens of")

    def logout(self) -> int:
        names = self.client().logout()
        if not names:
            self.say("Nobody was signed in.")
            return 0
        self.say(f"Signed out {', '.join(names)}: the token cache holds no tokens now.")
        self.say("relayd keeps mail queued until someone signs in again.")
        return 0

    def _report(self, outcome: Outcome, verb: str) -> int:
        if outcome.ok:
            self.say(f"{verb} {outcome.username}.")
            self.say(f"Access token valid until {when(outcome.expires_at)}.")
            missing = self._other_resources()
            self.say(
                f"Token cache: {self.store.cache_path} (mode 0600). A running relayd uses it "
                f"within {self.oauth.cache_poll_interval:g}s."
            )
            return 1 if missing else 0
        if outcome.kind == NO_ACCOUNT:
            self.say(f"Nobody has signed in as {self.mailbox}. Run: {self.login_command}")
            return 1
        text = failure_text(outcome, self.oauth.effective_authority)
        self.say(text[0].upper() + text[1:] + ".")
        if outcome.kind == REAUTH:
            self.say(f"Sign in again: {self.login_command}")
        elif outcome.kind == CONFIG:
            self.say("A new sign-in does not help: fix the setting named above, then try again.")
        elif outcome.kind == TRANSIENT:
            self.say("The token cache was not changed: try again once Entra ID answers.")
        return 1

    def _other_resources(self) -> list[Resource]:
        """After the first token: the other resources' with the same refresh token. The
        required ones that Entra ID refused; each refusal printed with what to do."""
        if len(self.resources) == 1:
            return []
        client = self.client()
        missing = []
        for resource in self.resources[1:]:
            outcome = client.refresh(list(resource.scopes))
            label = f"Token for {resource.purpose} ({resource.permissions})"
            if outcome.ok:
                self.say(f"{label}: valid until {when(outcome.expires_at)}.")
                continue
            if outcome.aadsts == CONSENT_MISSING:
                self.say(f"{label}: AADSTS65001, {resource.consent_advice(self.login_command)}.")
            else:
                self.say(f"{label}: {failure_text(outcome, self.oauth.effective_authority)}")
            if resource.required:
                missing.append(resource)
            else:
                self.say("Mail still flows without it; only that capability waits.")
        return missing

    # --- status --------------------------------------------------------------------------

    def status(self, as_json: bool = False) -> int:
        report = self.status_report()
        if as_json:
            self.say(json.dumps(report, indent=2, sort_keys=True))
        else:
            self.print_status(report)
        return 0 if report["healthy"] else 1

    def status_report(self) -> dict[str, Any]:
        """The cache (no network) joined with what the daemon last recorded about it."""
        client = self.client()
        client.read()
        view = client.view()
        daemon = self.store.read_state()
        current = daemon is not None and daemon.get("cache") == stamp_to_json(client.stamp)
        refresh_token_alive = view.rotated_at is not None
        if view.account is None:
            state, advice = NO_TOKEN, f"nobody has signed in as {self.mailbox}: run "
            advice += self.login_command
        elif current and daemon and daemon.get("state") not in (OK, "refreshing"):
            state, advice = daemon["state"], daemon.get("advice")
        else:
            state, advice = (OK, None) if refresh_token_alive else (REAUTH_REQUIRED, None)
        healthy = state == OK
        return {
            "account": view.account,
            "mailbox": self.mailbox,
            "scopes": all_scopes(self.resources),
            "resources": self._resource_reports(client, daemon if current else None),
            "state": state,
            "healthy": healthy,
            "advice": advice or (None if healthy else f"sign in again: {self.login_command}"),
            "aadsts": daemon.get("aadsts") if current and daemon else None,
            "access_token_expires_at": view.expires_at or None,
            "refresh_token_rotated_at": view.rotated_at,
            "last_refresh": daemon.get("last_refresh") if daemon else None,
            "daemon": daemon,
            "daemon_saw_this_cache": current,
            "token_cache": str(self.store.cache_path),
        }

    def _resource_reports(
        self, client: TokenClient, daemon: dict[str, Any] | None
    ) -> dict[str, dict[str, Any]]:
        """Each resource's cached access token, and the state the daemon last saw."""
        seen = (daemon or {}).get("resources") or {}
        reports = {}
        for resource in self.resources:
            expires_at = client.view(list(resource.scopes)).expires_at or None
            recorded = seen.get(resource.name) or {}
            reports[resource.name] = {
                "scopes": list(resource.scopes),
                "purpose": resource.purpose,
                "required": resource.required,
                "access_token_expires_at": expires_at,
                "state": recorded.get("state"),
                "advice": recorded.get("advice"),
            }
        return reports

    def print_status(self, report: dict[str, Any]) -> None:
        daemon = report["daemon"]
        rows = [
            ("Account", report["account"] or f"none ({self.mailbox_setting} is {self.mailbox})"),
            ("Scopes", " ".join(report["scopes"])),
            *self._resource_rows(report["resources"]),
            ("Refresh token", rotation(report["refresh_token_rotated_at"])),
            ("Last refresh", when(report["last_refresh"]) if report["last_refresh"] else "-"),
            ("Daemon saw", daemon_line(daemon, report["daemon_saw_this_cache"])),
            ("Token cache", report["token_cache"]),
            ("Health", "OK" if report["healthy"] else f"NOT USABLE ({report['state']})"),
        ]
        for label, value in rows:
            self.say(f"{label + ':':<15} {value}")
        for name, resource in report["resources"].items():
            if resource["advice"] and len(report["resources"]) > 1:
                self.say(f"{name + ':':<15} {resource['advice']}")
        if report["advice"]:
            self.say(f"What to do:     {report['advice']}")

    @staticmethod
    def _resource_rows(resources: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """One "Access token" row per resource (one row, as before, when there is one)."""
        rows = []
        for name, resource in resources.items():
            text = expiry(resource["access_token_expires_at"])
            if len(resources) > 1:
                state = f" [{resource['state']}]" if resource["state"] else ""
                text = f"{name} ({' '.join(resource['scopes'])}): {text}{state}"
            rows.append(("Access token", text))
        return rows


class LoginAborted(Exception):
    """The sign-in did not complete (timeout, no input, refused device flow)."""


# --- the one-shot redirect listener ------------------------------------------------------


class RedirectListener:
    """Answers the browser's single visit to ``http://localhost:PORT/...``."""

    def __init__(self, server: HTTPServer) -> None:
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    @classmethod
    def start(cls, redirect_uri: str, answers: queue.Queue) -> RedirectListener | None:
        """A listener when the redirect URI is local plain HTTP; None otherwise."""
        parts = urllib.parse.urlsplit(redirect_uri)
        if parts.scheme != "http" or parts.hostname not in ("localhost", "127.0.0.1"):
            return None
        try:
            server = HTTPServer(("127.0.0.1", parts.port or 80), _redirect_handler(answers))
        except OSError as error:
            print(
                f"relayd: cannot listen on {redirect_uri} ({error.strerror}); paste instead.",
                file=sys.stderr,
            )
            return None
        return cls(server)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _redirect_handler(answers: queue.Queue) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """The request line holds the authorization code: never log it."""

        def do_GET(self) -> None:
            response = parse_redirect(self.path)
            if response is None:
                self._page(404, "This is relayd's sign-in listener; nothing else is here.")
                return
            if "error" in response:
                problem = response.get("error_description") or response["error"]
                self._page(400, f"Sign-in failed: {problem}")
            else:
                self._page(200, "relayd received the sign-in. You can close this window.")
            answers.put(("browser", response))

        def _page(self, status: int, text: str) -> None:
            body = f"<!doctype html><title>relayd</title><p>{html.escape(text)}</p>\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def parse_redirect(text: str) -> dict[str, str] | None:
    """The query of the address the browser ended on, if it carries an OAuth answer."""
    text = text.strip()
    query = urllib.parse.urlsplit(text).query if "?" in text else text.lstrip("?#")
    response = dict(urllib.parse.parse_qsl(query))
    if "state" in response and ("code" in response or "error" in response):
        return response
    return None

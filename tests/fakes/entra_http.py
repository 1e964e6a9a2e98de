"""The fake Entra ID's HTTP side: the TLS server, the request handler, the error
bodies Entra sends, and the browser a test plays (tests/fakes/entra.py has the
identity provider itself)."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.fakes.entra import FakeEntra

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


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_jwt(claims: dict) -> str:
    """An ID token. MSAL decodes it without checking the signature (it came over TLS)."""
    header = b64url(json.dumps({"typ": "JWT", "alg": "none"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def error_answer(status: int, error: str, aadsts: int) -> tuple[int, dict]:
    return status, {
        "error": error,
        "error_description": f"AADSTS{aadsts}: {AADSTS_TEXTS.get(aadsts, error)} "
        f"Trace ID: {secrets.token_hex(8)} Timestamp: {time.strftime('%Y-%m-%d %H:%M:%SZ')}",
        "error_codes": [aadsts],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "trace_id": secrets.token_hex(8),
        "correlation_id": secrets.token_hex(8),
    }


class TLSServer(ThreadingHTTPServer):
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


class Handler(BaseHTTPRequestHandler):
    server: TLSServer
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
            self._send_json(400, error_answer(400, "invalid_tenant", 90002)[1])
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

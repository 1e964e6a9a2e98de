"""What `relayd send-test` prints: its steps, and a hint for every failure it knows.

``Steps`` writes one line per step. ``TracedSMTP`` is aiosmtplib's client reporting
each command it sends and the reply it gets (never a token), so ``--direct`` runs the
daemon's own ``SmtpTransport`` and still shows where a session stops. ``hint`` maps a
reply or an error text to what a person should do about it.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import aiosmtplib

from relayd.ops.logging import redactor
from relayd.transports.graph_client import Exchange
from relayd.transports.replies import reply_text
from relayd.transports.session import RelaySMTP


class Steps:
    """One line per step: ``  - EHLO      250 …`` or ``  x AUTH      535 …``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def title(self, text: str) -> None:
        self._print(f"relayd send-test: {text}")

    def step(self, name: str, text: str) -> None:
        self._print(f"  - {name:<9} {text}")

    def failed(self, name: str, text: str) -> None:
        self._print(f"  x {name:<9} {text}")

    def success(self, text: str) -> None:
        self._print(f"OK: {text}")

    def failure(self, text: str, hint: str | None = None) -> None:
        self._print(f"FAILED: {text}")
        if hint:
            self._print(f"Hint: {hint}")

    def _print(self, text: str) -> None:
        # The redactor as a last line of defence: no step ever formats a token.
        print(redactor(text), file=self.out, flush=True)


def one_line(error: BaseException) -> str:
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return reply_text(error.code, error.message)
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]


class TracedSMTP(RelaySMTP):
    """The transport's client (aiosmtplib's), printing each step of the session."""

    def __init__(self, steps: Steps, **options: Any) -> None:
        super().__init__(**options)
        self._steps = steps
        self._greeted = False

    async def connect(self, **options: Any) -> aiosmtplib.SMTPResponse:
        self._steps.step("connect", f"{self.hostname} port {self.port}")
        try:
            return await super().connect(**options)
        except (aiosmtplib.SMTPException, OSError) as error:
            if not self._greeted:  # later steps have reported their own failure
                self._steps.failed("connect", one_line(error))
            raise

    async def ehlo(self, **options: Any) -> aiosmtplib.SMTPResponse:
        if not self._greeted:
            self._greeted = True
            host, port = self.get_transport_info("peername")[:2]
            self._steps.step("connect", f"connected to {host} port {port}")
            if self.get_transport_info("ssl_object") is not None:  # implicit TLS
                self._report_tls()
        response = await self._traced("EHLO", str(self.local_hostname), super().ehlo(**options))
        offered = [name.upper() for name in self.esmtp_extensions if name != "auth"]
        if self.server_auth_methods:
            offered.append("AUTH " + " ".join(m.upper() for m in self.server_auth_methods))
        self._steps.step("", f"offers {', '.join(offered) or 'no extensions'}")
        return response

    async def starttls(self, **options: Any) -> aiosmtplib.SMTPResponse:
        response = await self._traced("STARTTLS", "upgrade", super().starttls(**options))
        self._report_tls()
        return response

    async def auth_xoauth2(
        self, username: str | bytes, access_token: str | bytes, /, **options: Any
    ) -> aiosmtplib.SMTPResponse:
        detail = f"XOAUTH2 as {_text(username)}"
        return await self._traced(
            "AUTH", detail, super().auth_xoauth2(username, access_token, **options)
        )

    async def mail(self, sender: str, /, **options: Any) -> aiosmtplib.SMTPResponse:
        return await self._traced("MAIL FROM", f"<{sender}>", super().mail(sender, **options))

    async def rcpt(self, recipient: str, /, **options: Any) -> aiosmtplib.SMTPResponse:
        call = super().rcpt(recipient, **options)
        return await self._traced("RCPT TO", f"<{recipient}>", call)

    async def data(self, message: str | bytes, /, **options: Any) -> aiosmtplib.SMTPResponse:
        call = super().data(message, **options)
        return await self._traced("DATA", f"{len(message)} bytes", call)

    async def _traced(
        self, name: str, detail: str, call: Awaitable[aiosmtplib.SMTPResponse]
    ) -> aiosmtplib.SMTPResponse:
        try:
            response = await call
        except (aiosmtplib.SMTPException, OSError) as error:  # ssl.SSLError is an OSError
            self._steps.failed(name, f"{detail}: {one_line(error)}")
            raise
        first_line = response.message.splitlines()[0] if response.message else ""
        self._steps.step(name, f"{detail}: {reply_text(response.code, first_line)}")
        return response

    def _report_tls(self) -> None:
        tls: ssl.SSLObject = self.get_transport_info("ssl_object")
        certificate = tls.getpeercert() or {}
        subject = _distinguished_name(certificate.get("subject", ()))
        issuer = _distinguished_name(certificate.get("issuer", ()))
        names = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]
        also = f", names {', '.join(names[:4])}" if names else ""
        self._steps.step(
            "TLS",
            f"{tls.version()}; certificate subject {subject}{also}; issuer {issuer};"
            f" verified for {self.hostname}",
        )


def graph_observer(steps: Steps) -> Callable[[Exchange], None]:
    """Prints each Graph request and its answer (never a token or an upload URL)."""

    def show(exchange: Exchange) -> None:
        method, _, what = exchange.step.partition(" ")
        took = f"{exchange.seconds:.2f} s"
        if exchange.reply is None:
            steps.failed(method, f"{what} ({exchange.detail}): no answer: {exchange.error}")
            return
        reply = exchange.reply
        words = f"{reply.status} {reply.code}: {reply.message}" if reply.code else str(reply.status)
        extra = f"request-id {reply.request_id}, {took}" if reply.request_id else took
        line = f"{what} ({exchange.detail}): {' '.join(words.split())[:300]} ({extra})"
        if reply.ok:
            steps.step(method, line)
        else:
            steps.failed(method, line)

    return show


def _distinguished_name(rdns: tuple) -> str:
    """((('commonName', 'outlook.com'),), …) → "CN=outlook.com, …" (ssl's peer cert)."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU"}
    parts = [f"{short.get(key, key)}={value}" for rdn in rdns for key, value in rdn]
    return ", ".join(parts) or "(empty)"


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# --- hints ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hint:
    pattern: re.Pattern[str]
    advice: str  # str.format fields: mailbox, sender, host, port, config, login


def _hint(pattern: str, advice: str) -> Hint:
    return Hint(re.compile(pattern, re.IGNORECASE), advice)


# Ordered: the first match wins (a certificate error is also a TLS error).
UPSTREAM_HINTS = (
    _hint(
        r"\b5\.7\.139\b",
        "SMTP AUTH is disabled for the tenant or for {mailbox}. An Exchange administrator"
        " runs, in Exchange Online PowerShell: Set-CASMailbox -Identity {mailbox}"
        " -SmtpClientAuthenticationDisabled $false (for the whole tenant:"
        " Set-TransportConfig -SmtpClientAuthenticationDisabled $false). Security defaults"
        " in Entra ID turn SMTP AUTH off as well.",
    ),
    _hint(
        r"\b535\b.*\b5\.7\.3\b",
        "Exchange Online refused the access token. Sign in again: {login}. Check that the"
        " account that signs in is {mailbox} itself and that the app registration has the"
        " delegated permission SMTP.Send (https://outlook.office.com/SMTP.Send) with"
        " consent granted.",
    ),
    _hint(
        r"\b5\.2\.252\b|SendAsDenied|SendOnBehalf|\b5\.7\.60\b",
        "Exchange Online refused the sender: {mailbox} may not send as {sender}. Send as"
        " the mailbox (--from {mailbox}); or grant {mailbox} the Send As right on {sender}"
        " and list it in upstream.send_as; or remove it from upstream.send_as and keep"
        " upstream.from_rewrite: true, so relayd sends such mail as {mailbox}.",
    ),
    _hint(
        r"CERTIFICATE_VERIFY_FAILED|certificate verify failed",
        "The certificate {host} presented is not trusted. A TLS-inspecting proxy or"
        " firewall between this host and Microsoft 365 presents its own certificate: ask"
        " for its CA certificate (PEM) and set upstream.ca_file to that file in {config}."
        " Do not turn certificate checks off.",
    ),
    _hint(
        r"\bSSL\b|\bTLS\b|handshake",
        "The TLS handshake with {host}:{port} failed. Microsoft 365 wants STARTTLS on"
        " port 587 (upstream.tls: starttls) with TLS 1.2 or newer; port 465 is not offered.",
    ),
    _hint(
        r"STARTTLS extension not supported",
        "{host}:{port} does not offer STARTTLS: check upstream.host and upstream.port"
        " (smtp.office365.com, 587) in {config}.",
    ),
    _hint(
        r"does not support XOAUTH2",
        "{host} does not offer AUTH XOAUTH2: upstream.host should be smtp.office365.com.",
    ),
    _hint(
        r"\b432\b.*\b4\.3\.2\b|\b421\b",
        "Exchange Online is throttling {mailbox}: at most 3 connections per mailbox. A"
        " running relayd may be holding them: send through it instead (without --direct),"
        " or try again in a minute.",
    ),
    _hint(r"QuotaExceeded", "{mailbox} has used up its sending quota; it recovers by itself."),
    _hint(
        r"Connection refused|Connect call failed|Errno 111",
        "Nothing accepted a connection at {host}:{port}: check upstream.host and"
        " upstream.port (smtp.office365.com, 587) in {config}, and that a firewall lets"
        " this host connect out to TCP port 587.",
    ),
    _hint(
        r"timed out|timeout",
        "{host}:{port} did not answer in time: a firewall probably drops outgoing"
        " connections to TCP port 587; ask for smtp.office365.com:587 to be opened.",
    ),
    _hint(
        r"Name or service not known|name resolution|nodename nor servname|No address",
        "{host} does not resolve: check upstream.host in {config} and this host's DNS.",
    ),
)

# Microsoft Graph (upstream.transport graph, or auto after 535 5.7.139). Checked before
# UPSTREAM_HINTS, whose SendAs, certificate and DNS advice applies to Graph too.
GRAPH_HINTS = (
    _hint(
        r"\b401\b.*InvalidAuthenticationToken|InvalidAuthenticationToken",
        "Microsoft Graph refused the access token. Its token must be for Microsoft Graph"
        " (Mail.Send), which the sign-in asks for when upstream.transport is graph or auto:"
        " sign in again as {mailbox}: {login}; check that the app registration has the"
        " delegated permission Mail.Send (Microsoft Graph) with consent granted.",
    ),
    _hint(
        r"\b403\b.*ErrorAccessDenied|ErrorAccessDenied",
        "The token lacks the permission to send: in the app registration add Microsoft"
        " Graph → Delegated → Mail.Send, grant admin consent (or consent at the sign-in),"
        " then {login}.",
    ),
    _hint(
        r"AADSTS65001",
        "Nobody consented to the Graph permission for this app: grant admin consent for"
        " Mail.Send in the app registration, or sign in again ({login}): it asks for it.",
    ),
    _hint(
        r"\b(429|503|504)\b",
        "Microsoft Graph is throttling {mailbox} (at most 4 requests at once and 10,000"
        " per 10 minutes per mailbox). A running relayd may be using them: send through it"
        " instead (without --direct), which waits out Retry-After by itself; or try again"
        " after the time Graph named.",
    ),
    _hint(
        r"cannot use https://|Cannot connect to host|Connection refused|timed out|no answer",
        "{graph_url} could not be reached: check upstream.graph_url in {config}, that this"
        " host may connect out to graph.microsoft.com on port 443, and the proxy's CA"
        " (upstream.ca_file).",
    ),
)

RELAY_HINTS = (
    _hint(
        r"Access denied",
        "This host's address is not in the relay's listen.allowed_clients ({config}).",
    ),
    _hint(
        r"is not allowed: this relay sends as",
        "Send as the mailbox (--from {mailbox}), list the address in upstream.send_as,"
        " or set upstream.from_rewrite: true so relayd rewrites From:.",
    ),
    _hint(r"Insufficient system storage", "The spool's disk is nearly full: free space."),
)


def hint(text: str, context: Mapping[str, object], table: tuple[Hint, ...]) -> str | None:
    """The advice for the first entry of ``table`` whose pattern occurs in ``text``."""
    for entry in table:
        if entry.pattern.search(text):
            return entry.advice.format(**context)
    return None

"""send-test's hints: each known failure text finds its own advice, and only that."""

from __future__ import annotations

import io

import pytest

from relayd.ops.logging import redactor
from relayd.tools.sendtrace import RELAY_HINTS, UPSTREAM_HINTS, Steps, hint
from tests.fakes import exchange

CONTEXT = {
    "mailbox": "relay@contoso.example",
    "sender": "billing@contoso.example",
    "host": "smtp.office365.com",
    "port": 587,
    "config": "/etc/relayd/relayd.yaml",
    "login": "relayd auth login -c /etc/relayd/relayd.yaml",
}


@pytest.mark.parametrize(
    ("text", "advice"),
    [
        (exchange.BAD_TOKEN, "Sign in again: relayd auth login -c /etc/relayd/relayd.yaml"),
        (exchange.AUTH_DISABLED, "Set-CASMailbox -Identity relay@contoso.example"),
        (
            "554 5.2.252 SendAsDenied; relay@contoso.example not allowed to send as x@y",
            "may not send as billing@contoso.example",
        ),
        (
            "cannot use smtp.office365.com:587: [SSL: CERTIFICATE_VERIFY_FAILED] certificate"
            " verify failed: self-signed certificate in certificate chain (_ssl.c:1006)",
            "upstream.ca_file",
        ),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number", "port 465 is not offered"),
        (
            "Error connecting to smtp.office365.com on port 587: [Errno 111] Connect call"
            " failed ('52.96.0.1', 587)",
            "firewall lets this host connect out to TCP port 587",
        ),
        ("Timed out connecting to smtp.office365.com on port 587", "drops outgoing"),
        (exchange.TOO_MANY_CONNECTIONS, "at most 3 connections"),
        (
            "oauth_token_generator provided but server does not support XOAUTH2",
            "should be smtp.office365.com",
        ),
    ],
)
def test_each_known_failure_gets_its_own_hint(text: str, advice: str) -> None:
    assert advice in (hint(text, CONTEXT, UPSTREAM_HINTS) or "")


def test_basic_auth_refusal_5_7_30_is_not_mistaken_for_a_refused_token() -> None:
    text = "535 5.7.30 Basic authentication is not supported for Client Submission"
    assert "Sign in again" not in (hint(text, CONTEXT, UPSTREAM_HINTS) or "")


def test_relay_replies_have_their_own_hints() -> None:
    denied = "554 5.7.1 Access denied: 10.0.0.9 may not relay through this host"
    assert "listen.allowed_clients" in (hint(denied, CONTEXT, RELAY_HINTS) or "")
    assert hint("250 2.0.0 Ok: queued as 6616C0E6FCFAD1116C9", CONTEXT, RELAY_HINTS) is None


def test_steps_never_print_a_registered_secret() -> None:
    out = io.StringIO()
    secret = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.secret-access-token-value"
    redactor.register(secret)
    Steps(out).step("AUTH", f"token {secret}")
    assert secret not in out.getvalue() and "<redacted>" in out.getvalue()

"""What the fake upstreams share on the wire: their TLS certificate, the config that
points relayd at them, XOAUTH2's initial response and the From: addresses of a
message."""

from __future__ import annotations

import base64
import ssl
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import trustme

from tests.fakes.entra import CLIENT_ID, TENANT_ID

_CERTIFICATES: dict[int, trustme.LeafCert] = {}


def server_tls_context(ca: trustme.CA) -> ssl.SSLContext:
    cert = _CERTIFICATES.get(id(ca))
    if cert is None:
        cert = _CERTIFICATES[id(ca)] = ca.issue_cert("127.0.0.1", "localhost", "::1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def relay_config(host: str, port: int, mailbox: str, ca_file: Path, **upstream: Any) -> dict:
    """Config overrides that point relayd at a fake upstream on ``host:port``."""
    return {
        "upstream": {
            "transport": "smtp",
            "host": host,
            "port": port,
            "tls": "starttls",
            "mailbox": mailbox,
            "ca_file": str(ca_file),
            **upstream,
        },
        "oauth": {"tenant_id": TENANT_ID, "client_id": CLIENT_ID},
    }


def parse_xoauth2(initial: str | bytes) -> tuple[str, str]:
    """("user", "token") from base64("user=U\\x01auth=Bearer T\\x01\\x01")."""
    try:
        text = base64.b64decode(initial).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return "", ""
    fields = dict(part.split("=", 1) for part in text.split("\x01") if "=" in part)
    token = fields.get("auth", "")
    return fields.get("user", ""), token.removeprefix("Bearer ")


def from_addresses(content: bytes) -> list[str]:
    header = BytesHeaderParser().parsebytes(content).get_all("From") or []
    return [address for _, address in getaddresses([str(value) for value in header])]

"""The words of the listener's replies: aiosmtpd's terse defaults reworded for a person,
and client text echoed back made safe.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

# Replies a person can act on, in place of aiosmtpd's terse defaults.
_REWORDED = {
    b"500 Error: bad syntax": b"500 5.5.2 Syntax error: empty command line",
    b"500 Command line too long": b"500 5.5.2 Command line too long (RFC 5321 4.5.3.1.4: 512)",
    b"503 Error: need MAIL command": b"503 5.5.1 Send MAIL FROM before RCPT TO",
    b"503 Error: need RCPT command": b"503 5.5.1 Send RCPT TO before DATA",
    b"503 Error: nested MAIL command": b"503 5.5.1 MAIL FROM was already given; RSET first",
    b"503 Error: send HELO first": b"503 5.5.1 Send HELO or EHLO first",
    b"553 5.1.3 Error: malformed address": b"501 5.1.3 Malformed address; use <user@example.com>",
    b"552 Error: message size exceeds fixed maximum message size": (
        b"552 5.3.4 Message size exceeds the fixed maximum message size"
    ),
    b"500 Error: strict ASCII mode": b"500 5.6.7 Non-ASCII command needs SMTPUTF8",
}


def safe_reply(reply: bytes) -> bytes:
    """The reply as sent: reworded, and with no control character. aiosmtpd echoes some
    client text in replies; a control character there would make a malformed reply
    (RFC 5321 §4.2) or inject a line."""
    safe = _SAFE_REPLIES.get(reply)
    if safe is None:
        safe = _CONTROL.sub(b"?", _reword(reply))
        # The same few replies go to every message; "queued as <id>" never repeats.
        if len(_SAFE_REPLIES) < _SAFE_REPLIES_KEPT and not reply.startswith(_QUEUED):
            _SAFE_REPLIES[reply] = safe
    return safe


_SAFE_REPLIES: dict[bytes, bytes] = {}
_SAFE_REPLIES_KEPT = 256
_QUEUED = b"250 2.0.0 Ok: queued as "


def _reword(reply: bytes) -> bytes:
    if reply in _REWORDED:
        return _REWORDED[reply]
    if reply.startswith(b'500 Error: command "'):
        return b"500 5.5.1 Command not recognized"
    if reply.startswith(b"501 Syntax: "):
        return b"501 5.5.4 Syntax: " + reply[len(b"501 Syntax: ") :]
    return reply

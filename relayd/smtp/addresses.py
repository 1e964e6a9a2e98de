"""Addresses in MAIL FROM and RCPT TO: what a relay may accept, and the reply when not.

The text is checked as the client wrote it (``RelaySMTP._getaddr`` does not
reinterpret it), against RFC 5321 §4.1.2's mailbox with RFC 6531's UTF-8 extension.
"""

from __future__ import annotations

import re

# RFC 5321 §4.1.2 / RFC 6531: a plain mailbox, or an address literal as domain.
_MAILBOX = re.compile(
    r"^[^\s<>@\"\\(),;:]+(?:\.[^\s<>@\"\\(),;:]+)*@(?:[^\s<>@\[\]()\\]+|\[[^\s\]]+\])$"
)
_QUOTED_MAILBOX = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"@(?:[^\s<>@\[\]()\\]+|\[[^\s\]]+\])$')
_MAX_PATH = 254  # RFC 5321 §4.5.3.1.3 (256 octets including the angle brackets)


_CONTROL_TEXT = re.compile(r"[\x00-\x1f\x7f]")


def valid_mailbox(address: str, mail_options: list) -> bool:
    if len(address) > _MAX_PATH or _CONTROL_TEXT.search(address):
        return False
    if not address.isascii() and "SMTPUTF8" not in mail_options:
        return False
    try:
        address.encode("utf-8")  # surrogates: the client sent invalid UTF-8
    except UnicodeEncodeError:
        return False
    return bool(_MAILBOX.match(address) or _QUOTED_MAILBOX.match(address))


def bad_address_reply(address: str, mail_options: list, code: str) -> str:
    if not address.isascii() and "SMTPUTF8" not in mail_options:
        # RFC 6531 §3.5: non-ASCII addresses need the SMTPUTF8 parameter on MAIL.
        return "553 5.6.7 Non-ASCII address needs SMTPUTF8"
    # RFC 5321 §4.2.2 / §4.1.2: 501 syntax error in parameters.
    return f"501 {code} Malformed address; use <user@example.com>"

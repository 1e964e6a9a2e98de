"""Addresses in MAIL FROM and RCPT TO: what a relay may accept, and the reply when not;
and the name a client gives in EHLO/HELO, as relayd keeps it.

The text is checked as the client wrote it (``split_path`` does not reinterpret it),
against RFC 5321 §4.1.2's mailbox with RFC 6531's UTF-8 extension.
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


def is_postmaster(address: str) -> bool:
    """RFC 5321 §4.5.1: ``RCPT TO:<Postmaster>``, no domain, any case, must be accepted.
    relayd delivers it to the relay's mailbox (``SenderPolicy.upstream_recipients``)."""
    return address.lower() == "postmaster"


def valid_recipient(address: str, mail_options: list) -> bool:
    return is_postmaster(address) or valid_mailbox(address, mail_options)


def split_path(text: str) -> tuple[str, str] | None:
    """``<address> params`` split at the ``>`` that closes the path, or None when none
    does. A ``>`` inside a quoted local part (RFC 5321 §4.1.2 Quoted-string, where a
    backslash quotes the next character) belongs to the address: <"a>b"@example.com>."""
    end = text.find(">")
    quote = text.find('"')
    if quote < 0 or 0 <= end < quote:  # no quoted string before the first ">"
        return None if end < 0 else (text[1:end], text[end + 1 :])
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return text[1:index], text[index + 1 :]
    return None


def split_command_path(arg: str) -> tuple[str, str]:
    """MAIL FROM's or RCPT TO's "<address> params" split as the client wrote it, without
    reinterpreting it: ("", "") for nothing, the null reverse-path as "<>" (RFC 5321
    §4.5.5: bounces use it), a source route dropped (§4.1.2), and an unclosed path
    kept whole (the address checks then refuse it)."""
    stripped = arg.strip()
    if not stripped:
        return "", ""
    if stripped.startswith("<"):
        path = split_path(stripped)
        if path is None:
            return stripped, ""
        address, rest = path
    else:
        address, _, rest = stripped.partition(" ")
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]  # RFC 5321 §4.1.2: ignore a source route
    return (address or "<>"), rest.strip()


def printable_name(name: str) -> str:
    """An EHLO/HELO name as relayd stores and shows it: every character that is not
    printable becomes "?". That covers the bytes that were not UTF-8 (aiosmtpd keeps
    them as lone surrogates, which no encoder accepts) and control characters; a valid
    UTF-8 name stays as it is. Postfix keeps the name the same way (printable(name,
    '?') in smtpd.c's helo_cmd)."""
    if name.isascii() and name.isprintable():
        return name  # nearly every client: no copy
    return "".join(char if char.isprintable() else "?" for char in name)


def bad_address_reply(address: str, mail_options: list, code: str) -> str:
    if not address.isascii() and "SMTPUTF8" not in mail_options:
        # RFC 6531 §3.5: non-ASCII addresses need the SMTPUTF8 parameter on MAIL.
        return "553 5.6.7 Non-ASCII address needs SMTPUTF8"
    # RFC 5321 §4.2.2 / §4.1.2: 501 syntax error in parameters.
    return f"501 {code} Malformed address; use <user@example.com>"

"""Reading and adding header fields on raw message bytes, without re-encoding anything.

relayd never parses and re-serialises a message (that would change its bytes); it
looks at the header block as bytes and only ever prepends fields.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from email.utils import formatdate

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_SAFE_TRACE_TOKEN = re.compile(r"[^A-Za-z0-9.\-\[\]:_]")
TRACE_TOKEN_MAX = 255  # a client's or our own name in Received: and Message-ID:
FIELD_LINE_MAX = 998  # RFC 5322 §2.1.1: a line is at most 998 characters plus CRLF

# What relayd may add to a message on its way to the upstream, at most (RFC 1870 counts
# the message as the upstream receives it, so this room is kept out of listen.
# max_message_size: the listener advertises and accepts max_message_size - ADDED_AT_MOST).
# The worst cases, each checked by tests/unit/test_headers.py:
#   Received: (received_field)                          ~920 octets
#   Date: and Message-ID: when missing (missing_fields)  ~340 octets
#   the sender policy's From: (rewritten or added)     ~1010 octets (FIELD_LINE_MAX)
# Every part is bounded by a length cap in the code that writes it; 4 KiB covers them
# with room to spare. (The Maildir transport's Return-Path:/Envelope-To: are local and
# meet no upstream limit.)
ADDED_AT_MOST = 4096


@dataclass(frozen=True)
class HeaderSummary:
    """What the listener needs to know about a message's header block."""

    received_count: int
    has_message_id: bool
    has_date: bool
    message_id: str
    from_count: int = 0


def header_block(content: bytes) -> bytes:
    """The header section including its last CRLF (RFC 5322 §2.1), without the body."""
    if content.startswith(b"\r\n"):
        return b""
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 2]


def field_names(block: bytes) -> list[bytes]:
    """Lower-cased field names in order; continuation lines are not fields."""
    return [name.lower() for name in _FIELD_NAME.findall(block)]


def field_value(block: bytes, name: bytes) -> bytes | None:
    """The unfolded value of the first field called ``name`` (case-insensitive)."""
    match = _field_pattern(name).search(block)
    if not match:
        return None
    return re.sub(rb"\r\n(?=[ \t])", b"", match.group(1)).strip()


@functools.cache
def _field_pattern(name: bytes) -> re.Pattern[bytes]:
    # [^\r\n], not ".": "." matches the CR, and a folded field was then cut at its
    # first line.
    return re.compile(
        rb"^" + re.escape(name) + rb"[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
        re.MULTILINE | re.IGNORECASE,
    )


def field_spans(block: bytes, name: bytes) -> list[tuple[int, int]]:
    """Where each field called ``name`` is in ``block``: from its name to the CRLF that
    ends its last continuation line, in order."""
    return [match.span() for match in _whole_field_pattern(name).finditer(block)]


@functools.cache
def _whole_field_pattern(name: bytes) -> re.Pattern[bytes]:
    return re.compile(
        rb"^" + re.escape(name) + rb"[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
        re.MULTILINE | re.IGNORECASE,
    )


def summarize(content: bytes) -> HeaderSummary:
    block = header_block(content)
    names = field_names(block)
    message_id = field_value(block, b"message-id") if b"message-id" in names else None
    return HeaderSummary(
        received_count=names.count(b"received"),
        has_message_id=message_id is not None,
        has_date=b"date" in names,
        message_id=(message_id or b"").decode("utf-8", "replace")[:200],
        from_count=names.count(b"from"),
    )


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """RFC 5322 §3.3 date-time in local time. It shows whole seconds, so one formatting
    per second serves every message accepted in it (formatdate is slow)."""
    return formatdate(second, localtime=True)


def trace_token(text: str) -> str:
    """A client-supplied name made safe for a Received: field (no header injection)."""
    return _SAFE_TRACE_TOKEN.sub("?", text)[:TRACE_TOKEN_MAX] or "unknown"


def received_field(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    queue_id: str,
    protocol: str,
    recipients: tuple[str, ...],
    when: float,
) -> bytes:
    """The trace field a relay prepends (RFC 5321 §4.4), in Postfix's familiar form.

    The ``for`` clause names the recipient only when there is exactly one, so a
    message to many people does not disclose the whole list to each.
    """
    helo_name = trace_token(helo)
    lines = [
        f"Received: from {helo_name} ([{client_ip}])",
        f"\tby {trace_token(hostname)} (relayd) with {protocol} id {queue_id}",
    ]
    date = _date(int(when))
    single = recipients[0] if len(recipients) == 1 else ""
    if single and not re.search(r"[\s<>\"\\]", single) and single.isascii():
        lines.append(f"\tfor <{single}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def missing_fields(
    summary: HeaderSummary, *, queue_id: str, hostname: str, when: float
) -> tuple[bytes, str]:
    """Date and Message-ID fields for a message that lacks them (RFC 5322 §3.6), and
    the message's Message-ID (its own or the one added)."""
    added = b""
    message_id = summary.message_id
    if not summary.has_date:
        added += f"Date: {_date(int(when))}\r\n".encode()
    if not summary.has_message_id:
        message_id = f"<{queue_id}.{random.getrandbits(32):08x}@{trace_token(hostname)}>"
        added += f"Message-ID: {message_id}\r\n".encode()
    return added, message_id

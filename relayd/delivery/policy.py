"""The sender policy: avoid Exchange Online's 554 5.2.252 SendAsDenied instead of collecting it.

Exchange Online accepts a message only when its envelope sender and its ``From:`` are
the signed-in mailbox or an address the mailbox may send as. Applications rarely know
that, so relayd makes every message acceptable before it leaves:

* the upstream ``MAIL FROM`` is always the mailbox, or the ``From:`` address when
  that address is permitted;
* with ``upstream.from_rewrite`` (the default), a ``From:`` that is not permitted is
  replaced by the mailbox, keeping the display name, and the original goes into
  ``Reply-To:`` when the message has none, so answers still reach the application's
  people;
* without it, such a message is refused at the end of DATA (``refusal``) so the
  application learns at once instead of from a bounce days later.

The stored message is never changed: the rewrite happens on the way out, so a
corrected ``upstream.send_as`` (SIGHUP) applies to mail already queued. Only the
``From:`` field is replaced; every other byte stays as it is.
"""

from __future__ import annotations

import re
from email.utils import formataddr, getaddresses

from relayd import headers
from relayd.config import UpstreamSettings
from relayd.queue.model import Envelope


class SenderPolicy:
    """Decides the upstream envelope sender and the ``From:`` a message leaves with."""

    def __init__(self, upstream: UpstreamSettings) -> None:
        self.mailbox = upstream.mailbox.strip()
        self.rewrite = upstream.from_rewrite
        self._permitted = {
            address.strip().lower() for address in (self.mailbox, *upstream.send_as) if address
        }

    @property
    def active(self) -> bool:
        """No mailbox (the maildir transport without one): nothing to enforce."""
        return bool(self.mailbox)

    def permits(self, address: str) -> bool:
        return address.strip().lower() in self._permitted

    def refusal(self, envelope: Envelope, content: bytes) -> str | None:
        """The listener's end-of-DATA check (``RelayHandler(content_policy=...)``)."""
        if not self.active or self.rewrite:
            return None
        refused = [address for address in from_addresses(content) if not self.permits(address)]
        if not refused:
            return None
        # RFC 5321 §4.2.2 550 (policy) with RFC 3463 5.7.1 "delivery not authorized".
        return (
            f"550 5.7.1 From: {refused[0] or '(unreadable address)'} is not allowed: this"
            f" relay sends as {self.mailbox} and may only use the addresses in"
            " upstream.send_as (upstream.from_rewrite is off)"
        )

    def prepare(self, envelope: Envelope, content: bytes) -> tuple[str, bytes]:
        """The upstream ``MAIL FROM`` and the content to send."""
        if not self.active:
            return envelope.sender, content
        addresses = from_addresses(content)
        if addresses and all(self.permits(address) for address in addresses):
            return addresses[0], content
        if addresses and self.rewrite:
            return self.mailbox, rewrite_from(content, self.mailbox)
        return self.mailbox, content


def from_addresses(content: bytes) -> list[str]:
    """The addresses in the ``From:`` field ("" for one that cannot be parsed)."""
    value = headers.field_value(headers.header_block(content), b"from")
    if value is None:
        return []
    pairs = getaddresses([value.decode("utf-8", "replace")])
    return [address for _, address in pairs] or [""]


def rewrite_from(content: bytes, mailbox: str) -> bytes:
    """Replace the ``From:`` field by the mailbox (same display name); keep the
    original in ``Reply-To:`` unless the message already has one."""
    block = headers.header_block(content)
    match = _field_span(block, b"from")
    if match is None:
        return content
    original = headers.field_value(block, b"from") or b""
    pairs = getaddresses([original.decode("utf-8", "replace")])
    display_name = pairs[0][0] if pairs else ""
    new_from = f"From: {formataddr((display_name, mailbox), charset='utf-8')}\r\n".encode()
    added = b""
    if b"reply-to" not in headers.field_names(block):
        added = b"Reply-To: " + original + b"\r\n"
    return content[: match.start()] + new_from + added + content[match.end() :]


def _field_span(block: bytes, name: bytes) -> re.Match[bytes] | None:
    """The first field called ``name`` with its continuation lines and final CRLF."""
    pattern = re.compile(
        rb"^" + re.escape(name) + rb"[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
        re.MULTILINE | re.IGNORECASE,
    )
    return pattern.search(block)

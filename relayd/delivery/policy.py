"""The sender policy: avoid Exchange Online's 554 5.2.252 SendAsDenied instead of collecting it.

Exchange Online accepts a message only when its envelope sender and its ``From:`` are
the signed-in mailbox or an address the mailbox may send as. Applications rarely know
that, so relayd makes every message acceptable before it leaves:

* the upstream ``MAIL FROM`` is always the mailbox, or the ``From:`` address when
  that address is permitted;
* a ``From:`` that is not permitted is replaced by the mailbox, keeping the display
  name, and the original goes into ``Reply-To:`` when the message has none, so answers
  still reach the application's people;
* a message without ``From:`` gets one (RFC 5322 §3.6 wants exactly one), as Postfix's
  cleanup adds a missing ``From:`` for local clients; ours names the mailbox (or the
  envelope sender when it is permitted), and a foreign envelope sender goes into
  ``Reply-To:``;
* ``From:`` fields after the first (the listener refuses such messages now; these are
  queued from before) are renamed ``X-Original-From:``, so that the upstream sees one;
* with ``upstream.from_rewrite: false`` a foreign ``From:`` is refused at the end of
  DATA instead (``refusal``), so the application learns at once. Mail that is already
  queued when the setting or ``upstream.send_as`` changes is still rewritten on the way
  out: it got a ``250``, and Exchange's SendAsDenied is not cured by retrying.

``RCPT TO:<postmaster>`` (RFC 5321 §4.5.1, no domain) is delivered to the mailbox:
``upstream_recipients`` maps it on the way out and ``envelope_attempt`` tells the result
for the recipient as queued.

The stored message is never changed: the policy applies on the way out, so a
corrected ``upstream.send_as`` (SIGHUP) applies to mail already queued. Only ``From:``
fields change or are added; every other byte stays as it is. What this adds is bounded
(a new ``From:`` line is at most ``headers.FIELD_LINE_MAX``), inside the room the
listener keeps for relayd's additions (``headers.ADDED_AT_MOST``).
"""

from __future__ import annotations

import dataclasses
import functools
from email.utils import formataddr, getaddresses

from relayd import headers
from relayd.config import UpstreamSettings
from relayd.queue.model import Envelope
from relayd.smtp.addresses import is_postmaster
from relayd.transports.base import Attempt

EXTRA_FROM_NAME = b"X-Original-From"


class SenderPolicy:
    """Decides the upstream envelope, and the ``From:`` a message leaves with."""

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
        block = headers.header_block(content)
        spans = headers.field_spans(block, b"from")
        if not spans:
            return self._with_added_from(envelope, content, block)
        first = _addresses(_field_value(block, spans[0]))
        if all(self.permits(address) for address in first):
            mail_from, replacement = first[0], None
        else:
            mail_from, replacement = self.mailbox, _rewritten_from(block, spans[0], self.mailbox)
        if replacement is None and len(spans) == 1:
            return mail_from, content  # the common case: sent exactly as stored
        return mail_from, _replace_fields(content, spans, replacement)

    def upstream_recipients(self, recipients: tuple[str, ...]) -> tuple[str, ...]:
        """The ``RCPT TO`` addresses for the envelope's recipients: ``<postmaster>``
        (RFC 5321 §4.5.1) is the mailbox, and an address asked for twice goes once."""
        if not self.active:
            return recipients
        return tuple(dict.fromkeys(self._upstream(recipient) for recipient in recipients))

    def envelope_attempt(self, recipients: tuple[str, ...], attempt: Attempt) -> Attempt:
        """``attempt`` (made for ``upstream_recipients(recipients)``) told for the
        recipients as queued: each gets the result of the address it was sent to."""
        if not self.active or not any(is_postmaster(r) for r in recipients):
            return attempt
        sent_to = {recipient: self._upstream(recipient) for recipient in recipients}
        failed = dict(attempt.failed)
        return dataclasses.replace(
            attempt,
            delivered=tuple(r for r in recipients if sent_to[r] in attempt.delivered),
            failed=tuple((r, failed[sent_to[r]]) for r in recipients if sent_to[r] in failed),
            deferred=tuple(r for r in recipients if sent_to[r] in attempt.deferred),
        )

    # --- helpers -------------------------------------------------------------------

    def _upstream(self, recipient: str) -> str:
        return self.mailbox if is_postmaster(recipient) else recipient

    def _with_added_from(
        self, envelope: Envelope, content: bytes, block: bytes
    ) -> tuple[str, bytes]:
        """The content with a ``From:`` at the end of its header section."""
        sender = envelope.sender
        if sender and self.permits(sender):
            mail_from, added = sender, _from_field("", sender)
        else:
            mail_from, added = self.mailbox, _from_field("", self.mailbox)
            if sender and b"reply-to" not in headers.field_names(block):
                added += f"Reply-To: <{sender}>\r\n".encode()
        end = len(block)
        return mail_from, content[:end] + added + content[end:]


def from_addresses(content: bytes) -> list[str]:
    """The addresses in every ``From:`` field ("" for one that cannot be parsed)."""
    block = headers.header_block(content)
    found: list[str] = []
    for span in headers.field_spans(block, b"from"):
        found += _addresses(_field_value(block, span))
    return found


def rewrite_from(content: bytes, mailbox: str) -> bytes:
    """The content with its first ``From:`` replaced by the mailbox (same display name)
    and the original kept in ``Reply-To:`` unless the message already has one."""
    block = headers.header_block(content)
    spans = headers.field_spans(block, b"from")
    if not spans:
        return content
    return _replace_fields(content, spans[:1], _rewritten_from(block, spans[0], mailbox))


def _rewritten_from(block: bytes, span: tuple[int, int], mailbox: str) -> bytes:
    """The mailbox's ``From:`` (the original display name kept when it fits on one
    line) and, unless the message has one, a ``Reply-To:`` with the original value
    exactly as it was written, folding included."""
    value = _field_value(block, span)
    pairs = getaddresses([_unfolded(value).decode("utf-8", "replace")])
    new_from = _from_field(pairs[0][0] if pairs else "", mailbox)
    if b"reply-to" in headers.field_names(block):
        return new_from
    if value.find(b"\r\n") + len(b"Reply-To:") > headers.FIELD_LINE_MAX:
        # "Reply-To:" is 4 octets longer than "From:": fold after the colon (RFC 5322
        # §3.2.2 FWS) rather than make a line longer than §2.1.1 allows.
        value = b"\r\n" + (value if value[:1] in (b" ", b"\t") else b" " + value)
    return new_from + b"Reply-To:" + value


def _replace_fields(content: bytes, spans: list[tuple[int, int]], first: bytes | None) -> bytes:
    """The first ``From:`` replaced by ``first`` (None: kept), each later one renamed."""
    start, end = spans[0]
    pieces = [content[:start], content[start:end] if first is None else first]
    for extra_start, extra_end in spans[1:]:
        pieces += [content[end:extra_start], EXTRA_FROM_NAME, content[extra_start + 4 : extra_end]]
        end = extra_end
    pieces.append(content[end:])
    return b"".join(pieces)


def _field_value(block: bytes, span: tuple[int, int]) -> bytes:
    """The raw value of the field at ``span``: after the colon, to its final CRLF."""
    start, end = span
    return block[block.index(b":", start) + 1 : end]


def _unfolded(value: bytes) -> bytes:
    return value.replace(b"\r\n", b"").strip()


def _addresses(value: bytes) -> list[str]:
    return list(_parsed_addresses(value))


# An application sends with the same From: field message after message, and
# getaddresses is a pure parse costing more than the rest of the claim's policy step
# (bench/README.md "What profiling changed"). Bounded: at most 1,024 field values.
@functools.lru_cache(maxsize=1024)
def _parsed_addresses(value: bytes) -> tuple[str, ...]:
    pairs = getaddresses([_unfolded(value).decode("utf-8", "replace")])
    return tuple(address for _, address in pairs) or ("",)


def _from_field(display_name: str, address: str) -> bytes:
    """``From: name <address>`` on one line; without the name when that line would be
    longer than RFC 5322 §2.1.1 allows (which also bounds what relayd adds)."""
    field = f"From: {formataddr((display_name, address), charset='utf-8')}\r\n".encode()
    if display_name and len(field) > headers.FIELD_LINE_MAX + 2:
        return _from_field("", address)
    return field

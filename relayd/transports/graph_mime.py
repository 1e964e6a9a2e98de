"""The MIME relayd hands to Microsoft Graph: recipients as the envelope says, and the
big attachments taken out for upload sessions.

Graph delivers a MIME message to the addresses in its To, Cc and Bcc fields; there is
no SMTP envelope (Graph docs, "Send messages with MIME content"). relayd's envelope can
differ from those fields: a Bcc recipient is in no field, a list address in To: is not
in the envelope, a recipient done in an earlier attempt must not get the message again.
So when the fields and the pending envelope recipients are the same set, the exact
bytes go; otherwise only the To, Cc and Bcc fields are rewritten: To and Cc keep the
pending recipients they named (display names kept), every other pending recipient goes
into Bcc, and addresses that are not pending are left out. Everything else, the body
included, stays byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from dataclasses import dataclass
from email.utils import formataddr, getaddresses

from relayd import headers

RECIPIENT_FIELDS = (b"to", b"cc", b"bcc")


def _field_spans(block: bytes, name: bytes) -> list[tuple[int, int]]:
    """Every field called ``name`` with its continuation lines and final CRLF."""
    pattern = re.compile(
        rb"^" + re.escape(name) + rb"[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
        re.MULTILINE | re.IGNORECASE,
    )
    return [match.span() for match in pattern.finditer(block)]


def _addresses(block: bytes, name: bytes) -> list[tuple[str, str]]:
    values = []
    for start, end in _field_spans(block, name):
        raw = block[start:end].split(b":", 1)[1]
        values.append(re.sub(rb"\r\n(?=[ \t])", b"", raw).strip().decode("utf-8", "replace"))
    return [(display, address) for display, address in getaddresses(values) if address]


def header_recipients(content: bytes) -> dict[bytes, list[tuple[str, str]]]:
    """(display name, address) pairs of To, Cc and Bcc."""
    block = headers.header_block(content)
    return {name: _addresses(block, name) for name in RECIPIENT_FIELDS}


def matches_envelope(content: bytes, recipients: tuple[str, ...]) -> bool:
    """Would Graph, reading the header fields, send to exactly these recipients?"""
    fields = header_recipients(content).values()
    named = {address.lower() for pairs in fields for _, address in pairs}
    return named == {recipient.lower() for recipient in recipients}


def for_envelope(content: bytes, recipients: tuple[str, ...]) -> bytes:
    """The message whose To, Cc and Bcc fields name exactly ``recipients``."""
    if matches_envelope(content, recipients):
        return content
    fields = header_recipients(content)
    pending = {recipient.lower(): recipient for recipient in recipients}
    placed: set[str] = set()
    kept: dict[bytes, list[tuple[str, str]]] = {}
    for name in (b"to", b"cc"):
        kept[name] = []
        for display, address in fields[name]:
            key = address.lower()
            if key in pending and key not in placed:
                kept[name].append((display, address))
                placed.add(key)
    kept[b"bcc"] = [("", address) for key, address in pending.items() if key not in placed]
    return _replace_fields(content, kept)


def _replace_fields(content: bytes, fields: dict[bytes, list[tuple[str, str]]]) -> bytes:
    block = headers.header_block(content)
    spans = sorted(span for name in RECIPIENT_FIELDS for span in _field_spans(block, name))
    pieces, position = [], 0
    for start, end in spans:
        pieces.append(block[position:start])
        position = end
    pieces.append(block[position:])
    added = b"".join(
        _field(name, pairs) for name in RECIPIENT_FIELDS if (pairs := fields.get(name))
    )
    return b"".join(pieces) + added + content[len(block) :]


def _field(name: bytes, pairs: list[tuple[str, str]]) -> bytes:
    title = {b"to": "To", b"cc": "Cc", b"bcc": "Bcc"}[name]
    values = ",\r\n ".join(formataddr(pair, charset="utf-8") for pair in pairs)
    return f"{title}: {values}\r\n".encode()


# --- big attachments -------------------------------------------------------------------


@dataclass(frozen=True)
class Attachment:
    """A file part taken out of the MIME, decoded, for an upload session."""

    name: str
    content_type: str
    data: bytes
    is_inline: bool = False
    content_id: str = ""


@dataclass(frozen=True)
class _Part:
    start: int  # the part's first byte (its header) in the content
    end: int  # the byte after its body (the CRLF before the next delimiter excluded)
    header: bytes
    body: bytes


def encoded_size(size: int) -> int:
    """Bytes of ``size`` bytes in base64 (what a Graph request body carries)."""
    return 4 * ((size + 2) // 3)


def split_attachments(content: bytes, limit: int) -> tuple[bytes, list[Attachment]]:
    """The message without its biggest file parts, so that its base64 form fits in
    ``limit``, and those parts decoded. Nothing taken out when nothing can be."""
    parts = sorted(_file_parts(content), key=lambda part: part.end - part.start, reverse=True)
    taken: list[_Part] = []
    size = encoded_size(len(content))
    for part in parts:
        if size <= limit:
            break
        taken.append(part)
        size -= encoded_size(part.end - part.start)
    if not taken:
        return content, []
    reduced = content
    for part in sorted(taken, key=lambda part: part.start, reverse=True):
        reduced = reduced[: part.start] + _placeholder() + reduced[part.end :]
    return reduced, [_attachment(part) for part in sorted(taken, key=lambda p: p.start)]


def _placeholder() -> bytes:
    """An empty text part where the file was: the multipart stays well-formed."""
    return b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"


def _file_parts(content: bytes) -> list[_Part]:
    """Leaf parts with a file name or an attachment disposition, at any depth."""
    found: list[_Part] = []
    _walk(content, 0, len(content), found)
    return found


def _walk(content: bytes, start: int, end: int, found: list[_Part]) -> None:
    header_end = content.find(b"\r\n\r\n", start, end)
    if header_end < 0:
        return
    header = content[start : header_end + 2]
    content_type = (headers.field_value(header, b"content-type") or b"text/plain").decode(
        "ascii", "replace"
    )
    body_start = header_end + 4
    boundary = _parameter(content_type, "boundary")
    if content_type.lower().startswith("multipart/") and boundary:
        for part_start, part_end in _multipart_spans(content, body_start, end, boundary):
            _walk(content, part_start, part_end, found)
        return
    if start and _is_file(header, content_type):
        found.append(_Part(start, end, header, content[body_start:end]))


def _multipart_spans(content: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """RFC 2046 §5.1.1: body parts between "--boundary" lines; the CRLF before a
    delimiter belongs to the delimiter."""
    delimiter = re.compile(
        rb"(?:^|\r\n)--" + re.escape(boundary.encode()) + rb"(--)?[ \t]*(?:\r\n|$)"
    )
    spans, previous = [], None
    for match in delimiter.finditer(content, start, end):
        if previous is not None:
            spans.append((previous, match.start()))
        if match.group(1):
            break
        previous = match.end()
    return spans


def _is_file(header: bytes, content_type: str) -> bool:
    disposition = (headers.field_value(header, b"content-disposition") or b"").decode(
        "ascii", "replace"
    )
    return disposition.lower().startswith("attachment") or bool(
        _parameter(disposition, "filename") or _parameter(content_type, "name")
    )


def _parameter(value: str, name: str) -> str:
    match = re.search(rf';\s*{name}\*?\s*=\s*(?:"([^"]*)"|([^;\s]+))', value, re.IGNORECASE)
    return (match.group(1) or match.group(2) or "") if match else ""


def _attachment(part: _Part) -> Attachment:
    content_type = (headers.field_value(part.header, b"content-type") or b"").decode(
        "ascii", "replace"
    )
    disposition = (headers.field_value(part.header, b"content-disposition") or b"").decode(
        "ascii", "replace"
    )
    name = _parameter(disposition, "filename") or _parameter(content_type, "name") or "attachment"
    content_id = (headers.field_value(part.header, b"content-id") or b"").decode("ascii", "replace")
    return Attachment(
        name=name,
        content_type=content_type.split(";", 1)[0].strip() or "application/octet-stream",
        data=_decode(part.header, part.body),
        is_inline=disposition.lower().startswith("inline"),
        content_id=content_id.strip("<> "),
    )


def _decode(header: bytes, body: bytes) -> bytes:
    encoding = (headers.field_value(header, b"content-transfer-encoding") or b"").lower()
    if encoding == b"base64":
        try:
            return base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
        except (binascii.Error, ValueError):
            return body
    if encoding == b"quoted-printable":
        return quopri.decodestring(body)
    return body

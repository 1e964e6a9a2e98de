"""The queue file format: one JSON line (the envelope, the content's size and CRC-32)
followed by the exact content bytes. A file whose size or checksum does not match is
damaged and never delivered.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

from relayd.queue.model import CorruptMessage, Envelope

FORMAT_VERSION = 1


def encode_header(
    queue_id: str, envelope: Envelope, content: bytes | Sequence[bytes | memoryview]
) -> bytes:
    """The header line for ``content``: its bytes, or the parts that follow one another."""
    parts = (content,) if isinstance(content, bytes | bytearray | memoryview) else content
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    header = {
        "v": FORMAT_VERSION,
        "id": queue_id,
        "sender": envelope.sender,
        "recipients": envelope.recipients,
        "client": envelope.client,
        "helo": envelope.helo,
        "received_at": envelope.received_at,
        "mail_options": envelope.mail_options,
        "size": sum(len(part) for part in parts),
        "crc32": crc,
    }
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode_header(header: object, queue_id: str, content: bytes) -> Envelope:
    envelope = envelope_from_header(header, queue_id)
    assert isinstance(header, dict)  # checked by _envelope_from_header
    if header.get("size") != len(content) or header.get("crc32") != zlib.crc32(content):
        raise CorruptMessage(f"{queue_id}: content is truncated or damaged")
    return envelope


def envelope_from_header(header: object, queue_id: str) -> Envelope:
    if not isinstance(header, dict) or header.get("v") != FORMAT_VERSION:
        raise CorruptMessage(f"{queue_id}: not a relayd queue file")
    if header.get("id") != queue_id:
        raise CorruptMessage(f"{queue_id}: file name does not match its id")
    try:
        return Envelope(
            sender=str(header["sender"]),
            recipients=tuple(str(r) for r in header["recipients"]),
            client=str(header.get("client", "")),
            helo=str(header.get("helo", "")),
            received_at=float(header.get("received_at", 0.0)),
            mail_options=tuple(str(o) for o in header.get("mail_options", ())),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptMessage(f"{queue_id}: bad envelope: {error}") from None

"""A message over Graph's request limit: a draft without its big attachments, each of
them added through an upload session, then the draft sent.

The steps (Microsoft Learn, "Attach large files to Outlook messages or events"):
``POST /me/messages`` with the MIME (base64) creates the draft; a file of 3 MB or more
gets ``POST …/attachments/createUploadSession`` and its bytes ``PUT`` to the returned
URL in ranges with ``Content-Range`` and no ``Authorization`` header (the URL is
pre-authenticated); a smaller file that still had to come out goes in one
``POST …/attachments``; ``POST /me/messages/{id}/send`` sends it. Needs the delegated
permission Mail.ReadWrite besides Mail.Send. A draft left by a failed step is deleted.
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass
from typing import Any

from relayd.transports.graph_client import GraphClient, GraphReply, GraphUnreachable
from relayd.transports.graph_mime import Attachment, encoded_size, split_attachments
from relayd.transports.graph_replies import GRAPH_REQUEST_LIMIT, UPLOAD_CHUNK, UPLOAD_SESSION_MIN

# The draft's request must fit with room to spare for the placeholders left behind.
DRAFT_LIMIT = GRAPH_REQUEST_LIMIT - 64 * 1024


@dataclass(frozen=True)
class LargePlan:
    draft: bytes  # the MIME without the attachments below
    attachments: tuple[Attachment, ...]


def plan(mime: bytes) -> LargePlan | None:
    """How to send ``mime``; None when taking attachments out cannot make it fit."""
    draft, attachments = split_attachments(mime, DRAFT_LIMIT)
    if not attachments or encoded_size(len(draft)) > DRAFT_LIMIT:
        return None
    return LargePlan(draft, tuple(attachments))


async def send(client: GraphClient, token: str, large: LargePlan) -> GraphReply:
    """Draft, attachments, send: the answer of the last step, or of the first that
    failed (after the draft was deleted)."""
    created = await client.create_draft(token, large.draft)
    draft_id = created.data.get("id") if created.ok else None
    if not isinstance(draft_id, str):
        return created
    try:
        for attachment in large.attachments:
            reply = await _attach(client, token, draft_id, attachment)
            if not reply.ok:
                await _discard(client, token, draft_id)
                return reply
        sent = await client.send_draft(token, draft_id)
    except GraphUnreachable:
        await _discard(client, token, draft_id)
        raise
    if not sent.ok:
        await _discard(client, token, draft_id)
    return sent


async def _attach(
    client: GraphClient, token: str, draft_id: str, attachment: Attachment
) -> GraphReply:
    data = attachment.data
    if len(data) < UPLOAD_SESSION_MIN:
        item = {"@odata.type": "#microsoft.graph.fileAttachment", **_describe(attachment)}
        item["contentBytes"] = base64.b64encode(data).decode("ascii")
        return await client.add_attachment(token, draft_id, item)
    session = await client.create_upload_session(
        token, draft_id, {"attachmentType": "file", "size": len(data), **_describe(attachment)}
    )
    url = session.data.get("uploadUrl")
    if not session.ok or not isinstance(url, str):
        return session
    reply = session
    for start in range(0, len(data), UPLOAD_CHUNK):
        reply = await client.upload_chunk(url, data[start : start + UPLOAD_CHUNK], start, len(data))
        if not reply.ok:
            return reply
    return reply


def _describe(attachment: Attachment) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": attachment.name,
        "contentType": attachment.content_type,
        "isInline": attachment.is_inline,
    }
    if attachment.content_id:
        item["contentId"] = attachment.content_id
    return item


async def _discard(client: GraphClient, token: str, draft_id: str) -> None:
    """Best effort: a draft that cannot be deleted now stays in Drafts, harmless."""
    with contextlib.suppress(GraphUnreachable):
        await client.delete_draft(token, draft_id)

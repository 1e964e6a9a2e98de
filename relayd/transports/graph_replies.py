"""What Microsoft Graph's answers mean for a message, and the request-size limits.

Graph answers with an HTTP status and ``{"error": {"code", "message"}}`` ("Microsoft
Graph error responses and resource types"). relayd treats them as it treats SMTP
replies (``relayd.transports.replies``): throttling pauses the whole transport, trouble
with the token, the permissions or the mailbox pauses and never bounces, and only a
refusal about the message itself fails it.
"""

from __future__ import annotations

import re
from enum import StrEnum

from relayd.transports.graph_client import GraphReply

# Microsoft Graph refuses request bodies over 4 MB (Graph's request size limit; sendMail
# answers 413 above it: "Attach large files to Outlook messages or events", Microsoft
# Learn, and the Graph team's answer on Q&A 1824204). Read as 4,000,000 bytes, the
# smaller reading of "4 MB". The body is the MIME in base64, so about 2.9 MB of message
# go in one request. Graph may refuse less (one report: MIME above ~2.2 MB); a 413 is
# then handled like a message over this limit.
GRAPH_REQUEST_LIMIT = 4_000_000
# "If the file size is under 3 MB, do a single POST on the attachments navigation
# property"; 3 MB to 150 MB: an upload session ("Attach large files to Outlook ...").
UPLOAD_SESSION_MIN = 3_000_000
# Upload "ranges of bytes (up to 4 MB each time)" (attachment: createUploadSession):
# 12 × 320 KiB, under both 4 MB and 4 MiB.
UPLOAD_CHUNK = 12 * 320 * 1024

_QUOTA = re.compile(r"QuotaExceeded", re.IGNORECASE)
# The account, not the message: the signed-in user has no Exchange Online mailbox.
_ACCOUNT_CODES = ("MailboxNotEnabledForRESTAPI", "MailboxNotHostedInExchangeOnline")


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    THROTTLED = "throttled"  # 429, 503, 504: pause everything for Retry-After
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 (a name) — 401: one fresh token, then pause
    PERMISSION = "permission"  # 403 ErrorAccessDenied: Mail.Send missing or not consented
    SEND_AS_DENIED = "send_as_denied"  # 403 ErrorSendAsDenied: as SMTP's 5.2.252
    ACCOUNT = "account"  # no mailbox behind the account
    QUOTA = "quota"
    TOO_BIG = "too_big"  # 413, ErrorMessageSizeExceeded
    TEMPORARY = "temporary"
    PERMANENT = "permanent"  # any other 4xx: about this message


def judge(reply: GraphReply) -> Verdict:
    status, code = reply.status, reply.code
    if 200 <= status < 300:
        return Verdict.ACCEPTED
    if status in (429, 503, 504):
        return Verdict.THROTTLED
    if _QUOTA.search(code) or _QUOTA.search(reply.message):
        return Verdict.QUOTA
    if status == 413 or code == "ErrorMessageSizeExceeded":
        return Verdict.TOO_BIG
    if status == 401:
        return Verdict.TOKEN_REJECTED
    if code == "ErrorSendAsDenied":
        return Verdict.SEND_AS_DENIED
    if status == 403:
        return Verdict.PERMISSION
    if code in _ACCOUNT_CODES:
        return Verdict.ACCOUNT
    if 400 <= status < 500:
        return Verdict.PERMANENT
    return Verdict.TEMPORARY


def reply_line(reply: GraphReply) -> str:
    """The line kept in the spool, the log and a DSN: ``Graph 403 ErrorAccessDenied: …``."""
    return f"Graph {reply.text()}"


def permanent_line(reply: GraphReply) -> str:
    """A refusal of the message, in the form a DSN reports (RFC 3463 5.0.0: other)."""
    return f"554 5.0.0 Microsoft Graph refused the message: {reply.text()}"


PERMISSION_EXPLANATION = (
    "Microsoft Graph refused the permission: the app registration needs the delegated"
    " permission {permissions} with consent granted (API permissions → Grant admin"
    " consent), then `relayd auth login`; mail waits in the queue until then"
)
ACCOUNT_EXPLANATION = (
    "the signed-in account has no Exchange Online mailbox that Graph can send from; mail"
    " waits in the queue until it has one"
)

"""Delivery status notifications (RFC 3464) for recipients that failed for good.

A DSN is an ordinary message relayd queues to the original envelope sender with the
null reverse-path, so that relayd never answers it with another DSN (RFC 5321 §6.1
and §4.5.5). On the way out the sender policy applies as to any message: through
Exchange Online it leaves with the mailbox as ``MAIL FROM`` and ``From:`` (Exchange
accepts no other sender); RFC 3834's ``Auto-Submitted`` keeps machines from answering.
Its three parts: a text a person can act on, the machine-readable
``message/delivery-status`` and the original header block (``text/rfc822-headers``,
RFC 6522 §4), never the body: it may be large and it was already at the sender.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formataddr, formatdate

from relayd.queue.model import Envelope, QueuedMessage
from relayd.transports.replies import enhanced_status

SUBJECT = "Undelivered Mail Returned to Sender"


@dataclass(frozen=True)
class Reporter:
    """Who reports: this host's name and the address DSNs come from."""

    hostname: str  # Reporting-MTA (RFC 3464 §2.2.2)
    from_address: str  # the upstream mailbox: the only From: Exchange accepts
    remote_mta: str = ""  # the upstream host, for Remote-MTA


def dsn_envelope(message: QueuedMessage, now: float) -> Envelope:
    """The envelope of the DSN: null sender, to the original sender."""
    sender = message.envelope.sender
    return Envelope(
        sender="",
        recipients=(sender,),
        client="relayd",
        helo="",
        received_at=now,
        # RFC 6531: an internationalized address needs SMTPUTF8 on the way out too.
        mail_options=() if sender.isascii() else ("SMTPUTF8",),
    )


def build(
    message: QueuedMessage,
    failed: Sequence[tuple[str, str]],
    original_headers: bytes,
    reporter: Reporter,
    now: float,
) -> bytes:
    """The DSN for ``failed`` (recipient, last reply) of ``message``, as message bytes."""
    boundary = f"=_relayd_{secrets.token_hex(12)}"
    message_id = f"<{message.queue_id}.dsn.{secrets.token_hex(4)}@{reporter.hostname}>"
    header = [
        f"From: {formataddr(('Mail Delivery System', reporter.from_address))}",
        f"To: <{message.envelope.sender}>",
        f"Subject: {SUBJECT}",
        f"Date: {formatdate(now, localtime=True)}",
        f"Message-ID: {message_id}",
        # RFC 3834 §5: machines must not answer it (vacation responders, tickets).
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    parts = [
        _part("text/plain; charset=utf-8", _human_text(message, failed, reporter)),
        _part("message/delivery-status", _status_fields(message, failed, reporter, now)),
        _part("text/rfc822-headers", original_headers.rstrip(b"\r\n") + b"\r\n"),
    ]
    lines = "\r\n".join(header).encode() + b"\r\n\r\n"
    lines += b"This is a MIME-encapsulated delivery status notification.\r\n"
    for part in parts:
        lines += f"\r\n--{boundary}\r\n".encode() + part
    return lines + f"\r\n--{boundary}--\r\n".encode()


# --- parts -------------------------------------------------------------------------------


def _part(content_type: str, body: bytes) -> bytes:
    """A MIME part; anything that is not 7-bit text travels base64-encoded."""
    if body.isascii() and all(len(line) <= 998 for line in body.split(b"\r\n")):
        return f"Content-Type: {content_type}\r\n\r\n".encode() + body
    encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
    return (
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: base64\r\n\r\n".encode()
        + encoded
    )


def _human_text(
    message: QueuedMessage, failed: Sequence[tuple[str, str]], reporter: Reporter
) -> bytes:
    lines = [
        f"This is the mail relay at {reporter.hostname}.",
        "",
        "Your message could not be delivered to the recipients below. It has been",
        f"kept on the relay as {message.queue_id}; the relay's operator can see it with",
        f"`relayd queue show {message.queue_id}`.",
        "",
    ]
    for recipient, reply in failed:
        lines += [f"<{recipient}>:", f"    {_one_line(reply)}", ""]
    return "\r\n".join(lines).encode("utf-8")


def _status_fields(
    message: QueuedMessage,
    failed: Sequence[tuple[str, str]],
    reporter: Reporter,
    now: float,
) -> bytes:
    arrival = message.envelope.received_at or now
    per_message = [
        f"Reporting-MTA: dns; {reporter.hostname}",
        f"X-Relayd-Queue-ID: {message.queue_id}",
        f"Arrival-Date: {formatdate(arrival, localtime=True)}",
    ]
    blocks = ["\r\n".join(per_message)]
    for recipient, reply in failed:
        fields = [
            f"Final-Recipient: rfc822; {recipient}",
            "Action: failed",
            f"Status: {_status_code(reply)}",
        ]
        if reporter.remote_mta:
            fields.append(f"Remote-MTA: dns; {reporter.remote_mta}")
        fields += [
            f"Diagnostic-Code: smtp; {_one_line(reply)}",
            f"Last-Attempt-Date: {formatdate(now, localtime=True)}",
        ]
        blocks.append("\r\n".join(fields))
    return ("\r\n\r\n".join(blocks) + "\r\n").encode("utf-8")


def _status_code(reply: str) -> str:
    """RFC 3464 §2.3.4: a 5.x.x status for a failure; the reply's own when it has one."""
    code, _, text = reply.partition(" ")
    status = enhanced_status(text, "")
    if status.startswith("5"):
        return status
    if code.startswith("5"):
        return "5.0.0"
    # A temporary reply that outlived retry.max_age: RFC 3463 X.4.7 "delivery time
    # expired", reported as a failure.
    return "5.4.7"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:900]

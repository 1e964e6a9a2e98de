"""What the upstream's replies mean: reply classes (RFC 5321 §4.2.1) refined by Exchange
Online's known replies, and the one-line form every log, spool record and DSN uses.

A transport judges each reply with ``classify``; what a judged attempt then means for
the message is the scheduler's business (``relayd.delivery.outcome``).
"""

from __future__ import annotations

import re
from enum import StrEnum

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


class Kind(StrEnum):
    """How relayd treats an upstream reply."""

    ACCEPTED = "accepted"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    THROTTLED = "throttled"
    QUOTA = "quota"
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 (a name) — 535 5.7.3: refresh once, retry
    AUTH_DISABLED = "auth_disabled"  # 535 5.7.139: SMTP AUTH is off for tenant/mailbox
    AUTH = "auth"  # any other authentication problem
    SEND_AS_DENIED = "send_as_denied"


AUTH_KINDS = (Kind.TOKEN_REJECTED, Kind.AUTH_DISABLED, Kind.AUTH)

# RFC 5321 calls some of these replies permanent, but they are about the relay's own
# mailbox (relayd.delivery.outcome.NEVER_EXPIRE): bouncing would punish the sender for
# a fixable problem.
_QUOTA_TEXT = re.compile(r"QuotaExceeded", re.IGNORECASE)
_SEND_AS_TEXT = re.compile(r"SendAsDenied|SendOnBehalf|\b5\.7\.60\b", re.IGNORECASE)

AUTH_DISABLED_EXPLANATION = (
    "SMTP AUTH is disabled for the tenant or the mailbox: an Exchange administrator must "
    "run Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false "
    "(security defaults also turn it off); mail waits in the queue until then"
)
SEND_AS_EXPLANATION = (
    "Exchange refused the sender (SendAsDenied): the mailbox has no Send As right for "
    "an address listed in upstream.send_as; grant the right or remove the address; "
    "mail waits in the queue until then"
)


def enhanced_status(message: str, default: str) -> str:
    """ "5.1.1" from "5.1.1 User unknown" (RFC 3463), else ``default``."""
    match = _ENHANCED.match(message or "")
    return match.group(1) if match else default


def classify(code: int, message: str) -> Kind:
    """The treatment of one upstream reply (RFC 5321 §4.2.1 plus Exchange's specifics)."""
    status = enhanced_status(message, "")
    if 200 <= code < 400:
        return Kind.ACCEPTED
    if code == 421 or status == "4.3.2":
        # RFC 5321 §3.8: 421 closes the channel; 432 4.3.2 is Exchange's concurrency
        # and throttling answer. Both concern the whole upstream, not the message.
        return Kind.THROTTLED
    if _QUOTA_TEXT.search(message or ""):
        return Kind.QUOTA
    if code == 535 and status == "5.7.3":
        return Kind.TOKEN_REJECTED
    if code == 535 and status == "5.7.139":
        return Kind.AUTH_DISABLED
    if code in (454, 530, 534, 535, 538):
        # RFC 4954 §6: authentication replies. Never a bounce.
        return Kind.AUTH
    if status == "5.2.252" or _SEND_AS_TEXT.search(message or ""):
        return Kind.SEND_AS_DENIED
    return Kind.TEMPORARY if 400 <= code < 500 else Kind.PERMANENT


def reply_text(code: int, message: str) -> str:
    """One line, bounded, for logs, the spool's last_error and DSNs."""
    text = " ".join(f"{code} {message}".split())
    return text[:500]

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
    MAILBOX_FULL = "mailbox_full"
    ACCOUNT_RESTRICTED = "account_restricted"
    TENANT_BLOCKED = "tenant_blocked"
    GARBLED = "garbled"  # no SMTP reply at all (garbage, too long): the session is lost


AUTH_KINDS = (Kind.TOKEN_REJECTED, Kind.AUTH_DISABLED, Kind.AUTH)
# The relay's own mailbox or tenant may not send now: every delivery pauses
# (relayd.transports.base.ACCOUNT_REASONS), none bounces.
ACCOUNT_KINDS = (Kind.QUOTA, Kind.MAILBOX_FULL, Kind.ACCOUNT_RESTRICTED, Kind.TENANT_BLOCKED)

# RFC 5321 calls some of these replies permanent, but they are about the relay's own
# mailbox (relayd.delivery.outcome.NEVER_EXPIRE): bouncing would punish the sender for
# a fixable problem.
_QUOTA_TEXT = re.compile(r"QuotaExceeded", re.IGNORECASE)
# The account-level refusals of Exchange Online, with their sources (Microsoft Learn):
# - 554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException: the
#   mailbox's 10,000 recipients a day are used up ("Exchange Online limits", Sending
#   limits: learn.microsoft.com/office365/servicedescriptions/exchange-online-service-
#   description/exchange-online-limits#sending-limits). Matched by _QUOTA_TEXT.
# - 554 5.2.2 mailbox full: on submission this is the relay's own mailbox, whose Sent
#   Items keep every message it sends ("Email non-delivery reports and SMTP errors in
#   Exchange Online": learn.microsoft.com/troubleshoot/exchange/email-delivery/ndr/
#   non-delivery-reports-in-exchange-online). At RCPT it may name a recipient's
#   mailbox: classify_recipient keeps that per recipient.
# - 550 5.1.8 Access denied, bad outbound sender: the account is restricted from
#   sending, as a suspected spam source ("Fix NDR error code 5.1.8 in Exchange Online":
#   learn.microsoft.com/troubleshoot/exchange/email-delivery/ndr/fix-error-code-5-1-8-
#   in-exchange-online).
# - 5.7.700-5.7.749 Access denied, tenant has exceeded threshold (5.7.705, 5.7.708
#   traffic not accepted from this IP) and 5.7.750 unregistered domain email
#   restriction: the tenant is blocked ("Fix NDR error codes 5.7.700 through 5.7.750 in
#   Exchange Online": learn.microsoft.com/troubleshoot/exchange/email-delivery/ndr/
#   fix-error-code-5-7-700-through-5-7-750).
_MAILBOX_FULL_STATUS = "5.2.2"
_RESTRICTED_STATUS = "5.1.8"
_TENANT_BLOCKED = re.compile(r"^5\.7\.(7[0-4]\d|750)$")
_SEND_AS_TEXT = re.compile(r"SendAsDenied|SendOnBehalf|\b5\.7\.60\b", re.IGNORECASE)

AUTH_DISABLED_EXPLANATION = (
    "SMTP AUTH is disabled for the tenant or the mailbox: an Exchange administrator must "
    "run Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false "
    "(security defaults also turn it off); mail waits in the queue until then"
)
ACCOUNT_EXPLANATIONS = {
    Kind.QUOTA: (
        "the mailbox has used up its daily sending quota (Exchange Online: 10,000"
        " recipients in 24 hours); deliveries resume by themselves when Exchange lets it"
        " send again; set upstream.daily_recipient_limit below Exchange's limit so that"
        " relayd waits before Exchange refuses"
    ),
    Kind.MAILBOX_FULL: (
        "the relay's own mailbox is full (Exchange keeps every message it sends in its"
        " Sent Items): empty its Sent Items and Deleted Items or raise its quota; mail"
        " waits in the queue until then"
    ),
    Kind.ACCOUNT_RESTRICTED: (
        "Exchange Online restricted the mailbox from sending (suspected spam or a"
        " compromised account): secure the account, then release it in the Microsoft"
        " Defender portal (Email & collaboration > Review > Restricted entities); mail"
        " waits in the queue until then"
    ),
    Kind.TENANT_BLOCKED: (
        "Exchange Online blocked the tenant from sending (5.7.700-5.7.750): a tenant"
        " administrator must contact Microsoft support (for 5.7.750, add and verify the"
        " sending domain as an accepted domain); mail waits in the queue until then"
    ),
}
# 554 5.2.252 SendAsDenied after DATA, or 550 5.7.60 "Client does not have permissions to
# send as this sender" at MAIL FROM (a shared mailbox without Send As for the signed-in
# one). A permission of the relay's own account, not the message's fault: the message
# is deferred and never expires (relayd.delivery.outcome.NEVER_EXPIRE), never bounced;
# the route's other mail keeps flowing, as it is only this sender that lacks the right.
SEND_AS_EXPLANATION = (
    "Exchange refused the sender (SendAsDenied): the mailbox has no Send As right for "
    "an address listed in upstream.send_as (or its route's send_as); grant it "
    "(Add-RecipientPermission -Identity <address> -Trustee <mailbox> -AccessRights "
    "SendAs) or remove the address; mail waits in the queue until then"
)


def enhanced_status(message: str, default: str) -> str:
    """ "5.1.1" from "5.1.1 User unknown" (RFC 3463), else ``default``."""
    match = _ENHANCED.match(message or "")
    return match.group(1) if match else default


def classify(code: int, message: str) -> Kind:
    """The treatment of one upstream reply (RFC 5321 §4.2.1 plus Exchange's specifics)."""
    status = enhanced_status(message, "")
    if not 200 <= code < 600:
        # aiosmtplib's -1: a reply it could not read (garbage, over 32 KiB, endless).
        return Kind.GARBLED
    if 200 <= code < 400:
        return Kind.ACCEPTED
    if code == 421 or status == "4.3.2":
        # RFC 5321 §3.8: 421 closes the channel; 432 4.3.2 is Exchange's concurrency
        # and throttling answer. Both concern the whole upstream, not the message.
        return Kind.THROTTLED
    if status == _MAILBOX_FULL_STATUS:
        return Kind.MAILBOX_FULL  # Exchange's text says QuotaExceededException too
    if _QUOTA_TEXT.search(message or ""):
        return Kind.QUOTA
    if status == _RESTRICTED_STATUS:
        return Kind.ACCOUNT_RESTRICTED
    if _TENANT_BLOCKED.match(status):
        return Kind.TENANT_BLOCKED
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


def classify_recipient(code: int, message: str) -> Kind:
    """``classify`` for a reply to RCPT: there, "mailbox full" may be the recipient's
    own mailbox, so it stays that recipient's result (its reply class decides)."""
    kind = classify(code, message)
    if kind is Kind.MAILBOX_FULL:
        return Kind.TEMPORARY if 400 <= code < 500 else Kind.PERMANENT
    return kind


def reply_text(code: int, message: str) -> str:
    """One line, bounded, for logs, the spool's last_error and DSNs."""
    text = " ".join(f"{code} {message}".split())
    return text[:500]

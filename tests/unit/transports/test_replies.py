"""Reply classes: RFC 5321 refined by Exchange Online's known replies."""

from __future__ import annotations

import pytest

from relayd.transports.replies import Kind, classify, classify_recipient


@pytest.mark.parametrize(
    ("code", "text", "kind"),
    [
        (250, "2.0.0 OK <id@host>", Kind.ACCEPTED),
        (451, "4.7.500 Server busy. Please try again later", Kind.TEMPORARY),
        (421, "4.3.2 Service not available, closing transmission channel", Kind.THROTTLED),
        (432, "4.3.2 Concurrent connections limit exceeded", Kind.THROTTLED),
        (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", Kind.THROTTLED),
        (535, "5.7.3 Authentication unsuccessful [HOST]", Kind.TOKEN_REJECTED),
        (
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
            Kind.AUTH_DISABLED,
        ),
        (530, "5.7.57 Client not authenticated to send mail", Kind.AUTH),
        (454, "4.7.0 Temporary authentication failure", Kind.AUTH),
        (
            554,
            "5.2.252 SendAsDenied; relay@example.com not allowed to send as x@y",
            Kind.SEND_AS_DENIED,
        ),
        (
            554,
            "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
            Kind.SEND_AS_DENIED,
        ),
        (554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", Kind.QUOTA),
        (
            554,
            "5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException",
            Kind.MAILBOX_FULL,
        ),
        (550, "5.1.8 Access denied, bad outbound sender", Kind.ACCOUNT_RESTRICTED),
        (550, "5.7.705 Access denied, tenant has exceeded threshold", Kind.TENANT_BLOCKED),
        (550, "5.7.708 Access denied, traffic not accepted from this IP", Kind.TENANT_BLOCKED),
        (550, "5.7.750 Client blocked from sending from unregistered domains", Kind.TENANT_BLOCKED),
        (550, "5.7.751 Something else", Kind.PERMANENT),
        (-1, "Malformed SMTP response line: \x00\xff", Kind.GARBLED),
        (-1, "Response too long", Kind.GARBLED),
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", Kind.PERMANENT),
        (552, "5.3.4 Message size exceeds fixed maximum message size", Kind.PERMANENT),
        (500, "", Kind.PERMANENT),
    ],
)
def test_classify(code: int, text: str, kind: Kind) -> None:
    assert classify(code, text) is kind


def test_mailbox_full_at_rcpt_stays_with_that_recipient() -> None:
    # At RCPT "mailbox full" may name the recipient's mailbox: its reply class decides.
    assert classify_recipient(552, "5.2.2 mailbox full") is Kind.PERMANENT
    assert classify_recipient(452, "4.2.2 mailbox full") is Kind.TEMPORARY
    assert classify_recipient(550, "5.1.8 Access denied, bad outbound sender") is (
        Kind.ACCOUNT_RESTRICTED
    )

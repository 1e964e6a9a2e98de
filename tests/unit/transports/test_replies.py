"""Reply classes: RFC 5321 refined by Exchange Online's known replies."""

from __future__ import annotations

import pytest

from relayd.transports.replies import Kind, classify


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
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", Kind.PERMANENT),
        (552, "5.3.4 Message size exceeds fixed maximum message size", Kind.PERMANENT),
        (500, "", Kind.PERMANENT),
    ],
)
def test_classify(code: int, text: str, kind: Kind) -> None:
    assert classify(code, text) is kind

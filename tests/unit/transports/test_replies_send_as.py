"""Exchange's refusals of a shared mailbox's address (no Send As right): never a bounce."""

from __future__ import annotations

import pytest

from relayd.delivery.outcome import NEVER_EXPIRE
from relayd.transports.base import SEND_AS_DENIED
from relayd.transports.replies import SEND_AS_EXPLANATION, Kind, classify


@pytest.mark.parametrize(
    ("code", "text"),
    [
        # At MAIL FROM: the signed-in mailbox may not send as the envelope sender.
        (550, "5.7.60 SMTP; Client does not have permissions to send as this sender"),
        # After DATA: the From: is an address the mailbox has no Send As right on.
        (554, "5.2.252 SendAsDenied; hr@contoso.com not allowed to send as jobs@contoso.com"),
    ],
)
def test_a_missing_send_as_right_is_the_accounts_problem(code: int, text: str) -> None:
    assert classify(code, text) is Kind.SEND_AS_DENIED
    assert SEND_AS_DENIED in NEVER_EXPIRE  # deferred until fixed; no DSN, no failure
    assert "Add-RecipientPermission" in SEND_AS_EXPLANATION

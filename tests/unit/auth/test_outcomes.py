"""The words for a failed token call: unreachable, refused, failing, or the disk."""

from __future__ import annotations

import requests

from relayd.auth.client import transient
from relayd.auth.outcomes import CONFIG, REAUTH, STORAGE, Outcome, failure_text, network_advice
from relayd.auth.source import _retry_event

AUTHORITY = "https://login.microsoftonline.com/contoso.com"


def test_no_answer_is_cannot_reach_and_names_the_proxy_setting() -> None:
    outcome = transient(requests.ConnectionError("Name or service not known"))
    assert outcome.unreachable
    text = failure_text(outcome, AUTHORITY)
    assert text.startswith(f"cannot reach Entra ID at {AUTHORITY}: ConnectionError")
    assert "HTTPS_PROXY" in text and "refused" not in text
    assert _retry_event(outcome) == "cannot reach Entra ID; retrying"


def test_an_answer_that_refuses_names_its_aadsts_code() -> None:
    outcome = Outcome(REAUTH, "The grant was revoked.", 50173, "invalid_grant")
    assert failure_text(outcome, AUTHORITY).startswith("Entra ID refused: AADSTS50173")
    config = Outcome(CONFIG, "Invalid client secret provided.", 7000215, "invalid_client")
    assert "AADSTS7000215" in failure_text(config, AUTHORITY)
    assert _retry_event(config) == "cannot renew the access token; retrying"


def test_a_5xx_is_an_answer_not_an_unreachable_service() -> None:
    outcome = Outcome("transient", "Service unavailable", None, "temporarily_unavailable")
    assert not outcome.unreachable
    assert "cannot reach" not in failure_text(outcome, AUTHORITY)


def test_the_disk_is_not_blamed_on_entra_id() -> None:
    outcome = Outcome(STORAGE, "token cache: No space left on device")
    assert failure_text(outcome, AUTHORITY) == (
        "Entra ID answered, but token cache: No space left on device"
    )


def test_the_proxy_is_named_without_its_credentials() -> None:
    advice = network_advice({"HTTPS_PROXY": "http://alice:s3cret@proxy.corp:3128"})
    assert "HTTPS_PROXY=http://proxy.corp:3128" in advice and "s3cret" not in advice
    assert "set HTTPS_PROXY" in network_advice({})

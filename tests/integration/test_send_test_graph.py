"""`relayd send-test --direct` with Microsoft Graph (transport graph, and auto after
535 5.7.139): each HTTP step printed, and a hint for 401, 403 and 429."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd import config
from tests.auth_helpers import auth_overrides, sign_in
from tests.fakes import exchange as fake_exchange
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.graph import FakeGraph
from tests.harness import FAST_RETRY
from tests.helpers import write_config
from tests.integration.test_send_test import RECIPIENT, assert_no_secret, send_test


@pytest.fixture
def graph_config(
    tmp_path: Path, entra: FakeEntra, upstream: FakeExchange, graph_api: FakeGraph, ca_file: Path
):
    def make(transport: str = "graph") -> Path:
        section = {
            **upstream.relay_config(ca_file)["upstream"],
            **graph_api.relay_config(ca_file, transport),
        }
        overrides = {
            "upstream": section,
            "oauth": auth_overrides(tmp_path, entra, ca_file)["oauth"],
            "retry": FAST_RETRY,
        }
        path = write_config(tmp_path, overrides)
        assert sign_in(config.load(path), ca_file).ok
        return path

    return make


async def test_direct_graph_prints_each_request(
    graph_config, graph_api: FakeGraph, entra: FakeEntra
) -> None:
    result = await send_test(graph_config(), "--direct")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "through Microsoft Graph (https://127.0.0.1:" in result.stdout
    assert f"  - token     access token (Mail.Send) for {MAILBOX}" in result.stdout
    assert "  - POST      /me/sendMail (" in result.stdout
    assert ": 202 (request-id " in result.stdout
    assert "OK: Microsoft Graph accepted the message: Graph 202" in result.stdout
    (sent,) = graph_api.received_by(RECIPIENT)
    assert b"Subject: relayd test message from " in sent.mime
    assert_no_secret(result, entra)


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (401, "InvalidAuthenticationToken", "must be for Microsoft Graph (Mail.Send)"),
        (403, "ErrorAccessDenied", "Microsoft Graph → Delegated → Mail.Send"),
        (429, "ApplicationThrottled", "Retry-After"),
    ],
)
async def test_direct_graph_refusals_have_hints(
    graph_config, graph_api: FakeGraph, status: int, code: str, words: str
) -> None:
    graph_api.fail_next(status, code, f"refused with {code}", times=2)

    result = await send_test(graph_config(), "--direct")

    assert result.returncode == 1
    assert "  x POST      /me/sendMail (" in result.stdout
    assert f": {status} {code}: refused with {code} (request-id " in result.stdout
    assert "Hint: " in result.stdout and words in result.stdout, result.stdout


async def test_direct_auto_goes_on_through_graph_when_smtp_auth_is_off(
    graph_config, upstream: FakeExchange, graph_api: FakeGraph
) -> None:
    upstream.fail("auth", fake_exchange.AUTH_DISABLED)

    result = await send_test(graph_config("auto"), "--direct")

    assert result.returncode == 0, result.stdout
    assert "5.7.139" in result.stdout
    assert "  - auto      SMTP AUTH is disabled: relayd sends through Graph then" in result.stdout
    assert len(graph_api.received_by(RECIPIENT)) == 1 and upstream.messages == []

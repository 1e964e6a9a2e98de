"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.fakes.entra import entra  # noqa: F401 (the fake Entra ID fixture)
from tests.fakes.exchange import MAILBOX, FakeExchange
from tests.fakes.hostile import hostile  # noqa: F401 (the hostile upstream fixture)
from tests.fakes.tokens import StandInTokens
from tests.harness import through_hostile  # noqa: F401 (Harness → the hostile upstream)
from tests.serving import (  # noqa: F401 (relayd serve → fake Microsoft 365)
    graph_api,
    serve,
    upstream,
)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throw-away certificate authority for the fake Microsoft 365 servers."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def standin_tokens() -> StandInTokens:
    """A TokenSource whose tokens the fake Exchange accepts (until told otherwise)."""
    return StandInTokens(MAILBOX)


@pytest.fixture
async def exchange(ca: trustme.CA, standin_tokens: StandInTokens) -> AsyncIterator[FakeExchange]:
    """A running fake Exchange Online SMTP server on loopback (STARTTLS + XOAUTH2)."""
    fake = await FakeExchange(ca, validator=standin_tokens.is_valid_access_token).start()
    yield fake
    await fake.stop()

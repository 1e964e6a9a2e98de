"""Fixtures shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from tests.fakes.entra import entra  # noqa: F401 (the fake Entra ID fixture)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throw-away certificate authority for the fake Microsoft 365 servers."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path

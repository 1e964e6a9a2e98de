"""Relay.start(): what fails after check-config passed (the disk changed, a port got
taken) is a StartupError naming the setting, never an OSError with a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from relayd.app import Relay, StartupError
from relayd.ops.metrics import Metrics
from tests.helpers import load_settings


async def start_fails(relay: Relay) -> str:
    try:
        with pytest.raises(StartupError) as caught:
            await relay.start()
    finally:
        await relay.shutdown()
    return str(caught.value)


async def test_a_spool_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool"
    settings = load_settings(tmp_path, {"spool": {"directory": str(spool)}})
    text = await start_fails(Relay(settings, metrics=Metrics()))
    assert text.startswith(f"spool.directory: cannot use {spool}: Not a directory")


async def test_a_busy_metrics_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(tmp_path, {"metrics": {"port": port}})
        text = await start_fails(Relay(settings, metrics=Metrics()))
    assert (
        text == f"metrics.address/port: cannot listen on 127.0.0.1:{port}: Address already in use"
    )

"""The daemon's gauge loop (relayd.app.Relay._update_gauges) outlives a failing recount."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import structlog.testing

from relayd import app
from relayd.queue.model import Envelope, new_queue_id
from tests.helpers import eventually, load_settings, make_message


async def test_one_oserror_does_not_stop_the_queue_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "GAUGE_INTERVAL", 0.01)
    monkeypatch.setattr(app, "CENSUS_INTERVAL", 0.05)
    relay = app.Relay(load_settings(tmp_path, {"metrics": {"enabled": False}}))
    relay.spool.recover()
    recount = relay.spool.take_census
    calls: list[int] = []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(relay.spool.path("hold")))
        return recount()

    monkeypatch.setattr(relay.spool, "take_census", failing_once)
    with structlog.testing.capture_logs() as logs:
        gauges = asyncio.create_task(relay._update_gauges())
        try:
            await eventually(lambda: len(calls) >= 1, 5)
            # A message appears behind this process's back (as `relayd queue` or a
            # restore would put one): only a recount can see it.
            queue_id = new_queue_id()
            envelope = Envelope("app@example.com", ("user@example.org",))
            other = type(relay.spool)(relay.spool.directory)
            await other.commit(queue_id, envelope, make_message())
            registry = relay.metrics.registry
            incoming = {"state": "incoming"}
            await eventually(
                lambda: registry.get_sample_value("relayd_queue_messages", incoming) == 1, 5
            )
            assert not gauges.done()
        finally:
            gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gauges
    errors = [entry for entry in logs if entry["event"].startswith("cannot update the queue")]
    assert len(errors) == 1 and "Permission denied" in errors[0]["error"]
    assert any(entry["event"] == "queue gauges updated again" for entry in logs)

"""systemd's notify protocol, received on a test NOTIFY_SOCKET from `relayd serve`."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

import pytest

from tests.helpers import (
    NotifySocket,
    RelayProcess,
    make_message,
    transact,
    unreachable_upstream,
    write_config,
)


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def test_ready_status_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    relay = RelayProcess(
        write_config(tmp_path, unreachable_upstream(tmp_path)),  # mail stays queued
        # 0.2 s WatchdogSec=: relayd pings every 0.1 s (half, as systemd advises).
        env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"},
    )
    relay.start(wait=False)
    try:
        ready = notify_socket.wait_for(lambda m: "READY=1" in m.splitlines())
        assert "STATUS=queue 0, hold 0, failed 0, auth no_token" in ready.splitlines()
        # READY=1 only once the listener is bound: a client gets the greeting now.
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            transact(client, make_message("status"))

        notify_socket.wait_for(lambda m: m.startswith("STATUS=queue 1,"))
        for _ in range(3):
            notify_socket.wait_for(lambda m: m == "WATCHDOG=1")

        relay.signal(signal.SIGTERM)
        notify_socket.wait_for(lambda m: m == "STOPPING=1")
        assert relay.process.wait(10) == 0
    finally:
        relay.kill()

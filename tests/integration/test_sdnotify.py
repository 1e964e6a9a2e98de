"""systemd's notify protocol, received on a test NOTIFY_SOCKET from `relayd serve`."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import RelayProcess, make_message, transact, unreachable_upstream, write_config


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd (abstract namespace)."""

    def __init__(self) -> None:
        self.name = f"relayd-test-{os.getpid()}-{time.monotonic_ns()}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + self.name)
        self.messages: list[str] = []

    @property
    def address(self) -> str:
        return "@" + self.name  # what NOTIFY_SOCKET says for the abstract namespace

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """Read datagrams until one satisfies ``predicate``; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.socket.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(message)
            if predicate(message):
                return message
        raise TimeoutError(f"no matching notification in {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.socket.close()


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

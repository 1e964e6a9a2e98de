"""systemd's notify protocol (sd_notify(3)) without a C library: one datagram per call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

STATUS_INTERVAL = 1.0  # how often the STATUS= line is recomputed (sent only when it changes)


class Notifier:
    """Sends READY=1, STATUS=…, WATCHDOG=1, STOPPING=1 to $NOTIFY_SOCKET, if set."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Called from the event loop: a full receive queue must drop a datagram,
            # never block the loop (and with it every SMTP session).
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        if self._socket is None:
            return
        with contextlib.suppress(OSError):  # systemd gone: nothing useful to do
            self._socket.sendto("\n".join(fields).encode(), self._address)

    def watchdog_interval(self) -> float | None:
        """Half of WatchdogSec= (systemd's advice), or None when no watchdog is set."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def send_watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 every ``interval`` seconds, from the event loop itself.

    A loop that is stuck (a blocking call, a busy coroutine) stops the pings, and
    systemd restarts the service after WatchdogSec=: exactly the failure to catch.
    """
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def send_status(
    notifier: Notifier, status: Callable[[], str], interval: float = STATUS_INTERVAL
) -> None:
    """STATUS=<line> for `systemctl status`, sent whenever the line changes."""
    last = None
    while True:
        line = status()
        if line != last:
            notifier.notify(f"STATUS={line}")
            last = line
        await asyncio.sleep(interval)

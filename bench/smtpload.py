"""A small asyncio SMTP load generator that measures each message's accept latency.

Each client keeps one connection and sends messages one after another (MAIL, RCPT,
DATA, content); latency is measured from the end-of-data dot to the 250 reply, which
is exactly what relayd's durable commit costs a client.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    clients: int
    size: int
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")

    @property
    def p99_ms(self) -> float:
        return self.percentile(0.99) * 1000


def make_message(number: int, size: int) -> bytes:
    head = (
        f"From: bench@example.com\r\nTo: user@example.com\r\nSubject: bench {number}\r\n"
        f"Message-ID: <bench-{number}@relayd.test>\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def _client(
    host: str,
    port: int,
    numbers: itertools.count,
    total: int,
    size: int,
    result: LoadResult,
    stop: threading.Event | None,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _reply(reader)
        writer.write(b"EHLO bench.local\r\n")
        await _reply(reader)
        while not (stop and stop.is_set()) and (number := next(numbers)) < total:
            writer.write(b"MAIL FROM:<bench@example.com>\r\n")
            await _reply(reader)
            writer.write(b"RCPT TO:<user@example.com>\r\n")
            await _reply(reader)
            writer.write(b"DATA\r\n")
            await _reply(reader)
            writer.write(make_message(number, size))
            started = time.perf_counter()
            reply = await _reply(reader)
            if reply.startswith(b"250"):
                result.latencies.append(time.perf_counter() - started)
                result.sent += 1
            else:
                result.failed += 1
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()


async def run_load(
    host: str, port: int, clients: int, total: int, size: int, stop: threading.Event | None = None
) -> LoadResult:
    """Send ``total`` messages of about ``size`` bytes from ``clients`` connections
    (fewer if ``stop`` is set meanwhile: each client ends after its current message)."""
    result = LoadResult(clients=clients, size=size)
    numbers = itertools.count()
    started = time.perf_counter()
    await asyncio.gather(
        *(_client(host, port, numbers, total, size, result, stop) for _ in range(clients))
    )
    result.seconds = time.perf_counter() - started
    return result

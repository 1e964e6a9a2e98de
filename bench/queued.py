"""relayd starting over a large queue: time to READY=1 and peak memory.

The spool is filled the way the listener leaves it when the upstream is down: many
distinct message files in incoming/, each with its own id. They are written without
fsync (the benchmark needs them on disk, not durable) and none is ever delivered
(the upstream is unreachable).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bench.measure import children_rss_mib, peak_rss_mib
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.helpers import NotifySocket, RelayProcess, make_message


@dataclass(frozen=True)
class StartupResult:
    queued: int
    ready_seconds: float
    peak_rss_mib: float
    writers_rss_mib: float  # the spool writer processes beside it, together


def fill_spool(directory: Path, count: int, size: int) -> None:
    """``count`` queued messages of about ``size`` bytes in incoming/."""
    spool = Spool(directory)
    spool.recover()
    template_id = new_queue_id()
    envelope = Envelope(
        sender="app@example.com", recipients=("user@example.com",), received_at=time.time()
    )
    asyncio.run(spool.commit(template_id, envelope, make_message("queued", body_size=size)))
    template = spool.path("incoming", template_id).read_bytes()
    header, content = template.split(b"\n", 1)
    incoming = spool.path("incoming")
    start = time.time() - count / 1000  # ids 1 ms apart: a believable arrival order
    for number in range(count - 1):
        queue_id = new_queue_id(start + number / 1000)
        data = header.replace(template_id.encode(), queue_id.encode()) + b"\n" + content
        fd = os.open(incoming / queue_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def measure_startup(config_path: Path, queued: int) -> StartupResult:
    """Start ``relayd serve`` over the filled spool; seconds from the start of the
    process to READY=1, and its peak RSS once it has also recounted the spool on
    request (SIGUSR1, as `relayd queue` sends) — the periodic census's work too."""
    notify = NotifySocket()
    relay = RelayProcess(config_path, env={"NOTIFY_SOCKET": notify.address})
    try:
        started = time.perf_counter()
        relay.start(wait=False)
        notify.wait_for(lambda message: "READY=1" in message, timeout=600)
        ready = time.perf_counter() - started
        assert relay.process is not None
        relay.signal(signal.SIGUSR1)
        relay.wait_for_log("spool rescanned on request", timeout=600)
        pid = relay.process.pid
        return StartupResult(queued, ready, peak_rss_mib(pid), children_rss_mib(pid))
    finally:
        relay.stop()
        notify.close()

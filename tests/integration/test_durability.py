"""250 means durable: SIGKILL the daemon mid-stream; everything acknowledged survives."""

from __future__ import annotations

import signal
import smtplib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import (
    RelayProcess,
    message_number,
    numbered_message,
    spooled_messages,
    unreachable_upstream,
    without_trace_fields,
    write_config,
)

TOTAL, CLIENTS, KILL_AFTER = 500, 20, 200


def test_sigkill_mid_stream_loses_nothing_that_got_250(tmp_path: Path) -> None:
    # Nobody has signed in and the upstream is unreachable, so acknowledged mail stays
    # in the spool to be inspected (delivery is tested elsewhere).
    config_path = write_config(tmp_path, unreachable_upstream(tmp_path))
    relay = RelayProcess(config_path).start()
    accepted: set[int] = set()
    lock = threading.Lock()
    numbers = iter(range(TOTAL))

    def client() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
                while True:
                    with lock:
                        number = next(numbers, None)
                    if number is None:
                        return
                    smtp.sendmail("app@example.com", ["user@example.com"], numbered_message(number))
                    with lock:  # only after the 250
                        accepted.add(number)
        except (smtplib.SMTPException, OSError):
            return  # the daemon died under us: this message got no 250

    def killer() -> None:
        deadline = time.monotonic() + 30
        while len(accepted) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.001)
        relay.signal(signal.SIGKILL)

    with ThreadPoolExecutor(CLIENTS + 1) as pool:
        pool.submit(killer)
        for _ in range(CLIENTS):
            pool.submit(client)
    relay.process.wait(10)
    assert KILL_AFTER <= len(accepted) < TOTAL, "the kill must land mid-stream"

    restarted = RelayProcess(config_path).start()  # recovery runs before it listens
    assert restarted.stop() == 0

    stored = spooled_messages(tmp_path / "spool")  # parses each file: no partial ones
    by_number = {message_number(content): content for content in stored.values()}
    assert len(by_number) == len(stored), "a message was stored twice"
    missing = accepted - by_number.keys()
    assert not missing, f"acknowledged but lost: {sorted(missing)}"
    for number, content in by_number.items():
        assert without_trace_fields(content) == numbered_message(number)
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    unacknowledged = len(by_number) - len(accepted)
    print(
        f"acknowledged={len(accepted)} stored={len(by_number)} stored-without-250={unacknowledged}"
    )

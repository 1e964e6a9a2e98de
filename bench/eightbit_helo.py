"""Clean clients next to one client whose EHLO name is not UTF-8 (issue 12, item 11).

A byte such as 0xff in the EHLO name once raised inside the spool's group commit, and
every message of that batch, from every client, got 451. This starts `relayd serve`
(maildir transport, spool under a temporary directory), runs CLEAN clients that each
send MESSAGES messages while one more client says ``EHLO h\\xffst`` and sends
messages for as long as they run, and prints the replies each side got:

    python3 bench/eightbit_helo.py [--clients 20] [--messages 10]

It prints figures; it asserts nothing (the regression test is
tests/integration/test_listener.py::test_clean_clients_next_to_an_8bit_ehlo_client_get_250).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import RelayProcess, write_config

MESSAGE = (
    b"From: app@example.com\r\nTo: user@example.com\r\nSubject: item 11\r\n"
    b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\n" + b"x" * 70 + b"\r\n"
)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line[3:4] != b"-":
            return line[:3]


async def client(port: int, ehlo: bytes, count: int | None, stop: asyncio.Event) -> list[bytes]:
    """Send ``count`` messages (None: until ``stop``); the code of each end-of-data reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    codes: list[bytes] = []
    await _reply(reader)
    writer.write(b"EHLO " + ehlo + b"\r\n")
    await _reply(reader)
    while (count is None and not stop.is_set()) or (count is not None and len(codes) < count):
        writer.write(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
        for _ in range(3):
            await _reply(reader)
        writer.write(MESSAGE + b".\r\n")
        codes.append(await _reply(reader))
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()
    return codes


async def load(
    port: int, clients: int, messages: int
) -> tuple[collections.Counter, collections.Counter]:
    stop = asyncio.Event()
    eight_bit = asyncio.create_task(client(port, b"h\xffst.example", None, stop))
    clean = await asyncio.gather(
        *(client(port, b"clean.example", messages, stop) for _ in range(clients))
    )
    stop.set()
    return collections.Counter(c for codes in clean for c in codes), collections.Counter(
        await eight_bit
    )


def _show(counter: collections.Counter) -> str:
    return ", ".join(f"{code.decode()}: {n}" for code, n in sorted(counter.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-8bit-") as base:
        overrides = {"logging": {"level": "error"}, "listen": {"max_connections": 200}}
        relay = RelayProcess(write_config(Path(base), overrides)).start()
        try:
            clean, eight_bit = asyncio.run(load(relay.port, args.clients, args.messages))
        finally:
            relay.stop()
    print(f"clean clients: {args.clients} x {args.messages} messages -> {_show(clean)}")
    print(f"8-bit EHLO client: {sum(eight_bit.values())} messages -> {_show(eight_bit)}")
    print(f"451 to clean clients: {clean.get(b'451', 0)}")


if __name__ == "__main__":
    main()

"""The soak at CI size: 2,000 messages from 50 concurrent clients through `relayd serve`
to the fake Microsoft 365, with the invariants of tests/soak.py (each message exactly
once and byte-identical, at most 3 upstream connections, no secret printed, fds and
memory given back). The full size (20,000) is `python3 bench/soak.py`."""

from __future__ import annotations

from pathlib import Path

from tests.soak import soak


async def test_soak_delivers_each_message_once_and_gives_back_fds_and_memory(
    tmp_path: Path,
) -> None:
    result = await soak(tmp_path, messages=2000, clients=50)
    print(f"\n{result.report()}")
    result.check()

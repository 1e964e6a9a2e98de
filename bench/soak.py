"""Soak: 20,000 messages from 50 concurrent clients through `relayd serve` to the fake
Microsoft 365 (rate and daily limits off). Prints the figures, then asserts the invariants
(tests/soak.py: exactly once, nothing left, file descriptors back, RSS within a margin).

    python3 bench/soak.py [--messages 20000] [--clients 50] [--size 2048]

The default test command runs the same code with 2,000 messages (tests/integration/
test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.soak import soak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relayd-soak-") as tmp:
        result = asyncio.run(soak(Path(tmp), args.messages, args.clients, args.size))
    print(result.report())
    result.check()
    print("soak: all invariants hold")


if __name__ == "__main__":
    main()

"""The listener's own rows: a new connection per message against Postfix, and small
messages' accept latency while big ones arrive. Nothing is asserted.

    python3 bench/listener.py [--pairs 3] [--messages 3000] [--big-messages 2]
    python3 bench/listener.py --tree before=CHECKOUT --tree after=. [--pairs 5]   # an A/B
    python3 bench/run.py --listener ...   # the same rows in the benchmark table

* **new connection per message**: Postfix's smtp-source without ``-d`` (it connects,
  sends EHLO, MAIL, RCPT, DATA, QUIT, and disconnects for every message, as Java mail
  clients do), 20 sessions, 2 KiB, against relayd and a private Postfix
  (bench/postfix.py) in alternated pairs; each pair's rates, their ratio, relayd's CPU
  per message including its connection, and the medians. The same with connections
  kept (``-d``) for comparison.
* **small messages beside big ones**: 4 clients send 2 KiB messages one after another
  while 2 clients each send ``--big-messages`` messages of 30 MiB; the p50/p99 accept
  latency of the small ones (end-of-data dot to 250) with and without the big senders.
  The big senders are processes of their own, so the generator's event loop (which
  measures the latency) never waits for their bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import postfix
from bench.measure import from_checkout, machine, relay_cpu_seconds, spread
from bench.smtpload import LoadResult, make_message, run_load
from tests.helpers import RelayProcess, unreachable_upstream, write_config

BIG = 30 * 1024 * 1024
SMALL = 2 * 1024


def smtp_source(port: int, sessions: int, messages: int, size: int, reuse: bool) -> float:
    """Seconds for smtp-source to send ``messages``; a new connection for each unless
    ``reuse`` (-d). Its length (-l) is the body alone; ours counts ~200 header bytes."""
    assert postfix.SMTP_SOURCE is not None
    command = [postfix.SMTP_SOURCE, *(["-d"] if reuse else []), "-s", str(sessions)]
    command += ["-m", str(messages), "-l", str(max(size - 200, 1))]
    command += ["-f", "bench@example.com", "-t", "user@example.com", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return time.perf_counter() - started


@dataclass
class Pair:
    relayd: float  # msg/s
    postfix: float | None
    cpu_ms: float  # relayd CPU per message

    @property
    def ratio(self) -> float | None:
        return self.relayd / self.postfix if self.postfix else None


def source_pairs(
    relay: RelayProcess,
    local: postfix.LocalPostfix | None,
    args: argparse.Namespace,
    reuse: bool,
) -> list[Pair]:
    """``args.pairs`` alternated runs, relayd first in odd pairs, Postfix in even ones."""
    pairs = []
    for number in range(args.pairs):
        rates: dict[str, float] = {}
        cpu = 0.0
        order = ["relayd", "postfix"] if number % 2 == 0 else ["postfix", "relayd"]
        for name in order:
            if name == "postfix":
                if local is None:
                    continue
                seconds = smtp_source(local.port, args.sessions, args.messages, SMALL, reuse)
                local.settle()
                rates[name] = args.messages / seconds
            else:
                rates[name], cpu = relayd_run(relay, args, reuse)
        pairs.append(Pair(rates["relayd"], rates.get("postfix"), cpu))
        print(f"    pair {number + 1}: {_pair_text(pairs[-1])}; {_uptime()}", file=sys.stderr)
    return pairs


def relayd_run(relay: RelayProcess, args: argparse.Namespace, reuse: bool) -> tuple[float, float]:
    """One smtp-source run against relayd: msg/s, and relayd's CPU ms per message."""
    assert relay.process is not None
    before = relay_cpu_seconds(relay.process.pid)
    seconds = smtp_source(relay.port, args.sessions, args.messages, SMALL, reuse)
    cpu = (relay_cpu_seconds(relay.process.pid) - before) * 1000 / args.messages
    return args.messages / seconds, cpu


def _pair_text(pair: Pair) -> str:
    text = f"relayd {pair.relayd:,.0f} msg/s ({pair.cpu_ms:.2f} ms CPU/msg)"
    if pair.postfix is not None:
        text += f", Postfix {pair.postfix:,.0f} msg/s, ratio {pair.ratio:.2f}"
    return text


def _uptime() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


# --- small messages beside big ones ---------------------------------------------------


def _big_sender(port: int, count: int, errors: list[str]) -> None:
    """Blocking SMTP client: ``count`` messages of BIG bytes over one connection."""
    body = make_message(0, BIG)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = sock.makefile("rb")
        _expect(reader, errors)
        for command in (b"EHLO big.bench\r\n",):
            sock.sendall(command)
            _expect(reader, errors)
        for _ in range(count):
            for command in (b"MAIL FROM:<big@example.com>\r\n", b"RCPT TO:<u@example.com>\r\n"):
                sock.sendall(command)
                _expect(reader, errors)
            sock.sendall(b"DATA\r\n")
            _expect(reader, errors)
            sock.sendall(body)
            _expect(reader, errors, b"250")
        sock.sendall(b"QUIT\r\n")


def _expect(reader: BinaryIO, errors: list[str], code: bytes = b"") -> None:
    while True:
        line = reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            break
    if code and not line.startswith(code):
        errors.append(line.decode(errors="replace").strip())


async def _small_until(port: int, clients: int, done: threading.Event, cap: int) -> LoadResult:
    """Small messages from ``clients`` connections until ``done`` is set (at most ``cap``)."""
    return await run_load("127.0.0.1", port, clients, cap, SMALL, stop=done)


@dataclass
class Mixed:
    small: LoadResult
    alone: LoadResult
    big_seconds: float
    cpu_seconds: float
    errors: list[str]


def small_beside_big(relay: RelayProcess, big_messages: int) -> Mixed:
    """The big senders are processes of their own (this script with --send-big), so
    that their bytes never hold up this process's event loop and its measurements."""
    assert relay.process is not None
    alone = asyncio.run(run_load("127.0.0.1", relay.port, 4, 2000, SMALL))
    done = threading.Event()
    before = relay_cpu_seconds(relay.process.pid)
    command = [sys.executable, __file__, "--send-big", str(relay.port), str(big_messages)]
    started = time.perf_counter()
    senders = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs: list[str] = []

    def wait_senders() -> None:
        for sender in senders:
            outputs.append(sender.communicate(timeout=1800)[0])
        done.set()

    waiter = threading.Thread(target=wait_senders, daemon=True)
    waiter.start()
    small = asyncio.run(_small_until(relay.port, 4, done, 1_000_000))
    waiter.join()
    big_seconds = time.perf_counter() - started
    cpu = relay_cpu_seconds(relay.process.pid) - before
    errors = [line for output in outputs for line in output.splitlines() if line]
    return Mixed(small, alone, big_seconds, cpu, errors)


def _send_big(port: int, count: int) -> None:
    errors: list[str] = []
    _big_sender(port, count, errors)
    print("\n".join(errors))


# --- the rows -------------------------------------------------------------------------


def rows(root: Path, args: argparse.Namespace) -> Iterator[str]:
    """The listener's rows as Markdown table lines (with their header)."""
    with contextlib.ExitStack() as stack:
        local = None
        if args.with_postfix and postfix.available():
            postfix.become_subreaper()
            sink = stack.enter_context(postfix.SmtpSink())
            local = stack.enter_context(
                postfix.LocalPostfix(
                    root / "postfix-listener", sink.port, holding=args.postfix_holds
                )
            )
        base = root / "relayd-listener"
        base.mkdir(parents=True)
        relay = stack.enter_context(RelayProcess(write_config(base, unreachable_upstream(base))))
        for port in [relay.port] + ([local.port] if local is not None else []):
            smtp_source(port, args.sessions, 300, SMALL, reuse=False)  # warm up, untimed
        if local is not None:
            local.settle()
        yield "| load | relayd | relayd CPU ms/msg | Postfix | relayd / Postfix | notes |"
        yield "|---|---:|---:|---:|---:|---|"
        for reuse in (False, True) if args.pairs else ():
            label = "kept (-d)" if reuse else "new per message"
            print(f"  smtp-source, connection {label}", file=sys.stderr)
            pairs = source_pairs(relay, local, args, reuse)
            yield _pairs_row(pairs, args, label)
        if args.big_messages:
            print("  small messages beside big ones", file=sys.stderr)
            mixed = small_beside_big(relay, args.big_messages)
            yield from _mixed_rows(mixed, args)


def tree_rows(root: Path, args: argparse.Namespace) -> Iterator[str]:
    """``--tree``: relayd from each checkout under the same loads, no Postfix; rounds
    alternate the order, so that a busy machine's moments are shared (an A/B)."""
    trees = dict(item.split("=", 1) for item in args.tree)
    with contextlib.ExitStack() as stack:
        relays = {}
        for name, tree in trees.items():
            base = root / f"relayd-{name}"
            base.mkdir(parents=True)
            config_path = write_config(base, unreachable_upstream(base))
            relay = RelayProcess(config_path, **from_checkout(Path(tree)))
            relays[name] = stack.enter_context(relay)
            smtp_source(relay.port, args.sessions, 300, SMALL, reuse=False)  # warm up, untimed
        yield "| load | checkout | relayd | relayd CPU ms/msg | rounds (msg/s, ms/msg) |"
        yield "|---|---|---:|---:|---|"
        for reuse in (False, True):
            label = "kept (-d)" if reuse else "new per message"
            for name, runs in _alternated(relays, args, reuse).items():
                rate = _median([run[0] for run in runs])
                cpu = _median([run[1] for run in runs])
                each = "; ".join(f"{run[0]:,.0f}, {run[1]:.2f}" for run in runs)
                yield (
                    f"| smtp-source, {args.sessions} sessions, 2 KiB, connection {label} | {name}"
                    f" | {rate:,.0f} msg/s | {cpu:.2f} | {each} |"
                )


def _alternated(
    relays: dict[str, RelayProcess], args: argparse.Namespace, reuse: bool
) -> dict[str, list[tuple[float, float]]]:
    """``args.pairs`` rounds over every relay, the order reversed every other round."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in relays}
    for number in range(args.pairs):
        for name in list(relays) if number % 2 == 0 else list(relays)[::-1]:
            runs[name].append(relayd_run(relays[name], args, reuse))
            print(f"    {name}: {runs[name][-1]}; {_uptime()}", file=sys.stderr)
    return runs


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _pairs_row(pairs: list[Pair], args: argparse.Namespace, label: str) -> str:
    each = "; ".join(_pair_text(pair) for pair in pairs)
    load = f"smtp-source, {args.sessions} sessions, 2 KiB, connection {label}"
    relayd = f"{_median([p.relayd for p in pairs]):,.0f} msg/s"
    cpu = f"{_median([p.cpu_ms for p in pairs]):.2f}"
    if pairs and pairs[0].postfix is not None:
        other = f"{_median([p.postfix or 0.0 for p in pairs]):,.0f} msg/s"
        ratio = f"{_median([p.ratio or 0.0 for p in pairs]):.2f}"
    else:
        other = ratio = ""
    return f"| {load} | {relayd} | {cpu} | {other} | {ratio} | {len(pairs)} pairs: {each} |"


def _mixed_rows(mixed: Mixed, args: argparse.Namespace) -> Iterator[str]:
    alone = mixed.alone
    yield (
        f"| 4 clients, 2 KiB, alone | p50 / p99 {alone.p50_ms:.1f} / {alone.p99_ms:.1f} ms"
        f" | | | | {alone.sent} messages, {alone.rate:,.0f} msg/s |"
    )
    small = mixed.small
    note = (
        f"{small.sent} small messages, {small.rate:,.0f} msg/s; 2 × {args.big_messages}"
        f" × 30 MiB in {mixed.big_seconds:.1f} s; relayd CPU {mixed.cpu_seconds:.1f} s"
    )
    if mixed.errors or small.failed:
        note += f"; refused: {small.failed} small, big: {mixed.errors[:2]}"
    yield (
        f"| 4 clients, 2 KiB, while 2 clients send 30 MiB messages"
        f" | p50 / p99 {small.p50_ms:.1f} / {small.p99_ms:.1f} ms | | | | {note} |"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("listener rows (bench/listener.py)")
    group.add_argument("--pairs", type=int, default=3, help="alternated relayd/Postfix pairs")
    group.add_argument("--sessions", type=int, default=20, help="smtp-source sessions")
    group.add_argument("--big-messages", type=int, default=4, help="30 MiB messages per big client")
    group.add_argument(
        "--postfix-holds",
        action="store_true",
        help="Postfix keeps its mail queued (defer_transports) instead of relaying it",
    )


def main() -> None:
    if sys.argv[1:2] == ["--send-big"]:  # one of small_beside_big's big senders
        _send_big(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="per smtp-source run")
    parser.add_argument("--no-postfix", dest="with_postfix", action="store_false")
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"), help="where spools go")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=checkout (repeatable): relayd from each in turn, no Postfix (--pairs rounds)",
    )
    add_arguments(parser)
    args = parser.parse_args()
    header = machine(args.base)
    with tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # Postfix's daemons run as the postfix user
        spread(root)  # each spool on its own ext4 block group
        lines = list(tree_rows(root, args) if args.tree else rows(root, args))
    print(f"\n{header}; load average after the run {_uptime()[13:]}\n")
    print(f"`python3 bench/listener.py {' '.join(sys.argv[1:])}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

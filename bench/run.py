"""relayd's benchmark table: one command, one Markdown table. Nothing is asserted.

    python3 bench/run.py [--with-postfix] [--messages 3000] [--repeat 3] [--queued 100000]

Rows:

* accept rate and p50/p99 latency (end-of-data dot to the 250 reply) at 1, 20 and
  100 concurrent clients with 2 KiB and 100 KiB messages. relayd runs as
  ``relayd serve`` at its default log level, with an upstream nobody can reach, so the
  figures are the listener and the durable spool commit alone. Generators: our
  asyncio one (bench/smtpload.py; it measures latency) and, when Postfix is
  installed, Postfix's smtp-source (C, rate only). With ``--with-postfix`` the same
  loads go to a private Postfix (bench/postfix.py) and the table shows relayd / Postfix.
* end-to-end rate: clients → ``relayd serve`` → the fake Microsoft 365
  (tests/fakes/exchange.py: STARTTLS + AUTH XOAUTH2, tokens from the fake Entra ID
  through MSAL after a real sign-in), pool of 3 connections, rate limit off, 2 KiB
  messages, counted when the fake has them (bench/e2e.py); and the same delivery
  alone, draining a spool filled beforehand. The client and the fake run in this
  process, on the same two cores: their CPU is shown too.
* peak RSS of relayd idle, under that load, and with 100,000 messages queued; the time
  from the start of ``relayd serve`` to READY=1 (on a NOTIFY_SOCKET this script binds)
  with 100,000 messages queued.

* with ``--with-postfix-xoauth2``: accept while delivering (bench/delivering.py): the
  accept rate, end-to-end rate and CPU for the whole job of relayd and of a Postfix with
  the sasl-xoauth2 plugin, both forwarding to the fake Exchange over STARTTLS + XOAUTH2;
  ``--repeat`` alternated pairs of ``--xoauth2-messages``.
* with ``--rate-limit N``: the fake Exchange enforcing N messages a minute and relayd at
  N (bench/ratelimit.py): the share of N delivered, throttling replies, queue order.

Each load runs ``--repeat`` times, alternating relayd and Postfix; the table shows
medians. Spools live under ``--base`` (a disk, not tmpfs, so fsync costs what it
costs). On ext4 without a journal, creating a file skips inodes freed in the last
minutes one by one, so a spool in a directory where other programs delete many files
gets slow creates; the run's directory is marked for spreading (chattr +T) so that
each spool starts on its own block group, for relayd and Postfix alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import delivering, e2e, listener, postfix, postfix_xoauth2, ratelimit
from bench.measure import children_rss_mib, machine, peak_rss_mib, relay_cpu_seconds, spread
from bench.queued import fill_spool, measure_startup
from bench.smtpload import LoadResult, run_load
from tests.helpers import RelayProcess, unreachable_upstream, write_config

try:
    import uvloop
except ImportError:
    uvloop = None

SIZES = (2 * 1024, 100 * 1024)
CLIENTS = (1, 20, 100)
SMTPLOAD = "smtpload (asyncio" + (" + uvloop)" if uvloop else ")")
SMTP_SOURCE = "smtp-source"
T = TypeVar("T")


@dataclass
class Measured:
    """The medians of repeated runs of one load against one server."""

    rate: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms: float | None = None  # server CPU per message (relayd only)


@dataclass
class Row:
    measurement: str
    load: str = ""
    generator: str = ""
    relayd: str = ""
    relayd_latency: str = ""
    relayd_cpu: str = ""
    postfix: str = ""
    postfix_latency: str = ""
    ratio: str = ""
    note: str = ""


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB"


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """On uvloop when installed: the benchmark then takes less CPU from the servers."""
    return uvloop.run(coroutine) if uvloop else asyncio.run(coroutine)


def _load_once(generator: str, port: int, clients: int, messages: int, size: int) -> LoadResult:
    if generator == SMTP_SOURCE:
        # smtp-source's length is the body alone; ours counts the header too (~200 B).
        seconds = postfix.smtp_source(port, clients, messages, max(size - 200, 1))
        return LoadResult(clients, size, sent=messages, seconds=seconds)
    return _run(run_load("127.0.0.1", port, clients, messages, size))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Server:
    port: int
    pid: int | None = None  # to read its CPU time (relayd)
    settle: Callable[[], None] | None = None  # until its work after a run is done


def measure(
    generator: str, servers: dict[str, Server], clients: int, size: int, messages: int, repeat: int
) -> dict[str, Measured]:
    """Run the load ``repeat`` times against each server; medians."""
    runs: dict[str, list[tuple[LoadResult, float | None]]] = {name: [] for name in servers}
    for _ in range(repeat):
        for name, server in servers.items():  # alternating: noise hits both alike
            pid = server.pid
            cpu_before = relay_cpu_seconds(pid) if pid else 0.0
            result = _load_once(generator, server.port, clients, messages, size)
            cpu = (relay_cpu_seconds(pid) - cpu_before) * 1000 / result.sent if pid else None
            if server.settle is not None:
                server.settle()
            if result.failed:
                print(f"  {name}: {result.failed} messages not accepted", file=sys.stderr)
            runs[name].append((result, cpu))
    measured = {}
    for name, results in runs.items():
        latency = generator != SMTP_SOURCE
        measured[name] = Measured(
            rate=_median([r.rate for r, _ in results]) or 0.0,
            p50_ms=_median([r.p50_ms for r, _ in results]) if latency else None,
            p99_ms=_median([r.p99_ms for r, _ in results]) if latency else None,
            cpu_ms=_median([cpu for _, cpu in results if cpu is not None]),
        )
    return measured


def accept_rows(
    relay: RelayProcess, local_postfix: postfix.LocalPostfix | None, args: argparse.Namespace
) -> Iterator[Row]:
    assert relay.process is not None
    servers = {"relayd": Server(relay.port, relay.process.pid)}
    if local_postfix is not None:
        servers["postfix"] = Server(local_postfix.port, settle=local_postfix.settle)
    generators = [SMTPLOAD, SMTP_SOURCE] if postfix.SMTP_SOURCE else [SMTPLOAD]
    for size in SIZES:
        for clients in CLIENTS:
            # Fewer big messages, fewer for one client: each run takes seconds, not minutes.
            messages = args.messages // (5 if size > 4096 else 1) // (3 if clients == 1 else 1)
            messages = max(messages, 100)
            for generator in generators:
                label = f"{clients} client{'s' * (clients > 1)}, {_size_label(size)}"
                print(f"  accept: {label}, {generator}", file=sys.stderr)
                results = measure(generator, servers, clients, size, messages, args.repeat)
                yield _accept_row(label, generator, results)


def _accept_row(load: str, generator: str, results: dict[str, Measured]) -> Row:
    relayd, other = results["relayd"], results.get("postfix")
    row = Row(
        "accept rate",
        load,
        generator,
        relayd=f"{relayd.rate:,.0f} msg/s",
        relayd_latency=_latency(relayd),
        relayd_cpu=f"{relayd.cpu_ms:.2f}" if relayd.cpu_ms is not None else "",
    )
    if other is not None:
        row.postfix = f"{other.rate:,.0f} msg/s"
        row.postfix_latency = _latency(other)
        row.ratio = f"{relayd.rate / other.rate:.2f}" if other.rate else ""
    return row


def _latency(measured: Measured) -> str:
    if measured.p50_ms is None or measured.p99_ms is None:
        return ""
    return f"{measured.p50_ms:.1f} / {measured.p99_ms:.1f}"


def _relay_config(base: Path) -> Path:
    """relayd as it ships (log level info), an upstream nobody can reach: mail stays."""
    base.mkdir(parents=True, exist_ok=True)
    return write_config(base, unreachable_upstream(base))


def run_accept(root: Path, args: argparse.Namespace) -> list[Row]:
    rows = []
    with contextlib.ExitStack() as stack:
        local = None
        if args.with_postfix:
            postfix.become_subreaper()
            sink = stack.enter_context(postfix.SmtpSink())
            local = stack.enter_context(postfix.LocalPostfix(root / "postfix", sink.port))
        relay = stack.enter_context(RelayProcess(_relay_config(root / "relayd")))
        assert relay.process is not None
        idle = peak_rss_mib(relay.process.pid), children_rss_mib(relay.process.pid)
        rows.extend(accept_rows(relay, local, args))
        loaded = peak_rss_mib(relay.process.pid), children_rss_mib(relay.process.pid)
    for label, (rss, writers) in (("idle", idle), ("under the loads above", loaded)):
        note = f"the two spool writer processes beside it: {writers:.1f} MiB together"
        rows.append(Row(f"peak RSS, {label}", relayd=f"{rss:.1f} MiB", note=note))
    return rows


# (upstream path, what the load column says of it, the fake it delivers to)
E2E_PATHS = (
    ("smtp", "pool of 3", "fake Exchange"),
    ("graph", "Graph, 4 requests at once", "fake Graph"),
)


def run_end_to_end(root: Path, args: argparse.Namespace) -> list[Row]:
    load = argparse.Namespace(messages=args.messages, clients=20, size=2 * 1024)
    rows = []
    for path, upstream, fake in E2E_PATHS:
        for drain in (False, True):
            label = "spool drain" if drain else "20 clients"
            print(f"  end to end: {path}, {label}", file=sys.stderr)
            results = []
            for number in range(args.repeat):
                directory = root / f"e2e-{path}-{label.replace(' ', '-')}-{number}"
                directory.mkdir()
                results.append(_run(e2e.run_row(directory, path, load, drain)))
            rows.append(_end_to_end_row(results, args, label, drain, upstream, fake))
    return rows


def _end_to_end_row(
    results: list[dict], args: argparse.Namespace, label: str, drain: bool, upstream: str, fake: str
) -> Row:
    rate = statistics.median(result["delivered_per_s"] for result in results)
    cpu = statistics.median(result["cpu"][0] for result in results) * 1000 / args.messages
    bench_cpu = statistics.median(result["cpu"][1] for result in results)
    return Row(
        "end-to-end rate (delivered)" if not drain else "delivery alone (spool drain)",
        f"{label}, 2 KiB, {upstream}",
        "aiosmtplib (bench/e2e.py)" if not drain else "",
        relayd=f"{rate:,.0f} msg/s",
        relayd_cpu=f"{cpu:.2f}",
        note=f"client + {fake} CPU {bench_cpu * 1000 / args.messages:.2f} ms/msg",
    )


def run_queued(root: Path, args: argparse.Namespace) -> list[Row]:
    base = root / "queued"
    print(f"  filling the spool with {args.queued:,} messages", file=sys.stderr)
    fill_spool(base / "spool", args.queued, 2 * 1024)
    config_path = _relay_config(base)
    results = [measure_startup(config_path, args.queued) for _ in range(args.repeat)]
    ready = statistics.median(result.ready_seconds for result in results)
    rss = max(result.peak_rss_mib for result in results)
    writers = max(result.writers_rss_mib for result in results)
    load = f"{args.queued:,} queued (2 KiB)"
    note = f"the two spool writer processes beside it: {writers:.1f} MiB together"
    return [
        Row("peak RSS, with messages queued", load, relayd=f"{rss:.1f} MiB", note=note),
        Row("start → READY=1", load, relayd=f"{ready:.2f} s"),
    ]


def run_accept_while_delivering(root: Path, args: argparse.Namespace) -> list[Row]:
    """--with-postfix-xoauth2: bench/delivering.py's pairs (relayd and Postfix with
    sasl-xoauth2, both forwarding to the fake Exchange), medians and ratios."""
    load = argparse.Namespace(
        messages=args.xoauth2_messages,
        clients=20,
        pairs=args.repeat,
        no_postfix=False,
        plugin=args.sasl_xoauth2_plugin,
        postfix_tls_per_message=False,
    )
    directory = root / "delivering"
    directory.mkdir()
    directory.chmod(0o755)
    postfix.become_subreaper()
    results = _run(delivering.run_pairs(directory, load))
    label = f"{load.messages:,} × 2 KiB, 20 sessions, new connection per message"
    rows = []
    for title, attribute, unit in (
        ("accept rate while delivering", "accepted_per_s", "msg/s"),
        ("end to end while accepting", "delivered_per_s", "msg/s"),
        ("CPU for the whole job", "cpu_s", "s"),
    ):
        ours = [getattr(r, attribute) for r in results if r.server == "relayd"]
        theirs = [getattr(r, attribute) for r in results if r.server == "postfix"]
        ratios = [a / b for a, b in zip(ours, theirs, strict=False) if b]
        rows.append(
            Row(
                title,
                label,
                "smtp-source",
                relayd=f"{statistics.median(ours):,.{1 if unit == 's' else 0}f} {unit}",
                postfix=f"{statistics.median(theirs):,.{1 if unit == 's' else 0}f} {unit}",
                ratio=f"{statistics.median(ratios):.2f}" if ratios else "",
                note="STARTTLS + XOAUTH2 to the fake Exchange, 3 connections each"
                if attribute == "accepted_per_s"
                else "",
            )
        )
    return rows


def run_rate_limit(root: Path, args: argparse.Namespace) -> list[Row]:
    """--rate-limit N: bench/ratelimit.py, the fake enforcing N a minute."""
    load = argparse.Namespace(limit=args.rate_limit, minutes=args.rate_minutes)
    directory = root / "ratelimit"
    directory.mkdir()
    result = _run(ratelimit.run(directory, load))
    backlogged = result["minutes"][: load.minutes]
    sustained = min(backlogged) * 100 / load.limit if backlogged else 0.0
    label = f"N = {load.limit}/min, {result['count']:,} queued, pool of 3"
    return [
        Row("delivery within the limit", label, relayd=f"{sustained:.1f} % of N"),
        Row("throttling replies", label, relayd=str(result["throttled"])),
        Row(
            "oldest first",
            label,
            relayd=str(result["displacement"]),
            note="largest distance between delivery and queue position (6 in flight)",
        ),
    ]


def print_table(rows: list[Row], with_postfix: bool) -> None:
    columns: list[tuple[str, Callable[[Row], str], bool]] = [
        ("measurement", lambda r: r.measurement, False),
        ("load", lambda r: r.load, False),
        ("generator", lambda r: r.generator, False),
        ("relayd", lambda r: r.relayd, True),
        ("p50 / p99 ms", lambda r: r.relayd_latency, True),
        ("relayd CPU ms/msg", lambda r: r.relayd_cpu, True),
    ]
    if with_postfix:
        columns += [
            ("Postfix", lambda r: r.postfix, True),
            ("Postfix p50 / p99 ms", lambda r: r.postfix_latency, True),
            ("relayd / Postfix", lambda r: r.ratio, True),
        ]
    columns.append(("notes", lambda r: r.note, False))
    print("| " + " | ".join(title for title, _, _ in columns) + " |")
    print("|" + "|".join("---:" if right else "---" for _, _, right in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row) for _, cell, _ in columns) + " |")


def add_delivering_arguments(parser: argparse.ArgumentParser) -> None:
    """The accept-while-delivering and rate-limit rows (off unless asked for)."""
    parser.add_argument(
        "--with-postfix-xoauth2",
        action="store_true",
        help="accept while delivering, against Postfix + sasl-xoauth2 (bench/README.md)",
    )
    parser.add_argument("--sasl-xoauth2-plugin", type=Path, help="path of libsasl-xoauth2.so")
    parser.add_argument("--xoauth2-messages", type=int, default=2000, help="per run")
    parser.add_argument("--rate-limit", type=int, default=0, help="N/min; 0 skips that row")
    parser.add_argument("--rate-minutes", type=int, default=2, help="minutes with mail queued")


def check_delivering_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.with_postfix_xoauth2:
        return
    if not postfix.available() or postfix.SMTP_SOURCE is None:
        parser.error("--with-postfix-xoauth2 needs Postfix: apt-get install postfix")
    args.sasl_xoauth2_plugin = postfix_xoauth2.find_plugin(args.sasl_xoauth2_plugin)
    if args.sasl_xoauth2_plugin is None:
        parser.error(
            "--with-postfix-xoauth2 needs the sasl-xoauth2 plugin (no distribution package:"
            " install it per github.com/tarickb/sasl-xoauth2, or give --sasl-xoauth2-plugin)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="per 2 KiB run (100 KiB: /5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per load; medians shown")
    parser.add_argument("--queued", type=int, default=100_000, help="0 skips the queued rows")
    parser.add_argument("--with-postfix", action="store_true", help="compare with Postfix")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end rows")
    parser.add_argument("--no-accept", action="store_true", help="skip the accept-rate rows")
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"), help="where spools go")
    add_delivering_arguments(parser)
    parser.add_argument("--listener", action="store_true", help="bench/listener.py's rows too")
    listener.add_arguments(parser)
    args = parser.parse_args()
    if args.with_postfix and not postfix.available():
        parser.error("--with-postfix needs Postfix: apt-get install postfix (see bench/README.md)")
    check_delivering_arguments(parser, args)

    header = machine(args.base)
    with tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # Postfix's daemons run as the postfix user
        spread(root)
        rows = [] if args.no_accept else run_accept(root, args)
        if not args.no_e2e:
            rows += run_end_to_end(root, args)
        if args.queued:
            rows += run_queued(root, args)
        if args.with_postfix_xoauth2:
            rows += run_accept_while_delivering(root, args)
        if args.rate_limit:
            rows += run_rate_limit(root, args)
        listener_rows = list(listener.rows(root, args)) if args.listener else []
        print("  removing the spools", file=sys.stderr)
    print(f"\n{header}\n")
    print(f"`{shlex.join(['python3', 'bench/run.py', *sys.argv[1:]])}`, medians of {args.repeat}\n")
    print_table(rows, args.with_postfix or args.with_postfix_xoauth2)
    if listener_rows:
        print("\nThe listener (bench/listener.py):\n\n" + "\n".join(listener_rows))


if __name__ == "__main__":
    main()

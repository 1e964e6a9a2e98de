"""Accept while delivering: relayd and Postfix under the same load, both forwarding with
STARTTLS + AUTH XOAUTH2 to the fake Exchange (3 connections each). Prints a table.

    python3 bench/delivering.py [--messages 2000] [--clients 20] [--pairs 3]
                                [--sasl-xoauth2-plugin PATH] [--no-postfix]

The load is Postfix's smtp-source, ``--clients`` sessions, 2 KiB messages, a new
connection per message (what the applications' Java mail clients do). Each run starts
a fresh relay and a fresh fake Exchange, and measures:

* accept rate: messages / the time smtp-source took;
* end to end: messages / the time from smtp-source's start to the last message at
  the fake Exchange;
* CPU for the whole job, from the start of the load to the last delivery: relayd's
  process (all its threads), or every process of the Postfix instance together
  (master, smtpd, cleanup, qmgr, smtp, ...; those that exited are in their parent's
  children time) — bench/measure.py, /proc.

relayd runs at its default log level; Postfix logs every message too (to its maillog
file). Runs alternate, relayd first in odd pairs, Postfix first in even ones. The fake
Exchange and the fake Entra ID run in this process: their CPU is shown as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from math import nan
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme

from bench import postfix, postfix_xoauth2
from bench.measure import cpu_seconds, machine, relay_cpu_seconds, session_cpu_seconds, spread
from relayd import config
from tests.auth_helpers import shipped_oauth, sign_in
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.helpers import RelayProcess, deep_merge, wait_for_port, write_config

SIZE = 2 * 1024
STALL = 10.0  # seconds without a delivery: the rest was deferred


@dataclass
class Fakes:
    """The fake Entra ID (shared by every run) and its CA."""

    ca: trustme.CA
    ca_file: Path
    entra: FakeEntra


@dataclass
class RunResult:
    server: str
    accepted_per_s: float
    delivered_per_s: float
    delivered: int
    cpu_s: float
    bench_cpu_s: float
    peak_connections: int
    refused_auth: int = 0  # 432 4.3.2 at AUTH: over the fake's 3 connections


def relay_config(tmp: Path, fakes: Fakes, fake: FakeExchange, **upstream: object) -> Path:
    """relayd as it ships (log level info), forwarding to ``fake``, signed in through
    the fake Entra ID like `relayd auth login` does."""
    overrides = {
        "upstream": fake.relay_config(fakes.ca_file, **upstream)["upstream"],
        "oauth": shipped_oauth(tmp, fakes.entra, fakes.ca_file),
    }
    path = write_config(tmp, deep_merge({"metrics": {"enabled": False}}, overrides))
    sign_in(config.load(path), fakes.ca_file)
    return path


async def smtp_source(port: int, clients: int, messages: int) -> float:
    """smtp-source without -d: a new connection per message. Seconds it took."""
    assert postfix.SMTP_SOURCE is not None
    command = [
        postfix.SMTP_SOURCE,
        *("-s", str(clients), "-m", str(messages), "-l", str(SIZE - 200)),
        *("-f", MAILBOX, "-t", "user@example.org", f"127.0.0.1:{port}"),
    ]
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL)
    if await process.wait() != 0:
        raise RuntimeError(f"smtp-source exited with {process.returncode}")
    return time.perf_counter() - started


async def measure(
    fake: FakeExchange, port: int, cpu: Callable[[], float], args: argparse.Namespace
) -> tuple[float, float, int, float, float]:
    cpu_before, bench_before = cpu(), cpu_seconds(os.getpid())
    started = time.perf_counter()
    accept_seconds = await smtp_source(port, args.clients, args.messages)
    last_delivery, delivered = time.perf_counter(), len(fake.messages)
    # Until all are there, or none came for a while: a deferred message (Postfix after a
    # 432) would only come back after minutes; the rate counts up to the last delivery.
    while delivered < args.messages and time.perf_counter() - last_delivery < STALL:
        await asyncio.sleep(0.01)
        if len(fake.messages) > delivered:
            last_delivery, delivered = time.perf_counter(), len(fake.messages)
    job_cpu, bench_cpu = cpu() - cpu_before, cpu_seconds(os.getpid()) - bench_before
    elapsed = last_delivery - started
    return args.messages / accept_seconds, delivered / elapsed, delivered, job_cpu, bench_cpu


async def run_relayd(
    tmp: Path, fakes: Fakes, args: argparse.Namespace, watch: Callable[[int], Any] | None = None
) -> RunResult:
    """One relayd run; ``watch(pid)``, a context manager, is entered for the measured
    part (bench/cpu_profile.py samples relayd in it)."""
    fake = await FakeExchange(fakes.ca, validator=fakes.entra.is_valid_access_token).start()
    try:
        path = await asyncio.to_thread(relay_config, tmp, fakes, fake, rate_limit_per_minute=0)
        relay = RelayProcess(path).start(wait=False)
        try:
            await asyncio.to_thread(wait_for_port, "127.0.0.1", relay.port, 30)
            assert relay.process is not None
            pid = relay.process.pid
            with watch(pid) if watch else contextlib.nullcontext():
                figures = await measure(fake, relay.port, lambda: relay_cpu_seconds(pid), args)
        finally:
            relay.stop()
    finally:
        await fake.stop()
    return RunResult("relayd", *figures, fake.stats.peak_connections, fake.stats.auth_failures)


async def run_postfix(tmp: Path, fakes: Fakes, args: argparse.Namespace) -> RunResult:
    fake = await FakeExchange(fakes.ca, validator=fakes.entra.is_valid_access_token).start()
    local = postfix_xoauth2.XOAuth2Postfix(
        tmp / "postfix",
        exchange_port=fake.port,
        plugin=args.plugin,
        ca_file=fakes.ca_file,
        token=postfix_xoauth2.token_file_for(fakes.entra, fakes.ca_file),
        mailbox=MAILBOX,
        reuse=not args.postfix_tls_per_message,
    )
    redeemed = fakes.entra.requests["token:refresh_token"]
    try:
        await asyncio.to_thread(local.__enter__)
        try:
            assert local.master is not None
            session = local.master_pid()  # master runs setsid: every daemon is in its session
            figures = await measure(fake, local.port, lambda: session_cpu_seconds(session), args)
        finally:
            await asyncio.to_thread(local.__exit__)
    finally:
        await fake.stop()
    redeemed = fakes.entra.requests["token:refresh_token"] - redeemed
    print(f"    sasl-xoauth2: {redeemed} token requests to the fake Entra ID", file=sys.stderr)
    if figures[2] < args.messages:
        print(f"  Postfix delivered {figures[2]} of {args.messages}:", file=sys.stderr)
        for line in local.log_problems()[:5]:
            print(f"    {line}", file=sys.stderr)
    return RunResult("postfix", *figures, fake.stats.peak_connections, fake.stats.auth_failures)


RUNNERS = {"relayd": run_relayd, "postfix": run_postfix}


async def run_pairs(root: Path, args: argparse.Namespace) -> list[RunResult]:
    """``args.pairs`` pairs of runs, the order alternating: relayd first, then Postfix."""
    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o644)  # Postfix's smtp runs as the postfix user
    results = []
    spread(root)  # each run's spool on a fresh ext4 block group (measure.spread)
    with FakeEntra(ca) as entra:
        fakes = Fakes(ca, ca_file, entra)
        servers = ["relayd"] + ([] if args.no_postfix else ["postfix"])
        for pair in range(args.pairs):
            for server in servers if pair % 2 == 0 else servers[::-1]:
                tmp = root / f"{server}-{pair}"
                tmp.mkdir()
                tmp.chmod(0o755)
                print(f"  accept while delivering: {server}, run {pair + 1}", file=sys.stderr)
                result = await RUNNERS[server](tmp, fakes, args)
                print(f"    {_describe(result)}; {_uptime()}", file=sys.stderr)
                results.append(result)
    return results


def _describe(result: RunResult) -> str:
    return (
        f"{result.server}: accepted {result.accepted_per_s:,.0f} msg/s, end to end"
        f" {result.delivered_per_s:,.0f} msg/s ({result.delivered} delivered), CPU"
        f" {result.cpu_s:.2f} s, bench {result.bench_cpu_s:.2f} s, peak upstream connections"
        f" {result.peak_connections}, refused AUTH {result.refused_auth}"
    )


def _uptime() -> str:
    return "load average " + ", ".join(f"{value:.2f}" for value in os.getloadavg())


def summary(results: list[RunResult]) -> list[str]:
    """Markdown rows: each run, then the medians and the ratio per pair."""
    lines = [
        "| run | relay | accepted msg/s | end to end msg/s | delivered | CPU s (whole job)"
        " | bench CPU s (fakes) | peak upstream conns | AUTH refused (432) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, result in enumerate(results, 1):
        lines.append(
            f"| {number} | {result.server} | {result.accepted_per_s:,.0f}"
            f" | {result.delivered_per_s:,.0f} | {result.delivered} | {result.cpu_s:.2f}"
            f" | {result.bench_cpu_s:.2f} | {result.peak_connections} | {result.refused_auth} |"
        )
    relayd = [r for r in results if r.server == "relayd"]
    other = [r for r in results if r.server == "postfix"]
    if relayd and other:
        pairs = list(zip(relayd, other, strict=False))
        for label, attribute in (
            ("accept", "accepted_per_s"),
            ("end to end", "delivered_per_s"),
            ("CPU", "cpu_s"),
        ):
            ratios = [getattr(a, attribute) / (getattr(b, attribute) or nan) for a, b in pairs]
            shown = " / ".join(f"{ratio:.2f}" for ratio in ratios)
            lines.append(
                f"\nrelayd / Postfix, {label}: {shown} (median {statistics.median(ratios):.2f})"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--no-postfix", action="store_true", help="relayd alone")
    parser.add_argument("--sasl-xoauth2-plugin", type=Path, help="path of libsasl-xoauth2.so")
    parser.add_argument(
        "--postfix-tls-per-message",
        action="store_true",
        help="Postfix's default smtp_tls_connection_reuse = no: a TLS session and AUTH per"
        " message, and 432s when the next connection opens before the last one closed",
    )
    parser.add_argument("--keep", action="store_true", help="keep the spools and logs")
    parser.add_argument("--base", type=Path, default=Path("/var/tmp"), help="where spools go")
    args = parser.parse_args()
    args.plugin = check_prerequisites(parser, args)
    header = machine(args.base)
    with tempfile.TemporaryDirectory(prefix="relayd-bench-", dir=args.base) as tmp:
        root = Path(tmp)
        if args.keep:  # outside the temporary directory, so it stays
            root = Path(tempfile.mkdtemp(prefix="relayd-bench-", dir=args.base))
        root.chmod(0o755)
        if not args.no_postfix:
            postfix.become_subreaper()
        results = asyncio.run(run_pairs(root, args))
    print(f"\n{header}\n")
    print(f"{args.messages} messages of 2 KiB, {args.clients} smtp-source sessions, ")
    print("a new connection per message; both relays: STARTTLS + XOAUTH2, 3 connections\n")
    print("\n".join(summary(results)))


def check_prerequisites(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path | None:
    """smtp-source always; Postfix and the plugin unless --no-postfix."""
    if postfix.SMTP_SOURCE is None:
        parser.error("needs Postfix's smtp-source: apt-get install postfix (bench/README.md)")
    if args.no_postfix:
        return None
    if not postfix.available():
        parser.error("needs Postfix: apt-get install postfix (see bench/README.md)")
    plugin = postfix_xoauth2.find_plugin(args.sasl_xoauth2_plugin)
    if plugin is None:
        parser.error(
            "needs the sasl-xoauth2 plugin (no distribution package: install it per"
            " github.com/tarickb/sasl-xoauth2, or give --sasl-xoauth2-plugin PATH)"
        )
    return plugin


if __name__ == "__main__":
    main()

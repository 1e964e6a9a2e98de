"""systemd/relayd.service: `systemd-analyze security` rates it below 2.0 and `verify`
finds nothing to complain about."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    RelayProcess,
    make_message,
    transact,
    wait_for_port,
    write_config,
)

UNIT = REPO / "systemd" / "relayd.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)")
STRACE = shutil.which("strace")
# "1234 openat(...", "1234 <... futex resumed>": the system call's name.
TRACED_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]", re.MULTILINE)


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


def unit_copy(directory: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this interpreter: verify checks that the
    binary exists, and /opt/relayd/bin/relayd does not on a test machine."""
    text = UNIT.read_text() if text is None else text
    command = re.search(r"^ExecStart=(\S+)", text, re.MULTILINE)
    assert command is not None and command.group(1) == "/opt/relayd/bin/relayd"
    copy = directory / "relayd.service"
    copy.write_text(
        text.replace(f"ExecStart={command.group(1)}", f"ExecStart={sys.executable} -m relayd")
    )
    return copy


def test_security_exposure_is_below_two() -> None:
    result = analyze("security", "--offline=yes", str(UNIT))
    match = EXPOSURE.search(result.stdout)
    assert match, result.stdout + result.stderr
    print(f"\nsystemd-analyze security: {match.group(1)} {match.group(2)}")
    assert float(match.group(1)) < 2.0, result.stdout


def unit_settings() -> list[tuple[str, str]]:
    lines = UNIT.read_text().splitlines()
    return [tuple(line.split("=", 1)) for line in lines if re.match(r"^\w+=", line)]  # type: ignore[misc]


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and its members (calls, @groups)."""
    groups: dict[str, list[str]] = {}
    for line in analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and groups:
            members.append(line.strip())
    return groups


def allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines let through (allow list, then ~denials)."""
    groups = syscall_groups()

    def expand(names: list[str]) -> set[str]:
        calls: set[str] = set()
        for name in names:
            calls |= expand(groups[name]) if name.startswith("@") else {name}
        return calls

    allowed: set[str] = set()
    for key, value in unit_settings():
        if key != "SystemCallFilter":
            continue
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    return allowed


def test_the_unit_keeps_what_relayd_needs() -> None:
    """Hardening must not take away what the service needs to work."""
    settings = dict(unit_settings())
    assert settings["Type"] == "notify" and "WatchdogSec" in settings
    assert settings["StateDirectory"] == "relayd"  # spool + token cache, writable
    assert settings["ConfigurationDirectory"] == "relayd"
    assert settings["LoadCredential"] == "client_secret:/etc/relayd/client_secret"
    families = settings["RestrictAddressFamilies"].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)  # Microsoft 365, sd_notify
    assert "PrivateNetwork" not in settings and "IPAddressDeny" not in settings
    assert "ProcSubset" not in settings  # keeps /proc/stat for the process_* metrics


def test_verify_finds_nothing(tmp_path: Path) -> None:
    result = analyze("verify", "--man=no", str(unit_copy(tmp_path)))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """verify exits 0 even for unknown keys; the test above relies on its output."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    result = analyze("verify", "--man=no", str(unit_copy(tmp_path, broken)))
    assert "ProtectSytem" in result.stderr


@pytest.mark.skipif(
    STRACE is None, reason="strace is not installed (Debian: apt-get install strace)"
)
def test_relayd_uses_only_what_the_sandbox_allows(tmp_path: Path) -> None:
    """Run `relayd serve` under strace through a session, a reload, a rescan and a stop;
    every system call and socket family it used must pass the unit's filters."""
    trace = tmp_path / "trace"
    if subprocess.run([STRACE, "-o", os.devnull, "true"], capture_output=True).returncode:
        pytest.skip("strace cannot trace here (ptrace is not permitted)")
    relay = RelayProcess(write_config(tmp_path))
    serve = [sys.executable, "-m", "relayd", "serve", "-c", str(relay.config_path)]
    process = subprocess.Popen(
        [STRACE, "-f", "-qq", "-o", str(trace), *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        wait_for_port("127.0.0.1", relay.port, timeout=60)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            transact(client, make_message("traced"))
        daemon = int((tmp_path / "spool" / "relayd.pid").read_text())
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM):
            os.kill(daemon, signum)
        assert process.wait(60) == 0
    finally:
        process.kill()
        process.wait()

    text = trace.read_text()
    used = set(TRACED_CALL.findall(text))
    assert {"execve", "fsync", "bind", "accept4"} <= used  # the trace saw the real work
    assert used - allowed_syscalls() == set()
    families = set(re.findall(r"socket\((AF_[A-Z0-9]+)", text))
    assert families <= set(dict(unit_settings())["RestrictAddressFamilies"].split())

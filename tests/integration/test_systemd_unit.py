"""systemd/relayd.service: `systemd-analyze security` rates it below 2.0 and `verify`
finds nothing to complain about."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

UNIT = REPO / "systemd" / "relayd.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)")


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


def test_the_unit_keeps_what_relayd_needs() -> None:
    """Hardening must not take away what the service needs to work."""
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if re.match(r"^\w+=", line)
    )
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

"""`relayd serve` under systemd: stderr is the journal ($JOURNAL_STREAM names it), and
every line starts with its sd-daemon(3) priority, as journald's SyslogLevelPrefix=
reads it; `journalctl -p warning -u relayd` then shows warnings and worse only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.helpers import REPO, unreachable_upstream, wait_for_port, write_config

PRIORITIES = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>"}


def serve_with_stderr(config: Path, stderr: Path, journal: Path | None) -> subprocess.Popen:
    with open(stderr, "ab") as handle:
        environment = {**os.environ, "PYTHONPATH": str(REPO)}
        environment.pop("JOURNAL_STREAM", None)
        if journal is not None:
            status = journal.stat()
            environment["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        return subprocess.Popen(
            [sys.executable, "-m", "relayd", "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=handle,
            env=environment,
            cwd=REPO,
        )


def run_until_ready(config: Path, stderr: Path, journal: Path | None) -> list[str]:
    process = serve_with_stderr(config, stderr, journal)
    try:
        wait_for_port("127.0.0.1", int(config_port(config)))
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    return stderr.read_text().splitlines()


def config_port(config: Path) -> str:
    return yaml.safe_load(config.read_text())["listen"]["port"]


def test_every_line_starts_with_its_priority(tmp_path: Path) -> None:
    # No sign-in yet: the daemon warns that mail stays queued, among its info lines.
    config = write_config(tmp_path, unreachable_upstream(tmp_path))
    stderr = tmp_path / "stderr"
    stderr.write_text("")
    lines = run_until_ready(config, stderr, journal=stderr)
    assert lines
    for line in lines:
        prefix, json_text = line[:3], line[3:]
        level = json_text.split('"level": "', 1)[1].split('"', 1)[0]
        assert prefix == PRIORITIES[level], line
    assert any(line.startswith("<4>") for line in lines)  # the sign-in warning
    assert any(line.startswith("<6>") for line in lines)


def test_other_destinations_are_unchanged(tmp_path: Path) -> None:
    config = write_config(tmp_path, unreachable_upstream(tmp_path))
    stderr, elsewhere = tmp_path / "stderr", tmp_path / "some-other-file"
    stderr.write_text("")
    elsewhere.write_text("")
    lines = run_until_ready(config, stderr, journal=elsewhere)  # a redirect under systemd
    assert lines and all(line.startswith("{") for line in lines)


def test_a_start_failure_is_logged_as_an_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, {"listen": {"port": port}})
        stderr = tmp_path / "stderr"
        stderr.write_text("")
        process = serve_with_stderr(config, stderr, journal=stderr)
        assert process.wait(30) == 2
    (failure,) = [line for line in stderr.read_text().splitlines() if "cannot start" in line]
    assert failure.startswith("<3>relayd: cannot start: cannot listen on")

"""Shared test helpers: ports, config files, and relayd run as a real subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
QUEUED_AS = re.compile(rb"queued as ([0-9A-F]{19})")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def deep_merge(base: dict, overrides: Mapping) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def base_config(tmp_path: Path) -> dict[str, Any]:
    """A config that runs anywhere: free ports, spool under tmp_path, maildir transport."""
    return {
        "listen": {"address": "127.0.0.1", "port": free_port(), "shutdown_grace": "5s"},
        "spool": {"directory": str(tmp_path / "spool"), "min_free_space": "1MiB"},
        "upstream": {"transport": "maildir", "maildir": str(tmp_path / "maildir")},
        "metrics": {"address": "127.0.0.1", "port": free_port()},
        "logging": {"format": "json", "level": "info"},
    }


def write_config(
    tmp_path: Path, overrides: Mapping | None = None, name: str = "relayd.yaml"
) -> Path:
    document = deep_merge(base_config(tmp_path), overrides or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def sample_message(subject: str = "test", body: str = "Hello.") -> bytes:
    """A small RFC 5322 message with CRLF line ends (Date and Message-ID included, so
    the relay prepends only its Received: field)."""
    return (
        "From: app@example.com\r\nTo: user@example.com\r\n"
        f"Subject: {subject}\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@test.example>\r\n\r\n{body}\r\n"
    ).encode()


def send_message(
    client: smtplib.SMTP,
    content: bytes,
    sender: str = "app@example.com",
    recipients: tuple[str, ...] = ("user@example.com",),
) -> str:
    """One transaction on an open session; the queue id from the 250 reply."""
    client.ehlo_or_helo_if_needed()
    client.mail(sender)
    for recipient in recipients:
        client.rcpt(recipient)
    code, reply = client.data(content)
    match = QUEUED_AS.search(reply)
    if code != 250 or match is None:
        raise smtplib.SMTPDataError(code, reply)
    return match.group(1).decode()


def run_relayd(
    *args: str, input: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m relayd ARGS` to completion (no terminal), its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "relayd", *args],
        input=input,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        timeout=60,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


class RelayProcess:
    """`python -m relayd serve -c CONFIG` as a child process, its output in a file."""

    def __init__(
        self, config_path: Path, *, env: Mapping[str, str] | None = None, args: tuple = ()
    ) -> None:
        self.config_path = config_path
        self.config = yaml.safe_load(config_path.read_text())
        self.log_path = config_path.with_suffix(f".{time.monotonic_ns()}.log")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = args
        self.process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return int(self.config["listen"]["port"])

    @property
    def metrics_port(self) -> int:
        return int(self.config["metrics"]["port"])

    def start(self, wait: bool = True) -> RelayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed in wait())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relayd", "serve", "-c", str(self.config_path), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        log.close()
        if wait:
            try:
                wait_for_port("127.0.0.1", self.port)
            except TimeoutError:
                self.kill()
                raise RuntimeError(f"relayd did not start:\n{self.output()}") from None
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_output(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        """Until ``text`` has appeared ``count`` times in the output (a log line)."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{text!r} not logged {count}x within {timeout}s:\n{self.output()}"
                )
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"relayd exited ({self.process.returncode}):\n{self.output()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def running_relay(config_path: Path, **kwargs: Any) -> Iterator[RelayProcess]:
    relay = RelayProcess(config_path, **kwargs).start()
    try:
        yield relay
    finally:
        relay.kill()

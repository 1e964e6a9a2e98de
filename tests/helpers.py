"""Shared test helpers: ports, config files, and relayd run as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from relayd import config

REPO = Path(__file__).resolve().parent.parent


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


def load_settings(tmp_path: Path, overrides: Mapping | None = None) -> config.Settings:
    """Validated settings from base_config() + overrides, as `relayd serve` would load them."""
    return config.from_mapping(deep_merge(base_config(tmp_path), overrides or {}), environ={})


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


# --- messages and clients ------------------------------------------------------------


def make_message(
    subject: str = "test",
    body: str | None = None,
    *,
    body_size: int = 100,
    sender: str = "app@example.com",
    recipients: tuple[str, ...] = ("user@example.com",),
    message_id: str | None = None,
) -> bytes:
    """A plain RFC 5322 message with CRLF line ends. It has Date: and Message-ID: (by
    default derived from the subject), so relayd prepends only its Received: field. The
    body is ``body`` or text lines adding up to about ``body_size`` bytes."""
    message_id = message_id or f"<{subject.replace(' ', '.')}@test.example>"
    headers = [
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: {subject}",
        "Date: Wed, 01 May 2024 10:00:00 +0000",
        f"Message-ID: {message_id}",
    ]
    if body is None:
        line = "The quick brown fox jumps over the lazy dog. 0123456789\r\n"
        body = line * max(1, round(body_size / len(line)))  # whole CRLF lines
    else:
        body += "\r\n"
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


async def send_messages(
    port: int,
    messages: Iterable[tuple[str, list[str], bytes]],
    *,
    connections: int = 1,
    host: str = "127.0.0.1",
) -> list[str]:
    """Send (sender, recipients, content) over ``connections`` parallel sessions; returns
    the server's reply to each end of DATA, in order."""
    queue = list(enumerate(messages))
    replies: list[str] = [""] * len(queue)

    async def session() -> None:
        async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as client:
            while queue:
                index, (sender, recipients, content) = queue.pop(0)
                _, reply = await client.sendmail(sender, recipients, content)
                replies[index] = reply

    await asyncio.gather(*(session() for _ in range(connections)))
    return replies


async def eventually(
    condition: Callable[[], bool], timeout: float = 15.0, message: str = "condition"
) -> None:
    """Wait until ``condition()`` is true, polling; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(0.02)

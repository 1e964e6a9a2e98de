"""Shared test helpers: ports, config files, and relayd run as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relayd import config
from tests.fakes.entra import CLIENT_ID, TENANT_ID  # GUIDs: config refuses other shapes

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


def unreachable_upstream(tmp_path: Path) -> dict[str, Any]:
    """Overrides for an SMTP upstream nobody can reach and no sign-in: mail stays queued."""
    return {
        "upstream": {
            "transport": "smtp",
            "host": "127.0.0.1",
            "port": free_port(),
            "mailbox": "relay@contoso.example",
        },
        "oauth": {
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "authority": f"https://127.0.0.1:{free_port()}/tenant",
            "token_cache": str(tmp_path / "token_cache.json"),
        },
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


def transact(
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
    """`python -m relayd serve -c CONFIG` as a child process, its output in a file.

    Without a config file (``relayd serve --sandbox``) the ports come from the
    RELAYD_LISTEN_PORT and RELAYD_METRICS_PORT environment overrides.
    """

    def __init__(
        self,
        config_path: Path | None,
        *,
        env: Mapping[str, str] | None = None,
        args: tuple = (),
        cwd: Path = REPO,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """``prefix`` runs the daemon under another command (e.g. ``setpriv ... --``)."""
        self.config_path = config_path
        self.config = yaml.safe_load(config_path.read_text()) if config_path else {}
        stamp = time.monotonic_ns()
        self.log_path = (
            config_path.with_suffix(f".{stamp}.log") if config_path else cwd / f"relayd.{stamp}.log"
        )
        # PYTHONPATH: this checkout's relayd, whatever the working directory.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **(env or {})}
        self.args = ("-c", str(config_path), *args) if config_path else args
        self.cwd = cwd
        self.prefix = prefix
        self.process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return int(self.env.get("RELAYD_LISTEN_PORT") or self.config["listen"]["port"])

    @property
    def metrics_port(self) -> int:
        return int(self.env.get("RELAYD_METRICS_PORT") or self.config["metrics"]["port"])

    def start(self, wait: bool = True) -> RelayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed in wait())
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "relayd", "serve", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
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

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (logging.format: json), parsed."""
        return json_lines(self.output())

    def wait_for_log(self, event: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first log record with this event and these field values, once it exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.log_records():
                if record.get("event") == event and all(
                    record.get(k) == v for k, v in fields.items()
                ):
                    return record
            time.sleep(0.05)
        raise TimeoutError(f"no log line {event!r} {fields} after {timeout}s:\n{self.output()}")

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


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd (abstract namespace)."""

    def __init__(self) -> None:
        self.name = f"relayd-test-{os.getpid()}-{time.monotonic_ns()}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + self.name)
        self.messages: list[str] = []

    @property
    def address(self) -> str:
        return "@" + self.name  # what NOTIFY_SOCKET says for the abstract namespace

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """Read datagrams until one satisfies ``predicate``; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.socket.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(message)
            if predicate(message):
                return message
        raise TimeoutError(f"no matching notification in {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.socket.close()


@contextlib.contextmanager
def running_relay(config_path: Path, **kwargs: Any) -> Iterator[RelayProcess]:
    relay = RelayProcess(config_path, **kwargs).start()
    try:
        yield relay
    finally:
        relay.kill()


# --- messages as the tests send them and find them again ---------------------------


def numbered_message(number: int, size: int = 2048, tag: str = "t", **fields: Any) -> bytes:
    """A message whose Message-ID names it, with a body of about ``size`` bytes
    (``fields`` go to make_message, e.g. ``sender``)."""
    return make_message(
        f"message {number}", body_size=size, message_id=f"<{tag}-{number}@relayd.test>", **fields
    )


def message_number(content: bytes, tag: str = "t") -> int | None:
    marker = f"Message-ID: <{tag}-".encode()
    start = content.find(marker)
    if start < 0:
        return None
    return int(content[start + len(marker) : content.index(b"@", start)])


def without_trace_fields(stored: bytes) -> bytes:
    """The message as the client sent it: drop the Received: field relayd prepended."""
    assert stored.startswith(b"Received: "), stored[:80]
    lines = stored.split(b"\r\n")
    index = 1
    while lines[index].startswith((b"\t", b" ")):
        index += 1
    return b"\r\n".join(lines[index:])


def spooled_messages(spool_dir: Path) -> dict[str, bytes]:
    """Every queued message's content by queue id, parsed and checked (crc, size)."""
    from relayd.queue.model import STATES
    from relayd.queue.spool import Spool

    spool = Spool(spool_dir)
    found: dict[str, bytes] = {}
    for state in STATES:
        directory = spool.path(state)
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            _, message = spool.find(path.name)
            found[path.name] = message.read_content()
    return found


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` that is a JSON object (log output mixes in nothing else
    when logging.format is json, but a traceback from a crash would not parse)."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def http_get(
    port: int,
    path: str,
    *,
    host: str = "127.0.0.1",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one HTTP request."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


class Scrape:
    """One /metrics answer, parsed: ``scrape.value("relayd_queue_messages", state="incoming")``."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    status, _, body = http_get(port, "/metrics", host=host)
    assert status == 200, f"/metrics answered {status}: {body[:200]!r}"
    return Scrape(body.decode())


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


def send_message(
    port: int,
    content: bytes | None = None,
    sender: str = "app@example.com",
    recipients: tuple[str, ...] = ("user@example.com",),
    host: str = "127.0.0.1",
) -> str:
    """Send one message in a new session; returns the queue id from relayd's 250 reply.

    Raises smtplib.SMTPResponseException (a subclass) when relayd refuses it.
    """
    content = content if content is not None else make_message(sender=sender, recipients=recipients)
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("client.example.com")
        return transact(client, content, sender, recipients)


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
    condition: Callable[[], bool],
    timeout: float = 15.0,
    message: str = "condition",
    interval: float = 0.02,
) -> None:
    """Wait until ``condition()`` is true, polling every ``interval`` seconds; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(interval)

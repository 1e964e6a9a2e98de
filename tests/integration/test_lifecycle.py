"""The daemon's lifecycle through a real `relayd serve` process: SIGTERM, SIGHUP, start-up."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import socket
import threading
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    QUEUED_AS,
    RelayProcess,
    base_config,
    deep_merge,
    free_port,
    make_message,
    running_relay,
    transact,
    write_config,
)

# relayd's Received: field; in the Maildir, the transport's Return-Path: and
# Envelope-To: above it.
TRACE_PREFIX = re.compile(
    rb"\A(?:Return-Path: [^\r\n]*\r\nEnvelope-To: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)?"
    rb"(?:Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+\Z"
)
QUEUE_ID_IN_TRACE = re.compile(rb"\bid ([0-9A-F]{19})\b")
SPOOL_STATES = ("incoming", "active", "deferred", "hold", "failed")


def stored_messages(spool: Path, maildir: Path) -> dict[str, bytes]:
    """Every message relayd holds, by queue id: still queued in the spool, or already
    delivered into the Maildir (once a scheduler delivers; the id is in Received:)."""
    found = {}
    for state in SPOOL_STATES:
        for path in (spool / state).iterdir():
            found[path.name] = path.read_bytes().split(b"\n", 1)[1]  # after the envelope
    for folder in ("new", "cur"):
        for path in (maildir / folder).glob("*") if (maildir / folder).is_dir() else ():
            content = path.read_bytes()
            match = QUEUE_ID_IN_TRACE.search(content)
            if match:
                found[match.group(1).decode()] = content
    return found


def greeting_from(source: str, port: int) -> bytes:
    """The first reply line a client connecting from ``source`` gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        return s.makefile("rb").readline()


def rewrite_config(path: Path, overrides: dict) -> None:
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(path.read_text()), overrides)))


class LoadClient(threading.Thread):
    """One SMTP client sending its share of messages until done or refused."""

    def __init__(self, number: int, port: int, count: int, accepted: dict, progress) -> None:
        super().__init__(daemon=True)
        self.number, self.port, self.count = number, port, count
        self.accepted, self.progress = accepted, progress
        self.errors = 0

    def run(self) -> None:
        client = None
        for index in range(self.count):
            body = f"client {self.number} message {index}\r\n..a line that starts with a dot\r\n"
            content = make_message(f"load {self.number}-{index}", body * 20)
            try:
                client = client or smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                queue_id = transact(client, content)
            except (smtplib.SMTPException, OSError):
                self.errors += 1
                client = None
                if self.errors > 3:  # the listener is closed: this client is done
                    return
                continue
            self.accepted[queue_id] = content
            self.progress()


def test_sigterm_under_load_loses_nothing_that_got_250(tmp_path: Path) -> None:
    grace = 5.0
    config = write_config(tmp_path, {"listen": {"shutdown_grace": f"{grace}s"}})
    relay = RelayProcess(config).start()
    accepted: dict[str, bytes] = {}
    halfway = threading.Event()

    def progress() -> None:
        if len(accepted) >= 1000:
            halfway.set()

    def load_running() -> bool:
        return not halfway.wait(0.2) and any(client.is_alive() for client in clients)

    clients = [LoadClient(n, relay.port, 100, accepted, progress) for n in range(20)]
    try:
        for client in clients:
            client.start()
        while load_running():
            pass
        assert halfway.is_set(), f"the load did not get going:\n{relay.output()}"
        accepted_before_stop = len(accepted)
        relay.signal(signal.SIGTERM)
        status = relay.process.wait(grace + 10)
        for client in clients:
            client.join(60)
    finally:
        relay.kill()

    assert status == 0, relay.output()
    assert not any(client.is_alive() for client in clients)
    stored = stored_messages(tmp_path / "spool", tmp_path / "maildir")
    missing = sorted(set(accepted) - set(stored))
    assert not missing, f"{len(missing)} messages got 250 and are gone: {missing[:5]}"
    for queue_id, content in accepted.items():
        kept = stored[queue_id]
        assert kept.endswith(content), queue_id
        assert TRACE_PREFIX.match(kept[: -len(content)]), kept[:300]
    print(
        f"\n{len(accepted)} accepted ({len(accepted) - accepted_before_stop} after SIGTERM),"
        f" {sum(c.errors for c in clients)} client errors, all stored"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_lets_the_open_transaction_finish_and_refuses_the_next(
    tmp_path: Path, signum: int
) -> None:
    with running_relay(write_config(tmp_path)) as relay:
        client = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        client.ehlo()
        client.mail("app@example.com")
        client.rcpt("user@example.com")
        relay.signal(signum)
        relay.wait_for_output('"shutting down"')
        with socket.socket() as late:  # the listening socket is closed
            assert late.connect_ex(("127.0.0.1", relay.port)) != 0
        code, reply = client.data(make_message("in flight"))
        assert code == 250, reply
        assert client.mail("app@example.com")[0] == 421  # RFC 5321 §3.8
        assert relay.process.wait(10) == 0
    queue_id = QUEUED_AS.search(reply).group(1).decode()
    assert queue_id in stored_messages(tmp_path / "spool", tmp_path / "maildir")


def test_sighup_changes_log_level_and_allowed_clients_live(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"listen": {"allowed_clients": ["127.0.0.1/32"]}})
    with running_relay(config) as relay:
        assert greeting_from("127.0.0.2", relay.port).startswith(b"554 5.7.1")
        session = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        session.ehlo()
        assert '"mail.log"' not in relay.output()  # library lines are hidden at info

        rewrite_config(
            config,
            {
                "listen": {"allowed_clients": ["127.0.0.1/32", "127.0.0.2/32"]},
                "logging": {"level": "debug"},
            },
        )
        relay.signal(signal.SIGHUP)
        relay.wait_for_output('"configuration reloaded"')

        assert greeting_from("127.0.0.2", relay.port).startswith(b"220 ")
        transact(session, make_message("after reload"))  # the open session survived
        session.quit()
        relay.wait_for_output('"mail.log"')  # aiosmtpd's lines now come through
        assert '"level": "debug"' in relay.output()


def test_bad_config_on_sighup_is_refused_and_the_old_one_stays(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    good = config.read_text()
    with running_relay(config) as relay:
        rewrite_config(config, {"listen": {"max_recipients": "lots"}})
        relay.signal(signal.SIGHUP)
        relay.wait_for_output('"reload refused')
        refusal = next(line for line in relay.output().splitlines() if "reload refused" in line)
        assert "listen.max_recipients" in refusal and str(config) in refusal

        config.write_text("listen: [unclosed\n")
        relay.signal(signal.SIGHUP)
        relay.wait_for_output('"reload refused', count=2)

        assert relay.process.poll() is None
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            transact(client, make_message("still running"))

        config.write_text(good)  # and it still reloads once the file is right
        relay.signal(signal.SIGHUP)
        relay.wait_for_output('"configuration reloaded"')


def test_reload_keeps_settings_that_need_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with running_relay(config) as relay:
        old_port = relay.port
        rewrite_config(
            config,
            {
                "listen": {"port": free_port(), "max_recipients": 1},
                "spool": {"directory": str(tmp_path / "elsewhere")},
            },
        )
        relay.signal(signal.SIGHUP)
        relay.wait_for_output('"configuration reloaded"')
        warning = next(
            json.loads(line) for line in relay.output().splitlines() if "need a restart" in line
        )
        assert sorted(warning["keys"]) == ["listen.port", "spool.directory"]
        with smtplib.SMTP("127.0.0.1", old_port, timeout=10) as client:
            client.ehlo()
            client.mail("app@example.com")
            assert client.rcpt("one@example.com")[0] == 250
            assert client.rcpt("two@example.com")[0] == 452  # the new limit applies


def test_a_second_daemon_on_the_same_spool_refuses_to_start(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with running_relay(config) as first:
        pid_file = tmp_path / "spool" / "relayd.pid"
        assert pid_file.read_text().strip() == str(first.process.pid)
        document = deep_merge(base_config(tmp_path), {})  # same spool, other ports
        second_config = tmp_path / "second.yaml"
        second_config.write_text(yaml.safe_dump(document))
        second = RelayProcess(second_config).start(wait=False)
        assert second.process.wait(20) == 2
        assert "already using this spool" in second.output()
        assert f"pid {first.process.pid}" in second.output()
        assert pid_file.read_text().strip() == str(first.process.pid)
        status = json.loads((tmp_path / "spool" / "status.json").read_text())
        assert status["pid"] == first.process.pid  # the first one's, left alone
        assert first.stop() == 0
    assert not pid_file.exists()  # removed at a clean stop


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, {"listen": {"port": port}})
        relay = RelayProcess(config).start(wait=False)
        assert relay.process.wait(20) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in relay.output()
    assert "Traceback" not in relay.output()

"""`relayd queue` at postsuper/postcat/qshape level, against a running `relayd serve`
whose upstream cannot be used (nobody signed in): mail stays queued, and the commands
say why. Selections (--all, --state, --sender, --recipient, --older-than), ids on
standard input, `show --body`, `shape`."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.queue.model import DeliveryState, Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.helpers import (
    RelayProcess,
    make_message,
    run_relayd,
    running_relay,
    transact,
    unreachable_upstream,
    write_config,
)


def queue(config: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_relayd("queue", *args, "-c", str(config), **kwargs)


def states(config: Path) -> dict[str, str]:
    result = queue(config, "list", "--json")
    assert result.returncode == 0, result.stderr
    return {item["id"]: item["state"] for item in json.loads(result.stdout)}


def send(relay: RelayProcess, sender: str, recipients: tuple[str, ...], subject: str) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        content = make_message(subject, sender=sender, recipients=recipients)
        return transact(client, content, sender=sender, recipients=recipients)


def plant_old(spool: Spool, hours: float, recipient: str = "old@fabrikam.example") -> str:
    """A message that arrived ``hours`` ago (its id says so), straight into the spool."""
    arrived = time.time() - hours * 3600
    queue_id = new_queue_id(arrived)
    envelope = Envelope("app@example.com", (recipient,), received_at=arrived)
    asyncio.run(spool.commit(queue_id, envelope, make_message("old", recipients=(recipient,))))
    return queue_id


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[RelayProcess, Path, Spool]]:
    config = write_config(tmp_path, unreachable_upstream(tmp_path))
    with running_relay(config) as relay:
        relay.wait_for_log("deliveries paused", reason="auth")
        yield relay, config, Spool(tmp_path / "spool")


def test_list_and_show_say_why_nothing_moves(daemon) -> None:
    relay, config, _ = daemon
    queue_id = send(relay, "app@example.com", ("user@contoso.example",), "waiting")
    listed = queue(config, "list")
    assert listed.returncode == 0
    note = listed.stdout.splitlines()[-1]
    assert note.startswith("-- deliveries are paused (auth) since ")
    assert f"run relayd auth login -c {config}" in note  # the command to run
    shown = queue(config, "show", queue_id).stdout
    assert "Deliveries:  deliveries are paused (auth) since" in shown
    assert f"relayd auth login -c {config}" in shown
    as_json = json.loads(queue(config, "list", "--json").stdout)  # stays the machine form
    assert [item["id"] for item in as_json] == [queue_id]

    assert relay.stop() == 0
    stopped = queue(config, "list").stdout.splitlines()[-1]
    assert stopped.startswith("-- relayd is not running: nothing is delivered until it starts")


def test_hold_release_retry_delete_all(daemon) -> None:
    relay, config, spool = daemon
    ids = [send(relay, "app@example.com", ("user@contoso.example",), f"m{n}") for n in range(3)]
    held = queue(config, "hold", "--all")
    assert held.returncode == 0, held.stderr
    assert "3 message(s) on hold (was in incoming/)" in held.stdout
    assert set(states(config).values()) == {"hold"}

    released = queue(config, "release", "--all")
    assert "3 message(s) released to incoming/, due now" in released.stdout
    assert set(states(config).values()) == {"incoming"}

    failed_id = ids[0]
    spool.fail(spool.claim(failed_id), DeliveryState(attempts=1, last_error="550 5.1.1"))
    assert queue(config, "retry", "--all").stdout.startswith("no message matches")
    retried = queue(config, "retry", "--all", "--include-failed")
    assert retried.returncode == 0, retried.stderr
    assert "1 message(s) moved from failed/ to deferred/" in retried.stdout
    assert states(config)[failed_id] == "deferred"

    assert queue(config, "delete", "--all").returncode == 2  # no terminal, no --yes
    deleted = queue(config, "delete", "--all", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert states(config) == {}


def test_filters_select_by_state_sender_recipient_and_age(daemon) -> None:
    relay, config, spool = daemon
    billing = send(relay, "billing@erp.example", ("a@contoso.example",), "invoice")
    alerts = send(relay, "alerts@erp.example", ("b@mail.fabrikam.example",), "alert")
    old = plant_old(spool, hours=3)

    def matching(*selection: str) -> set[str]:
        result = queue(config, "list", "--json", *selection)
        assert result.returncode == 0, result.stderr
        return {item["id"] for item in json.loads(result.stdout)}

    assert matching("--sender", "BILLING@erp.example") == {billing}
    assert matching("--sender", "@erp.example") == {billing, alerts}
    assert matching("--recipient", "@fabrikam.example") == {alerts, old}  # subdomains too
    assert matching("--recipient", "a@contoso.example") == {billing}
    assert matching("--older-than", "2h") == {old}
    assert matching("--older-than", "4h") == set()
    assert matching("--recipient", "@fabrikam.example", "--older-than", "1h") == {old}

    held = queue(config, "hold", "--recipient", "@fabrikam.example")
    assert "2 message(s) on hold (was in incoming/)" in held.stdout
    assert matching("--state", "hold") == {alerts, old}
    assert matching("--state", "incoming,hold") == {billing, alerts, old}
    bad = queue(config, "list", "--state", "parked")
    assert bad.returncode == 2 and "expected one of incoming" in bad.stderr

    deleted = queue(config, "delete", "--state", "hold", "--older-than", "1h", "--yes")
    assert "1 message(s) deleted (was in hold/)" in deleted.stdout
    assert matching() == {billing, alerts}


def test_ids_on_standard_input(daemon) -> None:
    relay, config, _ = daemon
    ids = [send(relay, "app@example.com", ("user@contoso.example",), f"m{n}") for n in range(3)]
    listed = queue(config, "list").stdout
    # As `postqueue -p | … | postsuper -d -`: the first word of each line is the id.
    lines = "\n".join(line for line in listed.splitlines() if line.startswith(tuple(ids[:2])))
    held = queue(config, "hold", "-", input=lines + "\n\n")
    assert held.returncode == 0, held.stderr
    assert [line.split(":")[0] for line in held.stdout.splitlines()[:2]] == ids[:2]
    assert states(config) == {ids[0]: "hold", ids[1]: "hold", ids[2]: "incoming"}

    refused = queue(config, "delete", "-", input=f"{ids[2]}\n")  # no terminal to ask on
    assert refused.returncode == 2 and "--yes" in refused.stderr
    deleted = queue(config, "delete", "-", "--yes", input=f"{ids[2]}\n")
    assert deleted.returncode == 0 and f"{ids[2]}: deleted (was in incoming/)" in deleted.stdout

    neither = queue(config, "hold")
    assert neither.returncode == 2 and "give message IDs" in neither.stderr
    both = queue(config, "hold", ids[0], "--all")
    assert both.returncode == 2


def test_show_body_prints_the_stored_message(daemon) -> None:
    relay, config, spool = daemon
    queue_id = send(relay, "app@example.com", ("user@contoso.example",), "with a body")
    shown = queue(config, "show", queue_id, "--body")
    assert shown.returncode == 0, shown.stderr
    _, message = spool.find(queue_id)
    stored = message.read_content().decode().replace("\r\n", "\n")
    assert shown.stdout.endswith(stored)  # header and body, as postcat -q
    assert "The quick brown fox" in shown.stdout
    assert "The quick brown fox" not in queue(config, "show", queue_id).stdout


def test_shape_counts_recipients_by_domain_and_age(daemon) -> None:
    relay, config, spool = daemon
    send(relay, "app@example.com", ("a@contoso.example", "b@contoso.example"), "two")
    send(relay, "app@example.com", ("c@fabrikam.example",), "one")
    plant_old(spool, hours=30, recipient="d@fabrikam.example")
    result = queue(config, "shape")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    header = result.stdout.splitlines()[0].split()
    assert header == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert rows["TOTAL"] == ["4", "3", "0", "0", "0", "0", "0", "0", "0", "0", "1"]
    assert rows["contoso.example"][:2] == ["2", "2"]
    assert rows["fabrikam.example"][0] == "2" and rows["fabrikam.example"][-1] == "1"
    senders = queue(config, "shape", "--senders").stdout.splitlines()
    assert senders[2].split()[:2] == ["example.com", "3"]

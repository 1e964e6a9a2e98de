"""The pieces of `relayd queue`'s selections, shape and pause notes, without a daemon."""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

import pytest

from relayd.ops.daemon_status import write_status
from relayd.ops.pidfile import PID_FILE_NAME, PidFile
from relayd.queue import shape, why
from relayd.queue.model import Envelope, QueueEntry, new_queue_id
from relayd.queue.select import Filters, address_matches, expand_ids
from tests.helpers import load_settings


@pytest.mark.parametrize(
    ("pattern", "address", "matches"),
    [
        ("app@example.com", "APP@Example.com", True),
        ("<app@example.com>", "app@example.com", True),
        ("app@example.com", "app@example.org", False),
        ("@example.com", "a@example.com", True),
        ("@example.com", "a@mail.example.com", True),
        ("@example.com", "a@badexample.com", False),
        ("<>", "", True),
        ("<>", "a@example.com", False),
        ("@example.com", "", False),
    ],
)
def test_address_patterns(pattern: str, address: str, matches: bool) -> None:
    assert address_matches(pattern, address) is matches


def test_filters_combine() -> None:
    now = time.time()
    entry = QueueEntry(new_queue_id(now - 7200), "deferred", 100, now - 7200)
    envelope = Envelope("app@erp.example", ("a@contoso.example", "b@fabrikam.example"))
    assert Filters().matches(entry, envelope, now)
    assert Filters(states=("deferred",), recipient="@fabrikam.example").matches(
        entry, envelope, now
    )
    assert not Filters(states=("hold",)).matches(entry, envelope, now)
    assert Filters(older_than=3600).matches(entry, envelope, now)
    assert not Filters(older_than=3 * 3600).matches(entry, envelope, now)
    assert not Filters(sender="@contoso.example").matches(entry, envelope, now)
    assert not Filters(sender="@erp.example").matches(entry, None, now)  # unreadable
    assert not Filters().given and Filters(older_than=1).given


def test_ids_from_standard_input_take_the_first_word() -> None:
    stdin = io.StringIO("AAA\n\nBBB  incoming  3h\n")
    assert expand_ids(["X", "-", "Y"], stdin) == ["X", "AAA", "BBB", "Y"]


def test_a_queue_listing_can_be_piped_in_as_it_is() -> None:
    listing = (
        "Queue ID             State       Age    Size  Tries  Sender\n"
        "6616AF44077121D9442  deferred     3h    2.1K      4  <app@example.com> -> 2 recipients\n"
        "                     last error: 451 4.7.0 Temporary server error\n"
        "6616AF44077121D9443  deferred     3h    2.1K      4  <app@example.com> -> 1 recipient\n"
        "-- 2 message(s), 4.2K: 2 deferred\n"
        "-- deliveries are paused (auth) since 4m ago: …\n"
    )
    assert expand_ids(["-"], io.StringIO(listing)) == ["6616AF44077121D9442", "6616AF44077121D9443"]


def test_shape_buckets_are_qshapes() -> None:
    assert [shape.bucket(minutes * 60) for minutes in (0, 5, 5.1, 10, 1280, 1281)] == [
        0,
        0,
        1,
        1,
        8,
        9,
    ]
    now = time.time()
    entry = QueueEntry(new_queue_id(now - 600), "incoming", 1, now - 600)
    table = shape.shape(
        [
            (
                entry,
                Envelope("s@x.example", ("a@b.example", "c@B.example")),
                ("a@b.example", "c@B.example"),
            )
        ],
        now,
    )
    assert table == {"b.example": [0, 2, 0, 0, 0, 0, 0, 0, 0, 0]}
    lines = shape.render(table)
    assert lines[1].split() == ["TOTAL", "2", "0", "2", "0", "0", "0", "0", "0", "0", "0", "0"]
    assert shape.render({})[1].split()[1] == "0"  # an empty queue is a row of zeros


def status(reason: str, detail: str = "", advice: str | None = None) -> dict:
    return {"deliveries": "paused", "reason": reason, "detail": detail, "advice": advice}


@pytest.mark.parametrize(
    ("reason", "detail", "words"),
    [
        (
            "throttled",
            "the upstream is paused",
            "resume by themselves after upstream.throttle_pause",
        ),
        ("connection", "connection refused", "relayd send-test --direct -c test.yaml"),
        ("timeout", "", "relayd retries by itself"),
        (
            "daily_limit",
            "daily recipient limit reached (10000 recipients in 24 h)",
            "24-hour window",
        ),
        ("account", "554 5.2.2 mailbox full", "relayd queue retry --all -c test.yaml"),
    ],
)
def test_every_pause_is_explained_with_what_to_do(
    tmp_path: Path, reason: str, detail: str, words: str
) -> None:
    settings = load_settings(tmp_path)
    settings = dataclasses.replace(settings, source="test.yaml")
    text = why.explain(status(reason, detail), settings, None)
    assert words in text
    if detail:
        assert detail in text or reason == "throttled"


def test_an_auth_pause_reads_the_token_modules_state(tmp_path: Path) -> None:
    settings = load_settings(tmp_path)
    advice = "nobody has signed in as relay@contoso.example: run relayd auth login -c x.yaml"
    assert why.explain(status("auth", advice=advice), settings, None) == advice
    fresher = {
        "state": "reauth_required",
        "advice": "AADSTS50173 … Sign in again: relayd auth login",
    }
    assert why.explain(status("auth", advice=advice), settings, fresher) == fresher["advice"]
    rejected = why.explain(status("auth"), settings, {"state": "rejected"})
    assert "535 5.7.3" in rejected and "relayd auth login" in rejected


def test_the_note_needs_a_live_daemon_and_its_own_status(tmp_path: Path) -> None:
    settings = load_settings(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    assert why.deliveries_note(settings, spool).startswith("relayd is not running")
    pid_file = PidFile(spool / PID_FILE_NAME)
    pid_file.acquire()  # this test process plays the daemon…
    try:
        write_status(
            spool, {**status("daily_limit", "spent"), "pid": os.getpid(), "since": time.time()}
        )
        # …but its command line is not `relayd serve`: never believed.
        assert why.deliveries_note(settings, spool).startswith("relayd is not running")
    finally:
        pid_file.release()

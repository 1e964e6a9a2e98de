"""Under systemd, stderr is the journal: each line starts with its sd-daemon(3) priority
("<4>" for a warning), so that `journalctl -p warning` filters by level. Only then."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from relayd.ops import logging as relay_logging


@pytest.fixture
def stream(tmp_path: Path) -> Iterator:
    with open(tmp_path / "stderr", "w") as handle:
        yield handle
    relay_logging.configure("json", "info")  # leave the pipeline as other tests expect


def journal_of(handle) -> str:
    status = os.fstat(handle.fileno())
    return f"{status.st_dev}:{status.st_ino}"


def lines_logged(handle, fmt: str = "json") -> list[str]:
    relay_logging.configure(fmt, "debug", stream=handle)
    log = structlog.get_logger("relayd.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("msal").warning("a library's warning")
    logging.getLogger("relayd.other").critical("c")
    handle.flush()
    return Path(handle.name).read_text().splitlines()


def test_every_line_carries_its_priority_when_stderr_is_the_journal(stream, monkeypatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_of(stream))
    lines = lines_logged(stream)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<4>", "<2>"]
    assert all(line[3] == "{" for line in lines)  # the rest is the JSON line, unchanged


def test_console_format_and_multi_line_records_are_prefixed_line_by_line(
    stream, monkeypatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_of(stream))
    relay_logging.configure("console", "info", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("relayd.other").exception("failed")
    stream.flush()
    lines = Path(stream.name).read_text().splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)


def test_no_prefix_when_stderr_is_not_the_journal(stream, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "other"
    other.write_text("")
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.stat().st_dev}:{other.stat().st_ino}")
    assert all(line.startswith("{") for line in lines_logged(stream))
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert relay_logging.priority_prefix("error", stream) == ""
    monkeypatch.delenv("JOURNAL_STREAM")
    assert relay_logging.priority_prefix("error", stream) == ""

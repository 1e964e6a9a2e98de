"""The pid file lock: one daemon per spool; never signal what is not relayd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relayd.ops.pidfile import AlreadyRunning, PidFile, running_daemon


def test_a_second_holder_is_refused_and_release_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "relayd.pid"
    first = PidFile(path)
    first.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
        PidFile(path).acquire()
    first.release()
    assert not path.exists()
    second = PidFile(path)
    second.acquire()  # free again
    second.release()


def test_release_without_acquire_leaves_another_daemons_file(tmp_path: Path) -> None:
    path = tmp_path / "relayd.pid"
    path.write_text("12345\n")
    PidFile(path).release()
    assert path.exists()


def test_running_daemon_needs_the_lock_and_a_relayd_serve_process(tmp_path: Path) -> None:
    path = tmp_path / "relayd.pid"
    assert running_daemon(path) is None  # no file
    path.write_text(f"{os.getpid()}\n")
    assert running_daemon(path) is None  # nobody holds the lock: stale
    holder = PidFile(path)
    holder.acquire()
    try:
        assert running_daemon(path) is None  # locked, but pytest is not `relayd serve`
    finally:
        holder.release()

"""The Maildir transport: one durable file per message in new/."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from relayd.transports.base import LOCAL, Submission
from relayd.transports.maildir import MaildirTransport
from tests.helpers import load_settings
from tests.small_disk import SmallDisk


def transport(tmp_path: Path) -> MaildirTransport:
    return MaildirTransport(load_settings(tmp_path))


async def test_message_lands_in_new_with_its_envelope(tmp_path: Path) -> None:
    maildir = transport(tmp_path)
    content = b"From: a@b.c\r\nSubject: x\r\n\r\nbody\r\n"
    submission = Submission("0123456789ABCDEF012", "a@b.c", ("x@y.org", "z@y.org"), content)
    attempt = await maildir.deliver(submission)
    assert attempt.delivered == ("x@y.org", "z@y.org") and attempt.reply.startswith("250 ")
    files = list((tmp_path / "maildir" / "new").iterdir())
    assert len(files) == 1 and "0123456789ABCDEF012" in files[0].name
    assert files[0].read_bytes() == (
        b"Return-Path: <a@b.c>\r\nEnvelope-To: <x@y.org>,\r\n\t<z@y.org>\r\n" + content
    )
    assert not list((tmp_path / "maildir" / "tmp").iterdir())
    assert (tmp_path / "maildir" / "cur").is_dir()


async def test_same_message_twice_gives_two_files(tmp_path: Path) -> None:
    maildir = transport(tmp_path)
    submission = Submission("0123456789ABCDEF012", "", ("x@y.org",), b"\r\nbody\r\n")
    await maildir.deliver(submission)
    await maildir.deliver(submission)
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 2


async def test_unwritable_maildir_defers(tmp_path: Path) -> None:
    (tmp_path / "maildir").write_text("a file where the directory should be")
    attempt = await transport(tmp_path).deliver(
        Submission("0123456789ABCDEF012", "", ("x@y.org",), b"\r\nbody\r\n")
    )
    assert attempt.deferred == ("x@y.org",) and attempt.reason == LOCAL
    assert attempt.reply.startswith("451 4.3.0")
    assert os.path.isfile(tmp_path / "maildir")


async def test_a_short_write_is_never_reported_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills part-way through the message: the spool must keep its copy (451),
    and nothing half-written may sit in new/ as if it were the message."""
    maildir = transport(tmp_path)
    submission = Submission("0123456789ABCDEF012", "a@b.c", ("x@y.org",), b"\r\n" + b"x" * 4000)
    SmallDisk(monkeypatch, tmp_path / "maildir", room=1000, error=errno.ENOSPC)
    attempt = await maildir.deliver(submission)
    assert attempt.delivered == () and attempt.deferred == ("x@y.org",)
    assert attempt.reply.startswith("451 4.3.0")
    assert list((tmp_path / "maildir" / "new").iterdir()) == []
    assert list((tmp_path / "maildir" / "tmp").iterdir()) == []

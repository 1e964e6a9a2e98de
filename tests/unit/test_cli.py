"""The command line: every sub-command describes itself, and the man page and the bash
completion generated from the parser are up to date and work."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.cli import build_parser
from tests.helpers import REPO

GENERATED = ("man/man1/relayd.1", "bash-completion/completions/relayd")


def every_parser(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from every_parser(child, (*path, name))


COMMANDS = [path for path, _ in every_parser(build_parser())]


def test_the_parser_tree_has_every_command() -> None:
    assert ("queue", "shape") in COMMANDS and ("auth", "status") in COMMANDS
    assert len(COMMANDS) == 19  # relayd; its 5 commands; 5 auth and 8 queue actions


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "relayd")
def test_every_help_has_a_description_line(path: tuple[str, ...]) -> None:
    parsers = dict(every_parser(build_parser()))
    assert parsers[path].description, f"relayd {' '.join(path)} has no description"
    shown = parsers[path].format_help().split("\n\n")
    assert shown[0].startswith("usage: relayd")
    assert shown[1].strip() and shown[1].strip()[0].isupper()  # the description, a sentence


def test_generated_man_page_and_completion_are_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO / "share" / "generate"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        fresh, shipped = (tmp_path / name).read_text(), (REPO / "share" / name).read_text()
        assert fresh == shipped, f"share/{name} is out of date: run share/generate"
    page = (REPO / "share" / GENERATED[0]).read_text()
    assert ".SH COMMAND \\fI\\,'relayd queue shape'\\/\\fR" in page


ROFF_REQUESTS = {".TH", ".SH", ".SS", ".TP", ".B", ".I", ".BR", ".IR", ".PP", ".RS", ".RE", ".IP"}


def test_no_help_text_turns_into_a_roff_request() -> None:
    """A wrapped help line that starts with "." or "'" is a troff request (man prints
    "a special character is not allowed in a name" and drops the line)."""
    page = (REPO / "share" / GENERATED[0]).read_text().splitlines()
    for number, line in enumerate(page, 1):
        if line.startswith((".", "'")):
            assert line.split()[0] in ROFF_REQUESTS or line.startswith('.\\"'), (number, line)


def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    """What the shipped script asks: relayd itself, with argcomplete's variables."""

    def complete(line: str) -> list[str]:
        answer = tmp_path / "answer"
        environment = {
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_SHELL": "bash",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "COMP_TYPE": "9",
            "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),
            "PYTHONPATH": str(REPO),
        }
        subprocess.run(
            [sys.executable, "-m", "relayd"], env=environment, timeout=60, check=True, cwd=REPO
        )
        return sorted(word.strip() for word in answer.read_text().split("\v"))

    assert complete("relayd queue h") == ["hold"]
    assert {"list", "show", "shape", "retry", "release", "delete"} <= set(complete("relayd queue "))
    assert "--older-than" in complete("relayd queue hold --o")
    shipped = (REPO / "share" / GENERATED[1]).read_text()
    assert "complete " in shipped and "relayd" in shipped

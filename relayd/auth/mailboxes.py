"""`relayd auth ... --mailbox ADDRESS`: the sign-in of one route's mailbox, and
`relayd auth status` over every mailbox of a relay with routes.

Each mailbox has its own token cache (``routes[N].token_cache``), so each command
works on one mailbox's: ``--mailbox`` names a route's, none the default's
(``upstream.mailbox``, today's behaviour). The sign-in sends the mailbox as MSAL's
``login_hint`` and keeps only a sign-in as that very mailbox (``TokenClient``
refuses any other: nothing is saved).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from relayd import config
from relayd.auth.signin import AuthCommands
from relayd.config import Settings
from relayd.ops.logging import redactor


class UnknownMailbox(Exception):
    """--mailbox names no mailbox of the configuration; the text lists the known."""


def run(
    settings: Settings,
    config_path: Path,
    mailbox: str | None,
    action: Callable[[AuthCommands, Any], int],
    args: Any,
    every: bool = False,
) -> int:
    """One `relayd auth` command for ``mailbox`` (None: the default's); ``every`` (status
    without --mailbox) with routes: every mailbox's status."""
    if every and settings.routes:
        return status_all(settings, config_path, args.json)
    try:
        commands = commands_for(settings, config_path, mailbox)
    except UnknownMailbox as error:
        print(f"relayd auth: {error}", file=sys.stderr)
        return 2
    return action(commands, args)


def commands_for(
    settings: Settings, config_path: Path, mailbox: str | None, **streams: TextIO
) -> AuthCommands:
    """The auth commands of ``mailbox``'s route (None: the default mailbox)."""
    if mailbox is None or mailbox.strip().lower() == settings.upstream.mailbox.strip().lower():
        return AuthCommands(settings, config_path, **streams)  # type: ignore[arg-type]
    chosen = config.settings_for_mailbox(settings, mailbox)
    if chosen is None:
        known = ", ".join(config.mailbox_settings(settings))
        raise UnknownMailbox(
            f"no route has the mailbox {mailbox} in {config_path}; the mailboxes: {known}"
        )
    index = next(i for i, r in enumerate(settings.routes) if r.key == mailbox.strip().lower())
    return AuthCommands(
        chosen,
        config_path,
        mailbox_setting=f"routes[{index}].mailbox",
        **streams,  # type: ignore[arg-type]
    )


def every_mailbox(settings: Settings, config_path: Path, **streams: TextIO) -> list[AuthCommands]:
    """The default mailbox's commands first, then each route's in order."""
    routes = [
        commands_for(settings, config_path, route.mailbox, **streams) for route in settings.routes
    ]
    return [commands_for(settings, config_path, None, **streams), *routes]


def status_all(
    settings: Settings, config_path: Path, as_json: bool, stdout: TextIO | None = None
) -> int:
    """`relayd auth status` with routes: every mailbox; exit 1 when any is unusable.

    JSON: the default mailbox's report at the top (as with one mailbox), and every
    mailbox's under ``mailboxes`` (by mailbox, lower case), ``all_healthy`` for all."""
    out = stdout or sys.stdout
    commands = every_mailbox(settings, config_path, stdout=out)
    reports = {c.mailbox.strip().lower(): c.status_report() for c in commands}
    healthy = all(report["healthy"] for report in reports.values())
    if as_json:
        document: dict[str, Any] = {
            **reports[commands[0].mailbox.strip().lower()],
            "mailboxes": reports,
            "all_healthy": healthy,
        }
        print(redactor(json.dumps(document, indent=2, sort_keys=True)), file=out, flush=True)
        return 0 if healthy else 1
    for number, command in enumerate(commands):
        if number:
            print(file=out)
        role = "default route (upstream.mailbox)" if number == 0 else command.mailbox_setting
        print(f"{'Mailbox:':<15} {command.mailbox} [{role}]", file=out, flush=True)
        command.print_status(reports[command.mailbox.strip().lower()])
    return 0 if healthy else 1

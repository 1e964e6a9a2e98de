# PYTHON_ARGCOMPLETE_OK
"""Command line: argument parsing and dispatch only; the work lives in the modules.

The man page (share/man/man1/relayd.1) and the bash completion
(share/bash-completion/completions/relayd) are generated from build_parser() by
share/generate; a test checks that they are up to date."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from relayd import __version__, config, preflight
from relayd.ops import logging as relay_logging
from relayd.units import parse_duration

DEFAULT_CONFIG = Path("/etc/relayd/relayd.yaml")
EXIT_CANNOT_START = 2  # as for a bad configuration: the operator must change something


def _add_config_option(parser: argparse.ArgumentParser, *, sandbox: bool = False) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    if sandbox:
        parser.add_argument(
            "--sandbox",
            action="store_true",
            help="the sandbox's settings: no Microsoft account, spool and Maildir in "
            f"{config.SANDBOX_DIR}/ under the current directory (or ${config.SANDBOX_DIR_ENV}); "
            "with -c, that file's settings apply, but the transport stays maildir",
        )


def _subcommand(
    commands: argparse._SubParsersAction, name: str, help_text: str, description: str = ""
) -> argparse.ArgumentParser:
    """A sub-command whose --help starts with a description line (the help text, as a
    sentence, unless a longer description is given)."""
    description = description or f"{help_text[0].upper()}{help_text[1:]}."
    return commands.add_parser(name, help=help_text, description=description)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Local SMTP relay that queues durably and forwards to Microsoft 365 "
        "with OAuth 2.0.",
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = _subcommand(
        commands,
        "serve",
        "run the relay in the foreground",
        "Run the relay in the foreground: listen for mail, queue it durably, deliver it. "
        "SIGTERM stops it gracefully, SIGHUP reloads the configuration. A failure to "
        "start is one line naming the setting, exit status 2.",
    )
    _add_config_option(serve, sandbox=True)
    serve.set_defaults(handler=_serve)

    check = _subcommand(
        commands,
        "check-config",
        "validate the configuration and print the effective settings",
        "Validate the configuration, check what it points to (spool, token cache, "
        "secret file) and print the effective settings, secrets redacted. Warnings and "
        "errors go to standard error; exit status 2 on an error.",
    )
    _add_config_option(check, sandbox=True)
    check.add_argument(
        "--schema",
        action="store_true",
        help="print a JSON Schema of relayd.yaml (for editors) instead; reads no file",
    )
    check.set_defaults(handler=_check_config)

    _add_auth_commands(commands)
    _add_queue_commands(commands)
    _add_send_test_command(commands)
    return parser


def _add_auth_commands(commands: argparse._SubParsersAction) -> None:
    """`relayd auth login|import|status|refresh|logout` (tokens)."""
    auth = _subcommand(
        commands,
        "auth",
        "sign in to Microsoft 365 and manage the tokens",
        "Sign in once as upstream.mailbox, then inspect, renew or remove the tokens "
        "relayd keeps in oauth.token_cache; with --mailbox, the same for a route's mailbox "
        "and its token cache. Safe while relayd runs.",
    )
    actions = auth.add_subparsers(dest="action", metavar="ACTION", required=True)
    login = _subcommand(
        actions,
        "login",
        "sign in as upstream.mailbox or --mailbox (browser on any machine, or --device-code)",
    )
    login.add_argument(
        "--device-code",
        action="store_true",
        help="show a code to enter at the Microsoft device login page (public client)",
    )
    login.set_defaults(auth_action=lambda commands, args: commands.login(args.device_code))
    migrate = _subcommand(
        actions, "import", "redeem a refresh token read from standard input (migration)"
    )
    migrate.set_defaults(auth_action=lambda commands, args: commands.import_token())
    status = _subcommand(
        actions, "status", "show the account, token expiry and health; exit 1 when unusable"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(auth_action=lambda commands, args: commands.status(args.json))
    refresh = _subcommand(actions, "refresh", "redeem the refresh token now")
    refresh.set_defaults(auth_action=lambda commands, args: commands.refresh())
    logout = _subcommand(actions, "logout", "remove the account and its tokens from the cache")
    logout.set_defaults(auth_action=lambda commands, args: commands.logout())
    for parser in (login, migrate, status, refresh, logout):
        _add_config_option(parser)
        parser.add_argument(
            "--mailbox",
            metavar="ADDRESS",
            help="a route's mailbox (routes: in the configuration); default: upstream.mailbox"
            + (" (without it, status shows every mailbox)" if parser is status else ""),
        )
        parser.set_defaults(handler=_auth)


def _auth(args: argparse.Namespace) -> int:
    from relayd.auth import mailboxes  # imported late: MSAL is slow to import

    settings = _settings(args)
    relay_logging.configure(settings.logging.format, settings.logging.level)
    every = args.action == "status" and args.mailbox is None
    return mailboxes.run(settings, args.config, args.mailbox, args.auth_action, args, every)


QUEUE_STATES = ("incoming", "active", "deferred", "hold", "failed")


def _add_queue_commands(commands: argparse._SubParsersAction) -> None:
    """`relayd queue list|show|shape|retry|hold|release|delete|purge-failed`."""
    queue = _subcommand(
        commands,
        "queue",
        "list and manage queued mail (safe while relayd runs)",
        "List and manage queued mail, like Postfix's postqueue, postsuper, postcat and "
        "qshape. Safe while relayd runs: a message being delivered (state active) cannot be "
        "held or deleted; the running daemon is told to rescan after every change.",
    )
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, run: Callable, description: str = ""):
        parser = _subcommand(actions, name, help_text, description)
        _add_config_option(parser, sandbox=True)
        parser.set_defaults(handler=_queue_handler(run))
        return parser

    listing = action(
        "list",
        "list queued messages",
        lambda q, a: q.list(as_json=a.json, filters=_filters(a)),
        "List queued messages: id, state, age, size, attempts, sender, recipients, last "
        "error; and why nothing moves while deliveries are paused.",
    )
    listing.add_argument("--json", action="store_true", help="a JSON array, one object each")
    _add_filters(listing)
    show = action(
        "show",
        "envelope, delivery state and headers of one message",
        lambda q, a: q.show(a.id, body=a.body),
    )
    show.add_argument("id", metavar="ID")
    show.add_argument(
        "--body", action="store_true", help="the whole stored message, as postcat -q shows it"
    )
    shape = action(
        "shape",
        "queued recipients by domain and age (as qshape)",
        lambda q, a: q.shape(filters=_filters(a), by_sender=a.senders),
        "Count the recipients still to be delivered by recipient domain and age bucket "
        "(minutes since arrival), as Postfix's qshape; incoming, active and deferred "
        "unless --state says otherwise.",
    )
    shape.add_argument(
        "--senders", action="store_true", help="by sender domain, counting messages (qshape -s)"
    )
    _add_filters(shape)
    retry = action(
        "retry",
        "make deferred messages due now; requeue failed ones",
        lambda q, a: q.retry(_target(a), include_failed=a.include_failed),
        "Make deferred messages due now. A failed message goes back to the queue with a "
        "fresh retry.max_age (as postsuper -r); recipients already delivered are not sent "
        "again, and a failure the sender was told about gets no second DSN.",
    )
    retry.add_argument(
        "--include-failed", action="store_true", help="with --all: failed messages too"
    )
    hold = action("hold", "keep messages from delivery", lambda q, a: q.hold(_target(a)))
    release = action("release", "put held messages back", lambda q, a: q.release(_target(a)))
    delete = action(
        "delete",
        "delete messages for good",
        lambda q, a: q.delete(_target(a), yes=a.yes),
        "Delete messages for good (as postsuper -d). Asks first; without a terminal "
        "(ids on standard input, a script) it needs --yes.",
    )
    delete.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")
    for parser in (retry, hold, release, delete):
        _add_targets(parser)
    purge = action(
        "purge-failed", "delete every failed message", lambda q, a: q.purge_failed(yes=a.yes)
    )
    purge.add_argument("--yes", action="store_true", help="do not ask (needed without a TTY)")


def _add_targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "queue_ids",
        metavar="ID",
        nargs="*",
        help="queue ids; - reads them from standard input, one a line (as postsuper -d -)",
    )
    parser.add_argument(
        "--all", action="store_true", help="every message this applies to (with filters: those)"
    )
    _add_filters(parser)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    filters = parser.add_argument_group("selection (all must match)")
    filters.add_argument(
        "--state",
        type=_states,
        metavar="STATE[,STATE]",
        help=f"in these states: {', '.join(QUEUE_STATES)}",
    )
    filters.add_argument(
        "--sender", metavar="ADDRESS", help="from this address; @domain for a domain, <> for DSNs"
    )
    filters.add_argument(
        "--recipient", metavar="ADDRESS", help="to this address (any recipient); @domain too"
    )
    filters.add_argument(
        "--older-than",
        type=_duration,
        metavar="DURATION",
        help="arrived longer ago than this (30m, 2h, 3d)",
    )
    filters.add_argument(
        "--mailbox",
        metavar="ADDRESS",
        help="leaving as this mailbox (routes: chosen by the sender; upstream.mailbox for"
        " the rest)",
    )


def _states(text: str) -> tuple[str, ...]:
    states = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [state for state in states if state not in QUEUE_STATES]
    if unknown or not states:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or repr(text)}: expected one of {', '.join(QUEUE_STATES)}"
        )
    return states


def _filters(args: argparse.Namespace):
    from relayd.queue.select import Filters  # imported late: keeps `relayd --help` fast

    return Filters(
        states=args.state or (),
        sender=args.sender,
        recipient=args.recipient,
        older_than=args.older_than,
        mailbox=args.mailbox,
    )


def _target(args: argparse.Namespace):
    from relayd.queue.admin import Target

    return Target(ids=args.queue_ids, filters=_filters(args), everything=args.all)


def _queue_handler(run: Callable) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from relayd.queue import admin as queueadmin  # imported late: keeps `relayd --help` fast

        if getattr(args, "include_failed", False) and not (args.all or args.state):
            print("relayd queue retry: --include-failed goes with --all", file=sys.stderr)
            return 2
        return queueadmin.run(_settings(args), lambda admin: run(admin, args))

    return handler


def _add_send_test_command(commands: argparse._SubParsersAction) -> None:
    """`relayd send-test` (operations)."""
    description = (
        "Send a short test message through the running relay and wait until it is "
        "delivered, deferred or failed; or, with --direct, straight to the upstream with "
        "the current token. Prints each step, and a hint for every known failure. "
        "Exit status 0 only when the message was delivered."
    )
    send_test = commands.add_parser(
        "send-test", help="send a test message and show each step", description=description
    )
    _add_config_option(send_test, sandbox=True)
    send_test.add_argument("--to", required=True, metavar="ADDRESS", help="the recipient")
    send_test.add_argument(
        "--from",
        dest="sender",
        metavar="ADDRESS",
        help="the sender (default: upstream.mailbox)",
    )
    send_test.add_argument(
        "--direct",
        action="store_true",
        help="straight to upstream.host as upstream.mailbox, not through the relay",
    )
    send_test.add_argument(
        "--wait",
        type=_duration,
        default=60.0,
        metavar="DURATION",
        help="how long to wait for the delivery through the relay (default: 60s)",
    )
    send_test.set_defaults(handler=_send_test)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _send_test(args: argparse.Namespace) -> int:
    from relayd.tools import sendtest  # imported late: keeps `relayd --help` fast

    settings = _settings(args)
    # Steps go to standard output; the log only says what the steps cannot.
    relay_logging.configure(settings.logging.format, "error")
    try:
        return sendtest.run(
            settings,
            args.config,
            direct=args.direct,
            to=args.to,
            sender=args.sender,
            wait=args.wait,
        )
    except config.ConfigError as error:  # found on the way, e.g. an unsafe token cache
        config.fail(error)
        raise  # unreachable: fail() exits


def _settings(args: argparse.Namespace) -> config.Settings:
    """The settings of a command with -c and --sandbox. Without --sandbox, ``args.config``
    is set to the file that was read (the default one when -c was not given)."""
    if getattr(args, "sandbox", False):
        try:
            return config.sandbox(args.config)
        except config.ConfigError as error:
            config.fail(error)
            raise  # unreachable: fail() exits
    given = args.config is not None
    args.config = args.config or DEFAULT_CONFIG
    if not given and not args.config.exists():
        sandbox = (
            ", or add --sandbox to use the sandbox's (relayd serve --sandbox)"
            if hasattr(args, "sandbox")
            else ""
        )
        print(
            f"relayd: no configuration at {args.config}: give one with -c FILE{sandbox}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return _load_settings(args.config)


def _load_settings(path: Path) -> config.Settings:
    try:
        return config.load(path)
    except config.ConfigError as error:
        config.fail(error)
        raise  # unreachable: fail() exits


def _serve(args: argparse.Namespace) -> int:
    from relayd.app import Relay, StartupError, run  # imported late: keeps --help fast

    settings = _settings(args)
    findings = preflight.check(settings, serving=True)
    if preflight.errors(findings):
        for finding in preflight.errors(findings):
            _cannot_start(finding.line(settings.source))
        return EXIT_CANNOT_START
    relay_logging.configure(settings.logging.format, settings.logging.level)
    for finding in findings:  # only warnings are left
        structlog.get_logger("relayd.app").warning(finding.line(settings.source))
    loader = config.sandbox if args.sandbox else config.load
    try:
        run(Relay(settings, config_path=args.config, loader=loader))
    except StartupError as error:
        _cannot_start(str(error))
        return EXIT_CANNOT_START
    except config.ConfigError as error:  # found at start-up, e.g. an unsafe token cache
        config.fail(error)
    return 0


def _cannot_start(text: str) -> None:
    """One line on stderr; under systemd, at priority err (sd-daemon(3) prefix)."""
    prefix = relay_logging.priority_prefix("error", sys.stderr)
    print(f"{prefix}relayd: cannot start: {text}", file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    if args.schema:
        from relayd.config.schema import print_schema

        return print_schema(config.SECTIONS)
    settings = _settings(args)
    findings = preflight.check(settings, serving=False)
    for finding in findings:
        print(f"relayd: {finding.severity}: {finding.line(settings.source)}", file=sys.stderr)
    if preflight.errors(findings):
        return EXIT_CANNOT_START
    print(f"# {settings.source}: configuration is valid. Effective settings (secrets redacted):")
    print(config.dump(settings), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # bash completion is asking (argcomplete): answer, exit
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1

"""Command line: argument parsing and dispatch only; the work lives in the modules."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from relayd import __version__, config
from relayd import logging as relay_logging

DEFAULT_CONFIG = Path("/etc/relayd/relayd.yaml")


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Local SMTP relay that queues durably and forwards to Microsoft 365 "
        "with OAuth 2.0.",
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the relay in the foreground")
    _add_config_option(serve)
    serve.set_defaults(handler=_serve)

    check = commands.add_parser(
        "check-config", help="validate the configuration and print the effective settings"
    )
    _add_config_option(check)
    check.set_defaults(handler=_check_config)

    _add_auth_commands(commands)
    _add_queue_commands(commands)
    _add_send_test_command(commands)
    return parser


def _add_auth_commands(commands: argparse._SubParsersAction) -> None:
    """`relayd auth login|import|status|refresh|logout` (tokens)."""


def _add_queue_commands(commands: argparse._SubParsersAction) -> None:
    """`relayd queue list|show|retry|hold|release|delete|purge-failed` (operations)."""


def _add_send_test_command(commands: argparse._SubParsersAction) -> None:
    """`relayd send-test` (operations)."""


def _load_settings(path: Path) -> config.Settings:
    try:
        return config.load(path)
    except config.ConfigError as error:
        config.fail(error)
        raise  # unreachable: fail() exits


def _serve(args: argparse.Namespace) -> int:
    from relayd.app import Relay  # imported late: keeps `relayd --help` fast

    settings = _load_settings(args.config)
    relay_logging.configure(settings.logging.format, settings.logging.level)
    asyncio.run(Relay(settings, config_path=args.config).run())
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = _load_settings(args.config)
    print(f"# {args.config}: configuration is valid. Effective settings (secrets redacted):")
    print(config.dump(settings), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1

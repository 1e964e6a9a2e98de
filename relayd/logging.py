"""structlog configuration: one pipeline for relayd's own lines and the libraries'.

Every line, whatever logger wrote it (relayd, aiosmtpd, aiosmtplib, msal, urllib3,
warnings), passes through the same processors and is scrubbed twice on the way out:

1. ``redact_event`` walks the event dictionary before rendering: values under a
   sensitive key (``refresh_token=...``) are replaced whole, and every string value
   is scrubbed, so a secret is found even when JSON rendering would later escape it.
2. ``Redactor`` scrubs the rendered line, which catches what the renderer built
   itself (reprs of bytes, exception tracebacks).

A secret cannot reach the output by a path that forgets to scrub it, because there
is no other path: the root logger has exactly one handler, and it ends in the scrub.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "<redacted>"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Chatty libraries: their INFO lines (every SMTP command, every HTTP call) are noise
# for an operator; they are shown at debug level only. aiosmtpd logs as "mail.log".
LIBRARY_LOGGERS = ("mail.log", "aiosmtpd", "aiosmtplib", "msal", "urllib3", "asyncio")

# OAuth fields whose values are secrets, in forms, URLs, JSON and reprs.
_OAUTH_FIELDS = (
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
    "client_assertion",
    "assertion",
    "password",
)
# Event fields whose values are replaced whole, whatever they look like.
SENSITIVE_KEYS = frozenset({*_OAUTH_FIELDS, "authorization", "xoauth2", "token"})
_KEY_VALUE_FIELDS = "|".join(_OAUTH_FIELDS)
_B64URL = r"[A-Za-z0-9_-]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # JSON Web Tokens (access and ID tokens): header.payload[.signature].
    (re.compile(rf"eyJ{_B64URL}{{8,}}\.{_B64URL}{{8,}}(?:\.{_B64URL}*)?"), REDACTED),
    # Microsoft's opaque refresh tokens: "0.AXoA…" / "1.AR8A…", hundreds of characters.
    (re.compile(rf"\b[01]\.A{_B64URL}{{3}}[A-Za-z0-9_.-]{{60,}}"), REDACTED),
    # base64("user=…\x01auth=Bearer …\x01\x01"): the XOAUTH2 initial response.
    (re.compile(r"dXNlcj[0-9A-Za-z+/]{8,}={0,2}"), REDACTED),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"), rf"\1{REDACTED}"),
    # key=value (forms, URLs) and "key": "value" (JSON, reprs) forms of OAuth fields.
    (
        re.compile(rf"(?i)(\b(?:{_KEY_VALUE_FIELDS})\b[\"']?\s*[:=]\s*[\"']?)[^\"'&\s,;}}]+"),
        rf"\1{REDACTED}",
    ),
    # Authorization codes: only in a query/form ("?code=…", "&code=…") or when long, so
    # that ordinary fields named "code" (SMTP reply codes like 4.3.2) stay readable.
    (re.compile(r"([?&]code=)[^&\s\"']+"), rf"\1{REDACTED}"),
    (re.compile(r"(\bcode[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._~+/-]{32,}"), rf"\1{REDACTED}"),
)
_MAX_ROTATING_SECRETS = 256


class Redactor:
    """Removes token-like strings and every registered secret from text.

    Secrets registered ``permanent=True`` (the client secret) are kept for the life of
    the process; others (access and refresh tokens, which rotate) are kept in a bounded
    most-recently-registered set, so a long-running daemon does not grow without limit.
    """

    def __init__(self) -> None:
        self._permanent: set[str] = set()
        self._rotating: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def register(self, secret: str | None, *, permanent: bool = False) -> None:
        """Never print this string (nor its URL-encoded form) again."""
        if not secret or len(secret) < 6:
            return
        forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
        with self._lock:
            for form in forms:
                if permanent:
                    self._permanent.add(form)
                    self._rotating.pop(form, None)
                elif form not in self._permanent:
                    self._rotating[form] = None
                    self._rotating.move_to_end(form)
            while len(self._rotating) > _MAX_ROTATING_SECRETS:
                self._rotating.popitem(last=False)

    def __call__(self, text: str) -> str:
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        with self._lock:
            secrets = (*self._permanent, *self._rotating)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


redactor = Redactor()


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redactor(value)
    if isinstance(value, dict):
        return {
            key: REDACTED if _is_sensitive(key) and value[key] else _scrub(value[key])
            for key in value
        }
    if type(value) in (list, tuple, set, frozenset):  # exact types: not namedtuples
        return type(value)(_scrub(item) for item in value)
    return value


def _is_sensitive(key: object) -> bool:
    return isinstance(key, str) and key.lower() in SENSITIVE_KEYS


def redact_event(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: scrub every field before it is rendered (and escaped)."""
    return _scrub(dict(event_dict))


_LEADING_FIELDS = ("ts", "level", "logger", "event")


def lead_with_essentials(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: time, level, logger and event first, so a line reads well."""
    ordered = {key: event_dict[key] for key in _LEADING_FIELDS if key in event_dict}
    ordered.update((key, value) for key, value in event_dict.items() if key not in ordered)
    return ordered


def _redacting(renderer: Callable[..., Any]) -> Callable[..., Any]:
    def render(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        return redactor(str(renderer(logger, name, event_dict)))

    return render


class _ScrubbedStreamHandler(logging.StreamHandler):
    """A StreamHandler whose own error report cannot print a record's raw arguments.

    The standard handler prints the message and its arguments to stderr when a record
    fails to format (a library's bad format string); those arguments may be a token.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        line = f"relayd: a log line from {record.name} could not be written: {error!r}\n"
        try:
            self.stream.write(redactor(line))
            self.flush()
        except (OSError, ValueError):  # the stream is gone: nothing useful to do
            pass


def resolve_format(fmt: str, stream: TextIO) -> str:
    """ "auto" → json under systemd, Docker or a pipe; console on a terminal."""
    if fmt != "auto":
        return fmt
    under_service = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    return "console" if is_tty and not under_service else "json"


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library once, at start-up."""
    stream = stream or sys.stderr
    fmt = resolve_format(fmt, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(sort_keys=False)
        shared.append(structlog.processors.format_exc_info)
    else:
        # Plain tracebacks: a "pretty" formatter that shows local variables would
        # print whatever token a frame was holding.
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_event,
            lead_with_essentials,
            _redacting(renderer),
        ],
    )
    handler = _ScrubbedStreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries must not print around the pipeline: their own handlers go, warnings
    # (py.warnings) become log lines.
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    set_level(level)


def set_level(level: str) -> None:
    """Change the level at runtime (SIGHUP); libraries stay quiet above debug."""
    numeric = LEVELS[level]
    logging.getLogger().setLevel(numeric)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(numeric if numeric == logging.DEBUG else logging.WARNING)

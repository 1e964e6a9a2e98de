"""structlog configuration: one pipeline for relayd's own lines and the libraries'.

Every line, whatever logger wrote it (relayd, aiosmtpd, aiosmtplib, msal, urllib3,
warnings), passes through the same processors and is scrubbed twice on the way out:

1. ``redact_event`` walks the event dictionary before rendering: values under a
   sensitive key (``refresh_token=...``) are replaced whole, and every string value
   is scrubbed, so a secret is found even when JSON rendering would later escape it.
2. ``Redactor`` scrubs the rendered line, which catches what the renderer built
   itself (reprs of bytes, exception tracebacks).

A secret cannot reach the output by a path that forgets to scrub it. There are two
paths and both end in the same processors: relayd's own events are rendered by
structlog and written by ``_LineLogger`` (no trip through the logging module: a line is
logged for every message, and that trip doubled its cost); the libraries' records go
through the root logger's one handler, whose ProcessorFormatter runs the same chain.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from relayd.ops.jsonline import plain_json_object

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
# Every pattern above needs one of these words. Most lines have none and skip the
# patterns, which cost ~60 µs a line (every accepted message logs one). The
# case-sensitive patterns' words are looked for as they are ("0.A" is a refresh token's
# start, "10.alpha" is not); the (?i) patterns' words in the lower-cased text.
# A new pattern must add its word here (tests/unit/ops/test_logging.py checks it).
_CASED_HINTS = ("eyJ", "0.A", "1.A", "dXNlcj", "code")
_PATTERN_HINTS = ("bearer", *_OAUTH_FIELDS)
# Tokens rotate (an access token an hour, a refresh token a day); only recent ones can
# still be held by code that might print them, and each kept form costs every line a
# substring search. The patterns above catch token-shaped strings whatever their age.
_MAX_ROTATING_SECRETS = 48


class Redactor:
    """Removes token-like strings and every registered secret from text.

    Secrets registered ``permanent=True`` (the client secret) are kept for the life of
    the process; others (access and refresh tokens, which rotate) are kept in a bounded
    most-recently-registered set, so a long-running daemon does not grow without limit.
    """

    def __init__(self) -> None:
        self._permanent: set[str] = set()
        self._rotating: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # guards registration; reading uses the snapshot
        self._snapshot: tuple[str, ...] = ()

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
            # Replaced whole, never mutated: a line being scrubbed needs no lock.
            self._snapshot = (*self._permanent, *self._rotating)

    def may_change(self, text: str) -> bool:
        """False only when scrubbing ``text`` would leave it as it is."""
        if _may_match_a_pattern(text):
            return True
        return any(secret in text for secret in self._snapshot)

    def __call__(self, text: str) -> str:
        if _may_match_a_pattern(text):
            for pattern, replacement in _PATTERNS:
                text = pattern.sub(replacement, text)
        for secret in self._snapshot:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


redactor = Redactor()


def _may_match_a_pattern(text: str) -> bool:
    """False only when no pattern can match. Non-ASCII text always goes through them:
    case-insensitive matching knows letters (such as "ſ" for "s") that lower() keeps."""
    if not text.isascii():
        return True
    # Plain loops: twice as fast as any() here.
    for hint in _CASED_HINTS:
        if hint in text:
            return True
    lowered = text.lower()
    for hint in _PATTERN_HINTS:  # noqa: SIM110
        if hint in lowered:
            return True
    return False


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


@functools.lru_cache(maxsize=512)  # event keys are the code's own names: a few dozen
def _is_sensitive(key: object) -> bool:
    return isinstance(key, str) and key.lower() in SENSITIVE_KEYS


_PLAIN_TYPES = (str, int, float, bool, type(None))


def redact_event(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: scrub every field before it is rendered (and escaped).

    Most events (a message received, delivered) hold only plain values that nothing
    would change: one look at all their strings together stands for one per value,
    as neither a pattern's word nor a secret can be in a value and not in the whole.
    """
    if _plain_and_unchanged(event_dict.values()):
        return {
            key: REDACTED if value and _is_sensitive(key) else value
            for key, value in event_dict.items()
        }
    return _scrub(dict(event_dict))


def _plain_and_unchanged(values: Iterable[Any]) -> bool:
    """Whether every value is plain and no scrub would change any of them."""
    values = tuple(values)
    if not all(type(value) in _PLAIN_TYPES for value in values):
        return False
    return not redactor.may_change("\x00".join(value for value in values if type(value) is str))


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


# sd-daemon(3) priority prefixes: journald (SyslogLevelPrefix=, on by default) reads a
# leading "<N>" on each line of a service's stderr as its syslog priority and strips it.
SYSLOG_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_RECORD_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


def is_journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal: systemd sets $JOURNAL_STREAM to the
    "device:inode" of the stream it connected to stdout/stderr (systemd.exec(5));
    stderr redirected elsewhere (a file, a pipe) keeps the variable but not the inode."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's StringIO)
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def priority_prefix(level: str, stream: TextIO) -> str:
    """ "<N>" for a line at ``level`` when ``stream`` is the journal, else ""."""
    return f"<{SYSLOG_PRIORITIES[level]}>" if is_journal_stream(stream) else ""


def _prefixes(stream: TextIO) -> dict[str, str]:
    if not is_journal_stream(stream):
        return {}
    return {level: f"<{number}>" for level, number in SYSLOG_PRIORITIES.items()}


def _prefixed(text: str, prefix: str) -> str:
    """Every physical line carries the prefix: journald reads each line on its own."""
    return prefix + text.replace("\n", "\n" + prefix) if prefix else text


class _ScrubbedStreamHandler(logging.StreamHandler):
    """A StreamHandler whose own error report cannot print a record's raw arguments.

    The standard handler prints the message and its arguments to stderr when a record
    fails to format (a library's bad format string); those arguments may be a token.
    Under systemd each line starts with its priority prefix (``prefixes``).
    """

    prefixes: dict[str, str] = {}  # noqa: RUF012 (replaced whole by configure())

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        level = _RECORD_LEVELS.get(record.levelno, "critical" if record.levelno > 40 else "debug")
        return _prefixed(text, self.prefixes.get(level, ""))

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


class _Sink:
    """Where relayd's own lines go: one stream, replaced by configure(), one lock."""

    def __init__(self) -> None:
        self.stream: TextIO = sys.stderr
        self.prefixes: dict[str, str] = {}  # by level, when the stream is the journal
        self._lock = threading.Lock()

    def write(self, line: str, level: str = "info") -> None:
        if self.prefixes:
            line = _prefixed(line, self.prefixes[level])
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # the stream is gone: nothing useful to do
                pass


_SINK = _Sink()


class _LineLogger:
    """structlog's final logger for relayd's own events: it writes the rendered,
    scrubbed line. It carries the name given to structlog.get_logger()."""

    def __init__(self, name: str = "relayd") -> None:
        self.name = name

    def debug(self, line: str) -> None:
        _SINK.write(line, "debug")

    def info(self, line: str) -> None:
        _SINK.write(line, "info")

    def warning(self, line: str) -> None:
        _SINK.write(line, "warning")

    def error(self, line: str) -> None:
        _SINK.write(line, "error")

    def critical(self, line: str) -> None:
        _SINK.write(line, "critical")

    msg = info
    warn = warning
    fatal = critical


def _add_logger_name(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
    event_dict["logger"] = getattr(logger, "name", "relayd")
    return event_dict


def _drop_below_threshold(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """Level filter read at every call, so SIGHUP's set_level() applies at once."""
    if not _enabled(getattr(logger, "name", ""), _METHOD_LEVELS.get(name, logging.INFO)):
        raise structlog.DropEvent
    return event_dict


def _enabled(logger_name: str, level: int) -> bool:
    return level >= _logger_thresholds.get(logger_name, _threshold)


_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
_threshold = logging.INFO
_logger_thresholds: dict[str, int] = {}  # per relayd logger (quiet_logger)


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library once, at start-up.

    relayd's own events are rendered by structlog and written straight to the stream
    (half the cost of a trip through the logging module, on a line logged for every
    message); the libraries' records come through the standard library's handler.
    Both end in the same processors: the same format, the same two scrubs.
    """
    stream = stream or sys.stderr
    fmt = resolve_format(fmt, stream)
    rendering: list[Any] = []
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer(sort_keys=False)
        rendering.append(structlog.processors.format_exc_info)
    else:
        # Plain tracebacks: a "pretty" formatter that shows local variables would
        # print whatever token a frame was holding.
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    render = _redacting(renderer)
    finishing = [*rendering, redact_event, lead_with_essentials, render]
    timestamp = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.ExtraAdder(),
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamp,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finishing],
    )
    handler = _ScrubbedStreamHandler(stream)
    handler.setFormatter(formatter)
    handler.prefixes = _prefixes(stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries must not print around the pipeline: their own handlers go, warnings
    # (py.warnings) become log lines.
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    logging.captureWarnings(True)
    _SINK.stream = stream
    _SINK.prefixes = _prefixes(stream)
    chain = [
        _drop_below_threshold,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        timestamp,
        *finishing,
    ]
    _CONFIGURED.update(chain=list(chain), stamp=timestamp, render=render, json=fmt == "json")
    structlog.configure(
        processors=chain,
        logger_factory=_LineLogger,
        # exception() adds the traceback; levels are filtered by _drop_below_threshold.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    set_level(level)


# --- the lines logged for every message ------------------------------------------------

# What configure() gave structlog: the chain, its time stamp and its last step.
_CONFIGURED: dict[str, Any] = {}
# Keys that a processor before the renderer sets or reads: a line with one of them as a
# field goes the usual way, so that it is written exactly as structlog would write it.
_RESERVED_FIELDS = frozenset({*_LEADING_FIELDS, "exc_info"})


class PerMessageLogger:
    """``info()`` for the lines logged for every message ("received", "delivered"): the
    line that structlog's logger of the same name writes, with a third less work.

    For each call structlog assembles a bound logger and runs the nine processors one by
    one. A line whose fields are plain values that neither scrub would change (nearly
    every line of this kind) needs only what those processors do to such a line: the
    same time stamp, the fields in the order lead_with_essentials gives, then the
    chain's own last step (the renderer and the scrub of the rendered line). In JSON,
    a line of plain values with no escape in it needs less still: json.dumps's text,
    written field by field (relayd.ops.jsonline), and one look for what a scrub would
    change. Anything else goes the usual way: a value that might hold a secret, a
    sensitive or reserved key, structlog context variables, or structlog configured by
    anything but configure() (a test capturing events). Figures: bench/README.md, "The
    per-message log lines written directly" and "JSON lines written field by field".
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._usual = structlog.get_logger(name)
        self._line = _LineLogger(name)

    def info(self, event: str, **fields: Any) -> None:
        if not _enabled(self.name, logging.INFO):
            return
        line = self._line_for(event, fields)
        if line is None:
            self._usual.info(event, **fields)
        else:
            _SINK.write(line, "info")

    def _line_for(self, event: str, fields: dict[str, Any]) -> str | None:
        """The line structlog would write, or None: the usual way."""
        if not _chain_as_configured() or not _ordinary_keys(tuple(fields)):
            return None
        if structlog.contextvars.get_contextvars():
            return None
        ts = _CONFIGURED["stamp"](self._line, "info", {})["ts"]
        ordered = {"ts": ts, "level": "info", "logger": self.name, "event": event, **fields}
        if _CONFIGURED["json"]:
            line = _plain_json_line(ordered)
            if line is not None:
                return line
        # redact_event's look, at the values in the order it sees them.
        if not _plain_and_unchanged((*fields.values(), event, "info", self.name, ts)):
            return None
        return _CONFIGURED["render"](self._line, "info", ordered)


def _plain_json_line(ordered: dict[str, Any]) -> str | None:
    """The JSON line for plain values that no scrub would change, without the renderer's
    round; None for any other (the checks and the chain's renderer decide those).

    With no backslash in it, the line holds every string as it is (json escapes only
    quotes, backslashes, control and non-ASCII characters, each with a backslash): a
    value that a scrub would change (a pattern's word, a secret) would be in the line,
    so one look at the line stands for redact_event's at the values and for the scrub
    of the rendered line, which would both leave it as it is.
    """
    line = plain_json_object(ordered)
    if line is None or "\\" in line or redactor.may_change(line):
        return None
    return line


def _chain_as_configured() -> bool:
    """Whether structlog still runs what configure() gave it (a test may replace it)."""
    config = structlog.get_config()
    return config["logger_factory"] is _LineLogger and config["processors"] == _CONFIGURED.get(
        "chain"
    )


@functools.lru_cache(maxsize=64)  # a few call sites, each with its own keys
def _ordinary_keys(keys: tuple[str, ...]) -> bool:
    """Keys that no processor before the renderer treats apart from the others."""
    return not any(key in _RESERVED_FIELDS or _is_sensitive(key) for key in keys)


def set_level(level: str) -> None:
    """Change the level at runtime (SIGHUP); libraries stay quiet above debug."""
    global _threshold
    numeric = LEVELS[level]
    _threshold = numeric
    logging.getLogger().setLevel(numeric)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(numeric if numeric == logging.DEBUG else logging.WARNING)


def quiet_logger(name: str, level: int = logging.CRITICAL) -> None:
    """Show only ``level`` and above from one relayd logger (e.g. a CLI whose own
    output already says what that logger would)."""
    _logger_thresholds[name] = level
    logging.getLogger(name).setLevel(level)

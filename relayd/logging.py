"""structlog configuration: one pipeline for relayd's own lines and the libraries'.

Every line, whatever logger wrote it (relayd, aiosmtpd, aiosmtplib, msal, urllib3),
passes through the same processors and finally through ``redact``, which removes
anything that looks like a token, an XOAUTH2 string or a registered secret. A secret
cannot reach the output by a path that forgets to scrub it, because there is no
other path.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Chatty libraries: their INFO lines (every SMTP command, every HTTP call) are noise
# for an operator; they are shown at debug level only.
_LIBRARY_LOGGERS = ("mail.log", "aiosmtpd", "aiosmtplib", "msal", "urllib3", "asyncio")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # JSON Web Tokens (access and ID tokens).
    (re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*)?"), "<redacted>"),
    # base64("user=...\x01auth=Bearer ...") — the XOAUTH2 initial response.
    (re.compile(r"dXNlcj[0-9A-Za-z+/]{8,}={0,2}"), "<redacted>"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"), r"\1<redacted>"),
    # key=value and "key": "value" forms of OAuth fields.
    (
        re.compile(
            r"(?i)(\b(?:access_token|refresh_token|id_token|client_secret|code|device_code|"
            r"password|assertion|client_assertion)\b[\"']?\s*[:=]\s*[\"']?)"
            r"[^\"'&\s,;}]+"
        ),
        r"\1<redacted>",
    ),
)


class Redactor:
    """Removes token-like strings and every registered secret from rendered lines."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def register(self, secret: str | None) -> None:
        """Never print this string (a client secret, a token seen at runtime)."""
        if secret and len(secret) >= 6:
            with self._lock:
                self._secrets.add(secret)
                if len(self._secrets) > 256:  # tokens rotate; keep the set bounded
                    self._secrets.pop()

    def __call__(self, text: str) -> str:
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        with self._lock:
            secrets = tuple(self._secrets)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, "<redacted>")
        return text


redactor = Redactor()


def _redacting(renderer: Callable[..., Any]) -> Callable[..., Any]:
    def render(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        return redactor(str(renderer(logger, name, event_dict)))

    return render


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
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redacting(renderer),
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
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
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(numeric if numeric == logging.DEBUG else logging.WARNING)

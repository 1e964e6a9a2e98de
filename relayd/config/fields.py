"""The field parsers every declared setting names, and the errors they raise.

Shared by the sections (``relayd.config``) and the routes (``relayd.config.routes``):
one parser per kind of value, so a YAML key, its environment override and its JSON
Schema (``relayd.config.schema``) are judged alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

from relayd.units import format_duration, format_size, parse_duration, parse_size


class ConfigError(Exception):
    """A setting is wrong. The text names where it came from, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source, self.key, self.problem = source, key, problem


class Secret(str):
    """A string that never shows itself in repr(), logs or check-config output."""

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    def reveal(self) -> str:
        return str.__str__(self)


# --- field parsers -------------------------------------------------------------------


def _text(value: object) -> str:
    if isinstance(value, dict | list):
        raise ValueError("expected a single text value")
    return "" if value is None else str(value)


def _integer(minimum: int = 0, maximum: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
        if maximum is not None and not minimum <= number <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {number}")
        if number < minimum:
            raise ValueError(f"must be at least {minimum}, got {number}")
        return number

    parse.schema = {"type": "integer", "minimum": minimum}  # type: ignore[attr-defined]
    if maximum is not None:
        parse.schema["maximum"] = maximum  # type: ignore[attr-defined]
    return parse


def _port(value: object) -> int:
    return _integer(0, 65535)(value)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _text_list(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # environment: comma separated
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list):
        return tuple(_text(item).strip() for item in value)
    raise ValueError("expected a list")


def _networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _text_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR network") from None
    return tuple(networks)


def _path(value: object) -> Path | None:
    text = _text(value).strip()
    return Path(text).expanduser() if text else None


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    parse.schema = {"enum": list(choices)}  # type: ignore[attr-defined]
    return parse


def _secret(value: object) -> Secret | None:
    text = _text(value)
    return Secret(text) if text else None


def _setting(
    default: Any, parse: Callable[[object], Any], show: Callable[[Any], Any] | None = None
):
    """A declared setting: its default, its parser and how check-config shows it."""
    return field(default=default, metadata={"parse": parse, "show": show})


def _size(default: int):
    return _setting(default, parse_size, format_size)


def _message_size(value: object) -> int:
    # relayd keeps headers.ADDED_AT_MOST (4 KiB) of the limit for the fields it adds
    # and accepts the rest (the SIZE it advertises); below 16 KiB little would be left.
    size = parse_size(value)
    if size < 16 * 1024:
        raise ValueError(f"must be at least 16KiB, got {format_size(size)}")
    return size


def _duration(default: float, *, positive: bool = False):
    """A duration; ``positive`` for the waits that time something out or space out
    retries, where 0 would close every session at once, fail every call, or repeat a
    call to Entra ID without a pause (Postfix, too, gives its timeouts and backoff
    times a minimum)."""
    return _setting(default, _positive_duration if positive else parse_duration, format_duration)


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


TRANSPORTS = ("smtp", "graph", "auto", "maildir")
MICROSOFT_TRANSPORTS = ("smtp", "graph", "auto")  # the ones that sign in to Microsoft 365
LOOPBACK_ONLY = _networks(["127.0.0.0/8", "::1/128"])
LOOPBACK = "localhost"  # listen.address: 127.0.0.1 and ::1, whatever /etc/hosts says
MiB = 1024 * 1024


# --- JSON Schema of each parser (relayd.config.schema) ------------------------------

_TEXT = {"type": "string"}
_TEXTS = {"type": "array", "items": _TEXT}
_SCHEMAS: dict[Callable[[object], Any], dict[str, Any]] = {
    _text: _TEXT,
    _port: {"type": "integer", "minimum": 0, "maximum": 65535},
    _boolean: {"type": "boolean"},
    _text_list: _TEXTS,
    _networks: {**_TEXTS, "description": "addresses or CIDR networks"},
    _path: _TEXT,
    _secret: _TEXT,
    parse_size: {"type": ["integer", "string"], "description": "a size: 512KiB, 35MiB"},
    _message_size: {"type": ["integer", "string"], "description": "a size, at least 16KiB"},
    parse_duration: {"type": ["number", "string"], "description": "a duration: 30s, 5m, 1h"},
    _positive_duration: {
        "type": ["number", "string"],
        "exclusiveMinimum": 0,
        "description": "a duration longer than 0s: 30s, 5m, 1h",
    },
}


def schema_of(parse: Callable[[object], Any]) -> dict[str, Any]:
    """The JSON Schema of the values ``parse`` accepts from YAML (what editors check)."""
    known = getattr(parse, "schema", None) or _SCHEMAS.get(parse)
    return dict(known) if known else {}

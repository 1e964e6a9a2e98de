"""Parsing of human-written durations and sizes ("30s", "5m", "35MiB")."""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as "30s", "5m", "1h", "5d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h or 5d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _NUMBER_UNIT.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or (unit and unit not in _DURATION_UNITS):
            raise ValueError(f"expected a duration such as 30s, 5m, 1h or 5d, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS.get(unit or "s", 1)
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "35MiB", "512KiB", "100MB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 35MiB or 512KiB")
    if isinstance(value, int):
        size = value
    else:
        match = _NUMBER_UNIT.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"expected a size such as 35MiB or 512KiB, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def format_duration(seconds: float) -> str:
    """The shortest exact form: 86400 → "1d", 90 → "90s"."""
    for unit in ("w", "d", "h", "m", "s"):
        factor = _DURATION_UNITS[unit]
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """The shortest exact binary form: 36700160 → "35MiB"."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)

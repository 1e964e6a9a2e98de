"""How `relayd auth` writes times, token lifetimes and what the daemon last saw."""

from __future__ import annotations

import time


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    moment = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    delta = timestamp - time.time()
    return f"{moment} ({_span(delta)})"


def _span(seconds: float) -> str:
    amount = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if amount >= size:
            text = f"{amount / size:.0f} {unit}"
            break
    else:
        text = f"{amount:.0f} s"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def expiry(expires_at: float | None) -> str:
    if not expires_at:
        return "none cached"
    state = "valid until" if expires_at > time.time() else "expired"
    return f"{state} {when(expires_at)}"


def rotation(rotated_at: float | None) -> str:
    if not rotated_at:
        return "none"
    return f"issued {when(rotated_at)}; expires after 90 days unused"


def daemon_line(daemon: dict | None, current: bool) -> str:
    if daemon is None:
        return "nothing recorded (the daemon has not run with this cache)"
    line = f"{daemon.get('state')} at {when(daemon.get('updated_at'))} (pid {daemon.get('pid')})"
    return line if current else line + "; the cache changed since"

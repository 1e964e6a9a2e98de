"""Why nothing moves: what `relayd queue list` and `show` add while deliveries wait.

Read from what the daemon records: the pid file's lock (is a daemon running at all?),
``<spool>/status.json`` (deliveries paused, the reason and detail; relayd.ops.
daemon_status) and, for an auth pause, the auth state file the token module keeps
beside the token cache (its state and advice are updated at every change of state).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from relayd import config
from relayd.config import Settings
from relayd.ops.daemon_status import read_status
from relayd.ops.pidfile import PID_FILE_NAME, running_daemon
from relayd.queue.listing import human_age

# Reason names as the scheduler and transports give them (relayd.transports.base).
_UPSTREAM_DOWN = ("connection", "timeout", "temporary")


def deliveries_note(
    settings: Settings, spool_directory: Path, now: float | None = None
) -> str | None:
    """One sentence with the command to run, or None while deliveries flow."""
    now = time.time() if now is None else now
    pid = running_daemon(spool_directory / PID_FILE_NAME)
    if pid is None:
        return (
            "relayd is not running: nothing is delivered until it starts"
            " (systemctl start relayd, or relayd serve)"
        )
    status = read_status(spool_directory)
    if not status or status.get("deliveries") != "paused" or status.get("pid") != pid:
        return None
    since = float(status.get("since") or now)
    head = f"deliveries are paused ({status.get('reason')}) since {human_age(now - since)} ago"
    return f"{head}: {explain(status, settings, _auth_state(settings, pid))}"


def route_notes(settings: Settings, spool_directory: Path, now: float | None = None) -> list[str]:
    """One sentence per route (not the default mailbox) whose deliveries are paused."""
    now = time.time() if now is None else now
    pid = running_daemon(spool_directory / PID_FILE_NAME)
    status = read_status(spool_directory) if pid is not None else None
    if not status or status.get("pid") != pid or not settings.routes:
        return []
    notes = []
    for mailbox, entry in sorted((status.get("mailboxes") or {}).items()):
        route = config.settings_for_mailbox(settings, mailbox)
        if mailbox == settings.default_mailbox or route is None:
            continue
        if not isinstance(entry, dict) or entry.get("deliveries") != "paused":
            continue
        since = float(entry.get("since") or now)
        head = (
            f"{mailbox}: its deliveries are paused ({entry.get('reason')})"
            f" since {human_age(now - since)} ago"
        )
        notes.append(f"{head}: {explain(entry, route, _auth_state(route, pid))}")
    return notes


def explain(status: dict[str, Any], settings: Settings, auth: dict[str, Any] | None) -> str:
    """What the pause means and what to do about it."""
    reason, detail = status.get("reason"), status.get("detail") or ""
    config = _config_option(settings)
    if reason == "auth":
        return _auth_advice(status, auth, settings, config)
    if reason == "throttled":
        return (
            "Microsoft 365 throttles this mailbox (421 / 432 4.3.2); deliveries resume by"
            f" themselves after upstream.throttle_pause ({settings.upstream.throttle_pause:.0f}s)"
        )
    if reason in _UPSTREAM_DOWN:
        return (
            f"the upstream cannot be used ({detail or reason}); relayd retries by itself."
            f" See what it answers: relayd send-test --direct {config} --to ADDRESS"
        )
    if reason == "daily_limit":
        return (
            f"{detail or 'the daily recipient budget is spent'}; mail goes out as the 24-hour"
            " window frees room (upstream.daily_recipient_limit)"
        )
    # An account-level pause (quota, restriction): the detail names what Exchange said.
    return (
        f"{detail or reason}. Fix the mailbox's account as the reply says; deliveries"
        f" resume by themselves, or at once with: relayd queue retry --all {config}"
    )


def _auth_advice(
    status: dict[str, Any], auth: dict[str, Any] | None, settings: Settings, config: str
) -> str:
    login = f"relayd auth login {config}"
    state = (auth or {}).get("state")
    if state == "rejected":
        return (
            "Exchange refused a fresh token (535 5.7.3): allow SMTP AUTH for"
            f" {settings.upstream.mailbox} and check the app's SMTP.Send permission, then: {login}"
        )
    advice = (auth or {}).get("advice") or status.get("advice")
    if advice:
        return str(advice)
    return f"{status.get('detail') or 'no usable token'}; sign in: {login}"


def _auth_state(settings: Settings, pid: int) -> dict[str, Any] | None:
    """The token module's state file (auth.store.TokenStore.state_path), if the running
    daemon wrote it."""
    cache = settings.oauth.token_cache
    try:
        document = json.loads(cache.with_name(cache.name + ".state.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("pid") != pid:
        return None
    return document


def _config_option(settings: Settings) -> str:
    return "--sandbox" if settings.source.startswith("sandbox") else f"-c {settings.source}"

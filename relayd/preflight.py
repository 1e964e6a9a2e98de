"""What `relayd check-config` and `relayd serve` check on this machine before a start.

``config`` checks the file on its own (types, ranges, the shape of ids); this looks at
what the file points to: directories relayd must create and write, files it must
read, a client-secret file others can read, and the example file's placeholders. Each
finding names the key; ``serve`` stops on an error (exit 2, one line each),
``check-config`` prints both kinds and exits 2 on an error.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from relayd.config import CREDENTIALS_ENV, Settings
from relayd.config.routes import shadowed

ERROR, WARNING = "error", "warning"
# What config/relayd.example.yaml ships: an all-zero GUID and example.com (RFC 2606).
PLACEHOLDER_GUID = "00000000-0000-0000-0000-000000000000"
PLACEHOLDER_DOMAIN = "example.com"


@dataclass(frozen=True)
class Finding:
    severity: str  # ERROR | WARNING
    key: str
    problem: str

    def line(self, source: str) -> str:
        return f"{source}: {self.key}: {self.problem}"


def check(settings: Settings, *, serving: bool) -> list[Finding]:
    """Everything found, errors first. ``serving``: placeholders are errors, not warnings."""
    findings = [*_placeholders(settings, serving), *_secret_file(settings)]
    findings += _directories(settings) + _readable_files(settings) + _routes(settings, serving)
    return sorted(findings, key=lambda finding: finding.severity != ERROR)


def errors(findings: list[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.severity == ERROR]


# --- placeholders --------------------------------------------------------------------


def placeholder_keys(settings: Settings) -> list[str]:
    """The keys that still hold the example file's values (only where they matter:
    a transport that signs in to Microsoft 365)."""
    if settings.upstream.transport == "maildir":
        return []
    keys = [
        f"oauth.{key}"
        for key in ("tenant_id", "client_id")
        if getattr(settings.oauth, key) == PLACEHOLDER_GUID
    ]
    if _is_placeholder_address(settings.upstream.mailbox):
        keys.append("upstream.mailbox")
    if any(_is_placeholder_address(address) for address in settings.upstream.send_as):
        keys.append("upstream.send_as")
    return keys


def _is_placeholder_address(address: str) -> bool:
    domain = address.rpartition("@")[2].lower().rstrip(".")
    return domain == PLACEHOLDER_DOMAIN or domain.endswith("." + PLACEHOLDER_DOMAIN)


def _placeholders(settings: Settings, serving: bool) -> list[Finding]:
    keys = placeholder_keys(settings)
    if not keys:
        return []
    problem = (
        f"still the example file's placeholder ({PLACEHOLDER_GUID} or @{PLACEHOLDER_DOMAIN});"
        " put in the values of your app registration and mailbox"
    )
    return [Finding(ERROR if serving else WARNING, ", ".join(keys), problem)]


# --- routes --------------------------------------------------------------------------


def _routes(settings: Settings, serving: bool) -> list[Finding]:
    """Each route's placeholders and token cache; senders an earlier route takes."""
    found = [Finding(WARNING, *line.split(": ", 1)) for line in shadowed(settings.routes)]
    for index, route in enumerate(settings.routes):
        where = f"routes[{index}]"
        addresses = (route.mailbox, *route.senders, *route.send_as)
        if route.transport != "maildir" and any(map(_is_placeholder_address, addresses)):
            problem = f"still an address @{PLACEHOLDER_DOMAIN}: put in your mailbox and senders"
            found.append(Finding(ERROR if serving else WARNING, where, problem))
        cache = route.token_cache
        if route.transport == "maildir" or cache is None:
            continue
        if cache.exists() and not _can(cache, os.R_OK | os.W_OK):
            problem = f"cannot read and write {cache} (as {_user()})"
            found.append(Finding(ERROR, f"{where}.token_cache", problem))
        problem = directory_problem(cache.parent)
        if problem:
            found.append(Finding(ERROR, f"{where}.token_cache", problem))
    return found


# --- files ---------------------------------------------------------------------------


def _secret_file(settings: Settings) -> list[Finding]:
    """A client secret that every local user can read is a secret no more."""
    path = settings.oauth.client_secret_file
    if path is None or settings.oauth.client_secret is None:
        return []  # inline, from $CREDENTIALS_DIRECTORY (systemd's own), or none at all
    if os.environ.get(CREDENTIALS_ENV) and path.parent == Path(os.environ[CREDENTIALS_ENV]):
        return []
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return []  # it was read a moment ago; a vanished file is config's business
    if not mode & 0o004:
        return []
    return [
        Finding(
            WARNING,
            "oauth.client_secret_file",
            f"{path} is readable by every user (mode {mode:04o}); run: chmod 600 {path}",
        )
    ]


def _readable_files(settings: Settings) -> list[Finding]:
    found = []
    cache = settings.oauth.token_cache
    smtp = settings.upstream.transport != "maildir"
    if smtp and cache.exists() and not _can(cache, os.R_OK | os.W_OK):
        found.append(
            Finding(ERROR, "oauth.token_cache", f"cannot read and write {cache} (as {_user()})")
        )
    for key, path in (
        ("upstream.ca_file", settings.upstream.ca_file),
        ("oauth.ca_file", settings.oauth.ca_file),
    ):
        if path is not None and not _can(path, os.R_OK):
            found.append(Finding(ERROR, key, f"cannot read {path} (as {_user()})"))
    return found


# --- directories ---------------------------------------------------------------------


def _directories(settings: Settings) -> list[Finding]:
    wanted = [("spool.directory", settings.spool.directory)]
    if settings.upstream.transport == "maildir":
        wanted.append(("upstream.maildir", settings.upstream.maildir))
    else:
        wanted.append(("oauth.token_cache", settings.oauth.token_cache.parent))
    found = []
    for key, directory in wanted:
        problem = directory_problem(directory)
        if problem:
            found.append(Finding(ERROR, key, problem))
    return found


def directory_problem(directory: Path) -> str | None:
    """Why relayd could not create or write ``directory``, or None when it can."""
    directory = Path(directory).absolute()
    if directory.exists():
        if not directory.is_dir():
            return f"{directory} is not a directory"
        if not _can(directory, os.W_OK | os.X_OK):
            return f"cannot write in {directory} (as {_user()})"
        return None
    ancestor = directory.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot create {directory}: {ancestor} is not a directory"
    if not _can(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {directory}: no permission to write in {ancestor} (as {_user()})"
    return None


def _can(path: Path, mode: int) -> bool:
    """access(2) for the effective user, as the daemon will open the path."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"

"""Configuration: one YAML file + environment overrides + secret files → frozen settings.

Every setting is declared once, as a dataclass field whose metadata names its parser.
The loader walks those declarations, so the YAML keys, the ``RELAYD_<SECTION>_<KEY>``
environment overrides, the error messages and ``check-config``'s output can never
disagree about what exists.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from relayd.config.checks import check_consistency
from relayd.config.fields import (
    LOOPBACK,
    LOOPBACK_ONLY,
    MICROSOFT_TRANSPORTS,
    TRANSPORTS,
    ConfigError,
    Secret,
)
from relayd.config.routes import (
    ROUTES_KEY,
    RouteSettings,
    check_routes,
    parse_routes,
    route_for,
    show_routes,
)
from relayd.config.sections import (
    SECTIONS,
    ListenSettings,
    LoggingSettings,
    MetricsSettings,
    OAuthSettings,
    RetrySettings,
    Settings,
    SpoolSettings,
    UpstreamSettings,
)

__all__ = [
    "LOOPBACK",
    "LOOPBACK_ONLY",
    "MICROSOFT_TRANSPORTS",
    "SECTIONS",
    "TRANSPORTS",
    "ConfigError",
    "ListenSettings",
    "LoggingSettings",
    "MetricsSettings",
    "OAuthSettings",
    "RetrySettings",
    "RouteSettings",
    "Secret",
    "Settings",
    "SpoolSettings",
    "UpstreamSettings",
]

ENV_PREFIX = "RELAYD_"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # systemd LoadCredential=
SANDBOX_DIR_ENV = "RELAYD_SANDBOX_DIR"
SANDBOX_DIR = Path("relayd-sandbox")


def route_settings(settings: Settings, route: RouteSettings) -> Settings:
    """The settings one route runs with: ``settings`` with the route's mailbox,
    send_as, transport, limits and token cache in place of the default's, and no
    routes (what the token manager, the transport and the scheduler each read)."""
    upstream = dataclasses.replace(
        settings.upstream,
        mailbox=route.mailbox,
        send_as=route.send_as,
        transport=route.transport,
        max_connections=route.max_connections,
        rate_limit_per_minute=route.rate_limit_per_minute,
        daily_recipient_limit=route.daily_recipient_limit,
    )
    oauth = dataclasses.replace(settings.oauth, token_cache=route.token_cache)
    return dataclasses.replace(settings, upstream=upstream, oauth=oauth, routes=())


def mailbox_settings(settings: Settings) -> dict[str, Settings]:
    """Every mailbox's settings by route name: the routes in order, the default last."""
    routes = {route.key: route_settings(settings, route) for route in settings.routes}
    return {**routes, settings.default_mailbox: dataclasses.replace(settings, routes=())}


def settings_for_sender(settings: Settings, sender: str) -> Settings:
    """The settings of the route ``sender`` takes (the default's when none)."""
    route = route_for(settings.routes, sender)
    if route is None:
        return dataclasses.replace(settings, routes=())
    return route_settings(settings, route)


def mailbox_for_sender(settings: Settings, sender: str) -> str:
    """The name of the route ``sender`` takes (``RouteSettings.key``, or the default's)."""
    route = route_for(settings.routes, sender)
    return route.key if route is not None else settings.default_mailbox


def settings_for_mailbox(settings: Settings, mailbox: str | None) -> Settings | None:
    """The settings of the route of ``mailbox`` (None: the default); None when no
    route has that mailbox."""
    if mailbox is None:
        return dataclasses.replace(settings, routes=())
    return mailbox_settings(settings).get(mailbox.strip().lower())


# --- loading -------------------------------------------------------------------------


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, merge and validate the configuration file. Raises ConfigError."""
    return from_mapping(_read_document(path), str(path), environ)


def _read_document(path: str | Path) -> object:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "the file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(source, "(file)", "is a directory, not a configuration file") from None
    except OSError as error:
        raise ConfigError(source, "(file)", f"cannot read it: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(source, "(file)", f"not UTF-8 text ({error.reason})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where, problem = _yaml_problem(error)
        raise ConfigError(source, where, f"not valid YAML: {problem}") from None
    return document or {}


def _yaml_problem(error: yaml.YAMLError) -> tuple[str, str]:
    """Where and what, on one line: PyYAML's own text spans several lines."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
    parts = [getattr(error, "problem", None), getattr(error, "context", None)]
    problem = "; ".join(str(part) for part in parts if part) or str(error)
    return where, " ".join(problem.split())


def sandbox_directory(environ: Mapping[str, str] | None = None) -> Path:
    """Where the sandbox keeps its spool and Maildir: $RELAYD_SANDBOX_DIR or
    ./relayd-sandbox, made absolute so that messages in logs name a findable place."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(SANDBOX_DIR_ENV) or SANDBOX_DIR).expanduser().absolute()


def sandbox(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """`relayd serve --sandbox`: built-in defaults and no Microsoft account.

    The spool and the Maildir live under ``sandbox_directory()``; the listener and the
    metrics keep their usual defaults (127.0.0.1:2525 and :2526). With ``path``, that
    file's settings apply on top, and environment overrides apply as always, except
    that the transport stays ``maildir``: a sandbox never sends real mail.
    """
    environ = os.environ if environ is None else environ
    directory = sandbox_directory(environ)
    document: object = {
        "spool": {"directory": str(directory / "spool")},
        "upstream": {"maildir": str(directory / "maildir")},
        "oauth": {"token_cache": str(directory / "token_cache.json")},
    }
    source = f"sandbox ({directory})"
    if path is not None:
        document, source = _layered(document, _read_document(path)), str(path)
    if isinstance(document, dict) and isinstance(document.get("upstream"), dict):
        document["upstream"]["transport"] = "maildir"
    if isinstance(document, dict) and isinstance(document.get(ROUTES_KEY), list):
        for route in document[ROUTES_KEY]:  # no route of a sandbox sends real mail
            if isinstance(route, dict) and "transport" in route:
                route["transport"] = "maildir"
    transport_variable = f"{ENV_PREFIX}UPSTREAM_TRANSPORT"
    environ = {name: value for name, value in environ.items() if name != transport_variable}
    return from_mapping(document, source, environ)


def _layered(base: dict[str, dict], top: object) -> object:
    """``top``'s sections over ``base``'s, key by key. Whatever is not a mapping is
    passed on as it is, for from_mapping to report."""
    if not isinstance(top, dict):
        return top
    merged: dict[object, object] = {name: dict(section) for name, section in base.items()}
    for name, section in top.items():
        section = {} if section is None else section
        below = merged.get(name)
        if isinstance(section, dict) and isinstance(below, dict):
            merged[name] = {**below, **section}
        else:
            merged[name] = section
    return merged


def from_mapping(
    document: object, source: str = "<defaults>", environ: Mapping[str, str] | None = None
) -> Settings:
    environ = os.environ if environ is None else environ
    if not isinstance(document, dict):
        raise ConfigError(source, "(top level)", "expected a mapping of sections")
    for name in document:
        if name not in SECTIONS and name != ROUTES_KEY:
            known = {**SECTIONS, ROUTES_KEY: None}
            raise ConfigError(source, str(name), _unknown("section", name, known))
    sections = {
        name: _load_section(name, cls, document.get(name), source, environ)
        for name, cls in SECTIONS.items()
    }
    routes = parse_routes(document.get(ROUTES_KEY), source)
    routes = check_routes(routes, sections["upstream"], sections["oauth"].token_cache, source)
    settings = Settings(**sections, routes=routes, source=source)
    settings = _resolve_secrets(settings, source, environ)
    check_consistency(settings, source)
    return settings


def _load_section(name: str, cls: type, raw: object, source: str, environ: Mapping) -> Any:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(source, name, "expected a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(source, f"{name}.{key}", _unknown("key", key, fields))
    values = {}
    for key, spec in fields.items():
        env_name = f"{ENV_PREFIX}{name}_{key}".upper()
        if env_name in environ:
            value, where = environ[env_name], f"environment variable {env_name}"
        elif key in raw:
            value, where = raw[key], source
        else:
            continue
        try:
            values[key] = spec.metadata["parse"](value)
        except ValueError as error:
            raise ConfigError(where, f"{name}.{key}", str(error)) from None
    return cls(**values)


def _unknown(kind: str, name: object, known: Mapping) -> str:
    return f"unknown {kind} {name!r}; known: {', '.join(known)}"


def _resolve_secrets(settings: Settings, source: str, environ: Mapping) -> Settings:
    """The client secret: inline, from client_secret_file, or from systemd's credentials."""
    oauth = settings.oauth
    if oauth.client_secret is not None:
        return settings
    secret_file = oauth.client_secret_file
    key = "oauth.client_secret_file"
    if secret_file is None and environ.get(CREDENTIALS_ENV):
        candidate = Path(environ[CREDENTIALS_ENV]) / "client_secret"
        if candidate.exists():
            secret_file, key = candidate, f"${CREDENTIALS_ENV}/client_secret"
    if secret_file is None:
        return settings
    try:
        secret = secret_file.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(source, key, f"cannot read {secret_file}: {error.strerror}") from None
    if not secret:
        raise ConfigError(source, key, f"{secret_file} is empty")
    oauth = dataclasses.replace(oauth, client_secret=Secret(secret))
    return dataclasses.replace(settings, oauth=oauth)


def listen_hosts(address: str) -> list[str]:
    """The addresses to bind for listen.address. ``localhost`` is both loopbacks, decided
    here and not by the resolver: /etc/hosts may name only one, and a host may have
    IPv6 switched off, where binding ::1 would fail. Anything else is bound as given."""
    if address.strip().lower() != LOOPBACK:
        return [address]
    return ["127.0.0.1", "::1"] if _has_ipv6_loopback() else ["127.0.0.1"]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# --- presentation --------------------------------------------------------------------


def redacted(settings: Settings) -> dict[str, dict[str, Any]]:
    """The effective settings as plain data, secrets replaced, for check-config."""
    result: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = getattr(settings, name)
        shown: dict[str, Any] = {}
        for spec in dataclasses.fields(section):
            value = getattr(section, spec.name)
            if isinstance(value, Secret):
                shown[spec.name] = "<redacted>"
            elif spec.metadata.get("show") is not None:
                shown[spec.name] = spec.metadata["show"](value)
            else:
                shown[spec.name] = list(value) if isinstance(value, tuple) else value
        result[name] = shown
    if not settings.oauth.authority:
        result["oauth"]["authority"] = settings.oauth.effective_authority
    if settings.routes:
        result[ROUTES_KEY] = show_routes(settings.routes)  # type: ignore[assignment]
    return result


def dump(settings: Settings) -> str:
    return yaml.safe_dump(redacted(settings), sort_keys=False, default_flow_style=False)


def fail(error: ConfigError) -> None:
    """Print a configuration error the way every command does, then exit 2."""
    print(f"relayd: configuration error in {error}", file=sys.stderr)
    raise SystemExit(2)

"""``routes:``: several mailboxes in one relay, chosen by the envelope sender.

Each route is one more mailbox that signs in on its own (its own token cache), with
its own transport and limits. Mail goes through the first route whose ``senders``
match its envelope sender (compared case-insensitively): an exact address, or
``*@domain`` for every address of a domain. A route's own ``mailbox`` and its
``send_as`` addresses are senders of it too (implicitly, after its listed ones): a
shared mailbox named in ``send_as`` needs no second mention. Mail that no route
matches, DSNs (the null sender) included, leaves as ``upstream.mailbox``, the
default route; a configuration without ``routes:`` is exactly the single mailbox.

Routes are declared like the sections (``relayd.config.fields``): the same parsers,
the same one-line errors, here with the item's index counted from 0
(``routes[1].mailbox: ...``), and the same declarations give the JSON Schema.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.config.fields import (
    TRANSPORTS,
    ConfigError,
    _choice,
    _integer,
    _path,
    _setting,
    _text,
    _text_list,
)
from relayd.identifiers import is_address, is_domain_name

ROUTES_KEY = "routes"
INHERITED = ("transport", "max_connections", "rate_limit_per_minute", "daily_recipient_limit")
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._@+-]")


@dataclass(frozen=True)
class RouteSettings:
    """One route. After loading, every optional key holds its effective value (the
    ``upstream.*`` value, or the token cache derived from the mailbox)."""

    # The account that signs in and sends (required).
    mailbox: str = _setting("", _text)
    # Envelope senders routed here: exact addresses or *@domain; first match wins.
    senders: tuple = _setting((), _text_list, list)
    # Addresses this mailbox may send as (shared mailboxes, with Send As rights).
    send_as: tuple = _setting((), _text_list, list)
    # Default: token_cache.<mailbox>.json beside oauth.token_cache.
    token_cache: Path | None = _setting(None, _path, lambda v: str(v) if v else None)
    # Defaults: upstream.transport, upstream.max_connections, ... (the same key).
    transport: str | None = _setting(None, _choice(*TRANSPORTS))
    max_connections: int | None = _setting(None, _integer(1))
    rate_limit_per_minute: int | None = _setting(None, _integer(0))
    daily_recipient_limit: int | None = _setting(None, _integer(0))

    @property
    def key(self) -> str:
        """The route's name in metrics (label ``mailbox``), logs and status files."""
        return self.mailbox.lower()

    def matches(self, sender: str) -> bool:
        """Whether ``sender`` (an envelope sender) is routed here."""
        return sender_matches(self.patterns(), sender)

    def patterns(self) -> tuple[str, ...]:
        """Listed senders first, then the implicit ones (the mailbox, send_as)."""
        return (*self.senders, self.mailbox, *self.send_as)


FIELDS = {spec.name: spec for spec in dataclasses.fields(RouteSettings)}
# What each key means, for the JSON Schema (editors show it while completing).
DESCRIPTIONS = {
    "mailbox": "the account that signs in and sends (not upstream.mailbox)",
    "senders": "envelope senders routed here: addresses or *@domain; first match wins",
    "send_as": "addresses this mailbox may send as (shared mailboxes, Send As rights)",
    "token_cache": "this mailbox's MSAL cache; default token_cache.<mailbox>.json beside"
    " oauth.token_cache",
    "transport": "default: upstream.transport",
    "max_connections": "default: upstream.max_connections",
    "rate_limit_per_minute": "default: upstream.rate_limit_per_minute",
    "daily_recipient_limit": "default: upstream.daily_recipient_limit",
}


def sender_matches(patterns: Iterable[str], sender: str) -> bool:
    address = sender.strip().lower()
    if not address:
        return False  # the null sender (DSNs) always takes the default route
    domain = address.rpartition("@")[2]
    for pattern in patterns:
        pattern = pattern.strip().lower()
        if pattern == address or (pattern.startswith("*@") and pattern[2:] == domain):
            return True
    return False


def route_for(routes: Iterable[RouteSettings], sender: str) -> RouteSettings | None:
    """The first route that takes ``sender``; None: the default route."""
    return next((route for route in routes if route.matches(sender)), None)


# --- loading ---------------------------------------------------------------------------


def parse_routes(raw: object, source: str) -> tuple[RouteSettings, ...]:
    """The ``routes:`` list as written (defaults not yet resolved: ``check_routes``)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(source, ROUTES_KEY, "expected a list of routes (- mailbox: ...)")
    return tuple(
        _parse_route(item, f"{ROUTES_KEY}[{index}]", source) for index, item in enumerate(raw)
    )


def _parse_route(item: object, where: str, source: str) -> RouteSettings:
    if not isinstance(item, dict):
        raise ConfigError(source, where, "expected a mapping of keys (mailbox, senders, ...)")
    for key in item:
        if key not in FIELDS:
            known = ", ".join(FIELDS)
            raise ConfigError(source, f"{where}.{key}", f"unknown key {key!r}; known: {known}")
    values = {}
    for key, value in item.items():
        try:
            values[key] = FIELDS[key].metadata["parse"](value)
        except ValueError as error:
            raise ConfigError(source, f"{where}.{key}", str(error)) from None
    return RouteSettings(**values)


def check_routes(
    routes: tuple[RouteSettings, ...],
    upstream: Any,
    token_cache: Path,
    source: str,
) -> tuple[RouteSettings, ...]:
    """Validate each route against the others and ``upstream``; fill in its defaults."""
    resolved = []
    mailboxes: dict[str, int] = {}
    caches: dict[Path, str] = {token_cache: "oauth.token_cache"}
    for index, route in enumerate(routes):
        where = f"{ROUTES_KEY}[{index}]"
        _check_addresses(route, where, source)
        key = route.key
        if key == upstream.mailbox.strip().lower():
            raise ConfigError(
                source,
                f"{where}.mailbox",
                f"invalid: {route.mailbox} is upstream.mailbox, the default route; mail that"
                " matches no route leaves as it already",
            )
        if key in mailboxes:
            raise ConfigError(
                source,
                f"{where}.mailbox",
                f"invalid: {route.mailbox} is the mailbox of routes[{mailboxes[key]}] too;"
                " one route per mailbox (list every sender in that one)",
            )
        mailboxes[key] = index
        route = _with_defaults(route, upstream, token_cache)
        cache = route.token_cache
        assert cache is not None
        if cache in caches:
            raise ConfigError(
                source,
                f"{where}.token_cache",
                f"invalid: {cache} is {caches[cache]}'s token cache too; each mailbox needs"
                " its own",
            )
        caches[cache] = f"{where}.token_cache"
        resolved.append(route)
    return tuple(resolved)


def _check_addresses(route: RouteSettings, where: str, source: str) -> None:
    if not route.mailbox.strip():
        raise ConfigError(source, f"{where}.mailbox", "required: the address that signs in")
    if not is_address(route.mailbox):
        raise ConfigError(
            source,
            f"{where}.mailbox",
            f"invalid: {route.mailbox!r} is not an email address (e.g. hr@contoso.com)",
        )
    for pattern in route.senders:
        if not _is_sender_pattern(pattern):
            raise ConfigError(
                source,
                f"{where}.senders",
                f"invalid: {pattern!r} is neither an address nor *@domain",
            )
    for address in route.send_as:
        if not is_address(address):
            raise ConfigError(
                source, f"{where}.send_as", f"invalid: {address!r} is not an email address"
            )


def _is_sender_pattern(pattern: str) -> bool:
    if pattern.startswith("*@"):
        return is_domain_name(pattern[2:])
    return is_address(pattern)


def _with_defaults(route: RouteSettings, upstream: Any, token_cache: Path) -> RouteSettings:
    inherited = {key: getattr(upstream, key) for key in INHERITED if getattr(route, key) is None}
    if route.token_cache is None:
        inherited["token_cache"] = default_token_cache(token_cache, route.mailbox)
    return dataclasses.replace(route, **inherited)


def default_token_cache(token_cache: Path, mailbox: str) -> Path:
    """``token_cache.<mailbox>.json`` beside ``oauth.token_cache`` (the state directory)."""
    name = _UNSAFE_IN_NAME.sub("_", mailbox.strip().lower())
    return token_cache.with_name(f"token_cache.{name}.json")


# --- presentation ----------------------------------------------------------------------


def show_routes(routes: Iterable[RouteSettings]) -> list[dict[str, Any]]:
    """The routes as check-config prints them (effective values)."""
    shown = []
    for route in routes:
        item: dict[str, Any] = {}
        for spec in dataclasses.fields(route):
            value = getattr(route, spec.name)
            show = spec.metadata.get("show")
            item[spec.name] = show(value) if show is not None else value
        shown.append(item)
    return shown


def shadowed(routes: tuple[RouteSettings, ...]) -> list[str]:
    """Sender patterns that an earlier route already takes (first match wins): each as
    a sentence for check-config's warnings."""
    findings = []
    for index, route in enumerate(routes):
        for pattern in route.senders:
            for earlier_index, earlier in enumerate(routes[:index]):
                if _covers(earlier, pattern):
                    findings.append(
                        f"{ROUTES_KEY}[{index}].senders: {pattern} is routed by "
                        f"{ROUTES_KEY}[{earlier_index}] ({earlier.mailbox}) first"
                        " (first match wins)"
                    )
                    break
    return findings


def _covers(route: RouteSettings, pattern: str) -> bool:
    pattern = pattern.strip().lower()
    if pattern.startswith("*@"):
        return any(p.strip().lower() == pattern for p in route.patterns())
    return route.matches(pattern)

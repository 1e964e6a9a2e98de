"""What SIGHUP may change in a running daemon, and what needs a restart.

Limits, allowed clients, rate limits, retry timing and the log level are read afresh
for every new session or delivery, so a reload applies them without dropping a
connection or touching the queue. Settings that name a socket, a directory, the
upstream account or the token client are bound at start-up: changing them live would
orphan the queue or the token cache, so a reload keeps the running value and says
that a restart is needed. Routes likewise: their limits and ``send_as`` change live;
a change to which routes exist, their senders, token caches or transports needs a
restart (the whole ``routes`` list is kept then).
"""

from __future__ import annotations

import dataclasses

from relayd.config import SECTIONS, RouteSettings, Settings

EVERY_KEY = "*"

# Section → keys bound at start-up ("*": the whole section).
RESTART_ONLY: dict[str, tuple[str, ...]] = {
    "listen": ("address", "port"),
    "spool": (EVERY_KEY,),
    "upstream": (
        "transport",
        "host",
        "port",
        "tls",
        "mailbox",
        "ca_file",
        "maildir",
        "graph_url",  # the Graph client's session is made for one host
        "graph_large_messages",  # decides which permissions the token manager asks for
    ),
    "oauth": (EVERY_KEY,),
    "metrics": (EVERY_KEY,),
    "logging": ("format",),
}


def merge_reload(running: Settings, loaded: Settings) -> tuple[Settings, list[str]]:
    """The settings to run with after a reload, and the changed keys that were kept.

    ``loaded`` is a freshly validated configuration; every restart-only key in it that
    differs from ``running`` is replaced by the running value.
    """
    sections = {}
    kept: list[str] = []
    for name in SECTIONS:
        old, new = getattr(running, name), getattr(loaded, name)
        restart_only = RESTART_ONLY.get(name, ())
        keys = [f.name for f in dataclasses.fields(new)]
        if EVERY_KEY not in restart_only:
            keys = [key for key in keys if key in restart_only]
        running_values = {
            key: getattr(old, key) for key in keys if getattr(old, key) != getattr(new, key)
        }
        kept += [f"{name}.{key}" for key in running_values]
        sections[name] = dataclasses.replace(new, **running_values)
    routes = loaded.routes
    if _route_shape(running.routes) != _route_shape(loaded.routes):
        routes = running.routes
        kept.append("routes")
    return dataclasses.replace(loaded, **sections, routes=routes), kept


def _route_shape(routes: tuple[RouteSettings, ...]) -> list[tuple]:
    """What a running relay built from its routes: a scheduler, tokens and a transport
    each, and the sender patterns that choose between them."""
    return [(route.key, route.senders, route.token_cache, route.transport) for route in routes]

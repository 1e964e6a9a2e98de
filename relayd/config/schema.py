"""`relayd check-config --schema`: a JSON Schema of relayd.yaml, from the declarations.

Generated from the same dataclass fields the loader walks (each field's parser knows
the JSON shape it accepts: ``relayd.config.fields.schema_of``), so editors that
complete and check YAML against a schema (the YAML language server's
``# yaml-language-server: $schema=...``) know exactly the keys relayd knows. The
loader stays the judge: the schema is a little stricter in places (an integer given
as a quoted string passes the loader, not the schema) and cannot say everything
(``routes[N].mailbox`` must differ from ``upstream.mailbox``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from relayd.config.fields import schema_of
from relayd.config.routes import DESCRIPTIONS, ROUTES_KEY, RouteSettings

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema(sections: dict[str, type]) -> dict[str, Any]:
    """The schema of a whole relayd.yaml with ``sections`` (``relayd.config.SECTIONS``)."""
    properties = {name: _object(cls) for name, cls in sections.items()}
    properties[ROUTES_KEY] = {
        "type": ["array", "null"],
        "description": "further mailboxes, chosen by envelope sender (first match wins)",
        "items": _object(RouteSettings, ("mailbox",), DESCRIPTIONS),
    }
    return {
        "$schema": DIALECT,
        "title": "relayd.yaml",
        "description": "relayd configuration (relayd check-config validates it)",
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": properties,
    }


def print_schema(sections: dict[str, type]) -> int:
    """`relayd check-config --schema`: the schema on standard output."""
    print(json.dumps(json_schema(sections), indent=2))
    return 0


def _object(
    cls: type, required: tuple[str, ...] = (), descriptions: dict[str, str] | None = None
) -> dict[str, Any]:
    properties = {}
    for spec in dataclasses.fields(cls):
        schema = _nullable(schema_of(spec.metadata["parse"]))
        if descriptions and spec.name in descriptions:
            schema["description"] = descriptions[spec.name]
        default = _default(spec)
        if default is not None:
            schema["default"] = default
        properties[spec.name] = schema
    shaped: dict[str, Any] = {
        "type": "object" if required else ["object", "null"],
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        shaped["required"] = list(required)
    return shaped


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """An empty YAML value (``key:``) reads as null; text-like settings take it as ""."""
    kind = schema.get("type")
    if kind == "string":
        return {**schema, "type": ["string", "null"]}
    return schema


def _default(spec: dataclasses.Field) -> Any:
    value = spec.default
    if value is None or value is dataclasses.MISSING:
        return None
    show = spec.metadata.get("show")
    if show is not None:
        return show(value)
    return list(value) if isinstance(value, tuple) else value

"""`relayd check-config --schema`: the JSON Schema agrees with what the loader takes.

Checked with a small validator for the keywords the schema uses (type, enum,
properties, additionalProperties, required, items, minimum, maximum, exclusiveMinimum):
no JSON Schema library is needed for that, and none is added to the project for a test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import yaml

from relayd import config
from relayd.config.schema import json_schema
from tests.helpers import REPO

EXAMPLE = REPO / "config" / "relayd.example.yaml"
ROUTES = [
    {
        "mailbox": "notifications@contoso.example",
        "senders": ["noreply@contoso.example", "*@alerts.contoso.example"],
        "max_connections": 2,
    },
    {
        "mailbox": "hr@contoso.example",
        "senders": ["*@hr.contoso.example"],
        "send_as": ["jobs@contoso.example"],
        "transport": "graph",
        "token_cache": "/var/lib/relayd/hr.json",
        "rate_limit_per_minute": 20,
        "daily_recipient_limit": 5000,
    },
]
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def problems(schema: dict[str, Any], value: Any, where: str = "") -> list[str]:
    """Where ``value`` breaks ``schema``; [] when it conforms."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, kind) for kind in kinds):
            return [f"{where}: {value!r} is not {'/'.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    found = []
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not _in_range(schema, value):
        found.append(f"{where}: {value} out of range")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", ()):
            if key not in value:
                found.append(f"{where}.{key}: required")
        for key, item in value.items():
            if key in properties:
                found += problems(properties[key], item, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{where}.{key}: not allowed")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += problems(schema["items"], item, f"{where}[{index}]")
    return found


def _in_range(schema: dict[str, Any], number: float) -> bool:
    above = number > schema.get("exclusiveMinimum", number - 1)
    return above and schema.get("minimum", number) <= number <= schema.get("maximum", number)


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[kind])


def schema() -> dict[str, Any]:
    return json_schema(config.SECTIONS)


def test_the_shipped_example_conforms() -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    assert problems(schema(), document) == []


def test_routes_that_load_conform_and_bad_routes_do_not() -> None:
    document = {**yaml.safe_load(EXAMPLE.read_text()), "routes": ROUTES}
    document["upstream"]["mailbox"] = "relay@contoso.example"
    config.from_mapping(document, "relayd.yaml", environ={})  # the loader takes it
    assert problems(schema(), document) == []
    bad = [
        ({"senders": ["a@contoso.example"]}, ".routes[0].mailbox: required"),
        ({"mailbox": "a@contoso.example", "sender": []}, ".routes[0].sender: not allowed"),
        ({"mailbox": "a@contoso.example", "max_connections": 0}, "out of range"),
        ({"mailbox": "a@contoso.example", "transport": "fax"}, "not in"),
        ({"mailbox": "a@contoso.example", "senders": {"x": 1}}, "is not array"),
    ]
    for route, expected in bad:
        found = problems(schema(), {"routes": [route]})
        assert len(found) == 1 and expected in found[0], (route, found)


def test_a_wait_that_cannot_be_zero_is_out_of_range_in_the_schema_too() -> None:
    assert problems(schema(), {"listen": {"idle_timeout": 0}}) == [
        ".listen.idle_timeout: 0 out of range"
    ]
    assert problems(schema(), {"listen": {"idle_timeout": 1, "shutdown_grace": 0}}) == []


def test_every_declared_key_is_in_the_schema_with_its_default() -> None:
    properties = schema()["properties"]
    for name, section in config.redacted(config.Settings()).items():
        assert set(properties[name]["properties"]) == set(section), name
    assert properties["upstream"]["properties"]["max_connections"]["default"] == 3
    assert properties["retry"]["properties"]["max_age"]["default"] == "5d"
    route = properties["routes"]["items"]["properties"]
    assert set(route) == {
        "mailbox",
        "senders",
        "send_as",
        "token_cache",
        "transport",
        "max_connections",
        "rate_limit_per_minute",
        "daily_recipient_limit",
    }
    assert "default" not in route["max_connections"]  # upstream.max_connections, by default
    assert route["max_connections"]["description"] == "default: upstream.max_connections"
    assert all(item.get("description") for item in route.values())


def test_check_config_prints_it_without_a_configuration_file() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "--schema"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == schema()
    assert re.match(r"https://json-schema.org/", printed["$schema"])


def test_the_readmes_routes_example_loads_and_conforms() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Several mailboxes") :]
    block = section[
        section.index("```yaml\n") + 8 : section.index("```\n", section.index("```yaml"))
    ]
    example = yaml.safe_load(block)
    document = yaml.safe_load(EXAMPLE.read_text())
    document["upstream"].update(example["upstream"])
    document["routes"] = example["routes"]
    assert problems(schema(), document) == []
    settings = config.from_mapping(document, "README.md", environ={})
    assert [route.mailbox for route in settings.routes] == [
        "notifications@contoso.com",
        "hr@contoso.com",
    ]
    assert config.mailbox_for_sender(settings, "x@alerts.contoso.com") == (
        "notifications@contoso.com"
    )
    assert config.mailbox_for_sender(settings, "jobs@contoso.com") == "hr@contoso.com"
    assert config.mailbox_for_sender(settings, "x@sub.alerts.contoso.com") == "relay@contoso.com"

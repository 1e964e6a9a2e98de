"""plain_json_object: json.dumps's text for plain values, None for anything else."""

from __future__ import annotations

import enum
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.ops.jsonline import plain_json_object

PLAIN = st.one_of(
    st.text(),  # control characters, quotes, backslashes, non-ASCII
    st.integers(),
    st.floats(),  # NaN and the infinities included
    st.booleans(),
    st.none(),
)


@given(st.dictionaries(st.text(), PLAIN))
def test_plain_values_come_out_as_json_dumps_writes_them(fields: dict[str, Any]) -> None:
    assert plain_json_object(fields) == json.dumps(fields)


def test_the_special_floats_and_big_integers_are_jsons_own_words() -> None:
    fields = {"nan": float("nan"), "up": float("inf"), "down": float("-inf"), "big": 10**30}

    assert plain_json_object(fields) == json.dumps(fields)
    assert plain_json_object(fields) == (
        '{"nan": NaN, "up": Infinity, "down": -Infinity, "big": 1000000000000000000000000000000}'
    )


class Level(enum.IntEnum):
    INFO = 20


class Seconds(float):
    pass


@pytest.mark.parametrize(
    "value",
    [b"bytes", ["a list"], ("a", "tuple"), {"a": "dict"}, Level.INFO, Seconds(1.5), object()],
    ids=["bytes", "list", "tuple", "dict", "int enum", "float subclass", "object"],
)
def test_anything_but_a_plain_value_is_left_to_the_renderer(value: Any) -> None:
    assert plain_json_object({"queue_id": "Q1", "value": value}) is None


def test_a_key_that_is_not_a_string_is_left_to_the_renderer() -> None:
    assert plain_json_object({1: "one"}) is None  # type: ignore[dict-item]

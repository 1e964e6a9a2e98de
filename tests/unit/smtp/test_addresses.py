"""Addresses as the client wrote them, and EHLO names as relayd keeps them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.smtp.addresses import is_postmaster, printable_name, split_path, valid_recipient


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<a@example.com> SIZE=10", ("a@example.com", " SIZE=10")),
        ('<"a>b"@example.com> BODY=8BITMIME', ('"a>b"@example.com', " BODY=8BITMIME")),
        ('<"a\\">b"@example.com>', ('"a\\">b"@example.com', "")),  # \" stays in the quotes
        ('<"a\\\\">b"@example.com>', ('"a\\\\"', 'b"@example.com>')),  # \\ then the end quote
        ("<>", ("", "")),
        ('<"a>b', None),  # never closed
        ("<a@example.com", None),
    ],
)
def test_split_path_ends_at_the_bracket_outside_quotes(text: str, expected: object) -> None:
    # RFC 5321 §4.1.2: Quoted-string = DQUOTE *QcontentSMTP DQUOTE, "\" quotes one char.
    assert split_path(text) == expected


@pytest.mark.parametrize("name", ["postmaster", "Postmaster", "POSTMASTER"])
def test_postmaster_without_a_domain_is_a_recipient(name: str) -> None:
    assert is_postmaster(name) and valid_recipient(name, [])
    assert not is_postmaster(f"{name}@example.com")  # an ordinary address, checked as such
    assert not valid_recipient("postmistress", [])


@given(st.binary(max_size=60))
def test_printable_name_can_always_be_stored_and_shown(raw: bytes) -> None:
    # aiosmtpd decodes a command's argument with surrogateescape: invalid UTF-8 arrives as
    # lone surrogates, which the spool's JSON header could not encode (issue 12, item 11).
    name = printable_name(raw.decode("utf-8", "surrogateescape"))
    json.dumps(name, ensure_ascii=False).encode()
    assert name.isprintable()
    assert len(name) <= len(raw)


def test_printable_name_keeps_valid_utf8_and_marks_the_rest() -> None:
    assert printable_name("hôte.example") == "hôte.example"
    assert printable_name(b"h\xffst\x00\x1b[1m".decode("utf-8", "surrogateescape")) == "h?st??[1m"

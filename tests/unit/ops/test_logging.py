"""relayd.ops.logging: one pipeline for every logger, and no secret ever in its output.

The secrets are shaped like the real ones: a JWT access token as Entra ID issues it
for SMTP.Send, an opaque Microsoft refresh token ("0.AXoA…"), an Entra client secret
("…Q~…"), the base64 XOAUTH2 initial response, and the token endpoint's form body.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import logging
import secrets
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timezone
from typing import Any, ClassVar

import aiosmtplib
import pytest
import structlog
import structlog.testing
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.ops import logging as relay_logging
from tests.helpers import json_lines


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict[str, Any]) -> str:
    header = {"typ": "JWT", "alg": "RS256", "x5t": b64url(secrets.token_bytes(20))}
    parts = (json.dumps(header).encode(), json.dumps(claims).encode(), secrets.token_bytes(256))
    return ".".join(b64url(part) for part in parts)


MAILBOX = "relay@contoso.com"
ACCESS_TOKEN = make_jwt(
    {
        "aud": "https://outlook.office.com",
        "iss": "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
        "scp": "SMTP.Send",
        "upn": MAILBOX,
        "exp": 1893456000,
    }
)
ID_TOKEN = make_jwt({"preferred_username": MAILBOX, "oid": "00000000-0000-0000-66f3-3332eca7ea81"})
REFRESH_TOKEN = (
    "0.AXoAv4j5cvGGr0GRqy180BHbR"
    + b64url(secrets.token_bytes(120))
    + ".AgABAAEAAAD--DLA3VO7QrddgJg7WevrAgDs_wUA9P-"
    + b64url(secrets.token_bytes(400))
)
CLIENT_SECRET = "Xy48Q~" + b64url(secrets.token_bytes(26))[:34].replace("-", ".")
XOAUTH2 = base64.b64encode(f"user={MAILBOX}\x01auth=Bearer {ACCESS_TOKEN}\x01\x01".encode())
XOAUTH2 = XOAUTH2.decode()
FORM_BODY = urllib.parse.urlencode(
    {
        "client_id": "9a8b7c6d-0000-4000-8000-123456789abc",
        "grant_type": "refresh_token",
        "refresh_token": REFRESH_TOKEN,
        "client_secret": CLIENT_SECRET,
        "scope": "https://outlook.office.com/SMTP.Send offline_access openid profile",
        "client_info": "1",
    }
)
TOKEN_RESPONSE = json.dumps(
    {
        "token_type": "Bearer",
        "scope": "https://outlook.office.com/SMTP.Send",
        "expires_in": 4419,
        "access_token": ACCESS_TOKEN,
        "refresh_token": REFRESH_TOKEN,
        "id_token": ID_TOKEN,
        "client_info": b64url(b'{"uid":"00000000-0000-0000-66f3-3332eca7ea81","utid":"72f9"}'),
    }
)
SECRETS = {
    "access token": ACCESS_TOKEN,
    "id token": ID_TOKEN,
    "refresh token": REFRESH_TOKEN,
    "client secret": CLIENT_SECRET,
    "XOAUTH2 initial response": XOAUTH2,
}


def leaks(output: str) -> list[str]:
    """Which secrets show in the output, even in part (any 16 characters of one)."""
    found = []
    for name, secret in SECRETS.items():
        pieces = {secret[i : i + 16] for i in range(0, len(secret) - 16, 8)}
        quoted = {urllib.parse.quote(piece, safe="") for piece in pieces}
        if any(piece in output for piece in pieces | quoted):
            found.append(name)
    return found


@pytest.fixture
def capture() -> Iterator[Callable[..., io.StringIO]]:
    """configure() into a buffer; the process-wide logging state is put back after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_libraries = {
        name: logging.getLogger(name).level for name in relay_logging.LIBRARY_LOGGERS
    }

    def configure(fmt: str = "json", level: str = "debug") -> io.StringIO:
        stream = io.StringIO()
        relay_logging.configure(fmt, level, stream)
        return stream

    yield configure
    root.handlers[:], root.level = saved_handlers, saved_level
    for name, level in saved_libraries.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


# --- every route into the pipeline, every secret shape -----------------------------------

LEAKY_MESSAGES = [
    f"AUTH XOAUTH2 {XOAUTH2}",
    f"b'AUTH XOAUTH2 {XOAUTH2}\\r\\n'",
    f"user={MAILBOX}\x01auth=Bearer {ACCESS_TOKEN}\x01\x01",
    f"Authorization: Bearer {ACCESS_TOKEN}",
    f"POST https://login.microsoftonline.com/tenant/oauth2/v2.0/token body: {FORM_BODY}",
    f"token endpoint answered: {TOKEN_RESPONSE}",
    f"result: {json.loads(TOKEN_RESPONSE)!r}",
    f"refresh failed for {REFRESH_TOKEN}",
]
LOGGERS = ["relayd.delivery", "mail.log", "aiosmtplib", "msal.application", "urllib3"]


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("logger_name", LOGGERS)
def test_no_secret_reaches_the_output_from_any_logger(
    capture: Callable[..., io.StringIO], fmt: str, logger_name: str
) -> None:
    stream = capture(fmt)
    relay_logging.redactor.register(CLIENT_SECRET, permanent=True)
    for message in LEAKY_MESSAGES:
        if logger_name.startswith("relayd"):
            structlog.get_logger(logger_name).debug(message)
        else:
            logging.getLogger(logger_name).debug("%s", message)

    output = stream.getvalue()
    assert output.count("<redacted>") >= len(LEAKY_MESSAGES)
    assert logger_name in output  # the line came out, through this pipeline
    assert leaks(output) == []


def test_libraries_log_as_json_through_the_same_pipeline(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json")
    logging.getLogger("msal.token_cache").debug("event=%s", TOKEN_RESPONSE)
    logging.getLogger("mail.log").info("%r >> %r", ("127.0.0.1", 40000), b"EHLO app")

    records = json_lines(stream.getvalue())
    assert [r["logger"] for r in records] == ["msal.token_cache", "mail.log"]
    assert {r["level"] for r in records} == {"debug", "info"}
    assert all("ts" in r for r in records)
    assert leaks(stream.getvalue()) == []


def test_sensitive_fields_are_replaced_whole_even_nested(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json")
    opaque = secrets.token_hex(20)  # matches no pattern: only the key gives it away
    structlog.get_logger("relayd.tokens").info(
        "token refreshed",
        access_token=ACCESS_TOKEN,
        token=opaque,
        response={"refresh_token": REFRESH_TOKEN, "expires_in": 4419},
    )

    (record,) = json_lines(stream.getvalue())
    assert record["access_token"] == record["token"] == "<redacted>"
    assert record["response"] == {"refresh_token": "<redacted>", "expires_in": 4419}
    assert opaque not in stream.getvalue()


def test_a_registered_secret_is_found_before_json_escapes_it(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json")
    awkward = 'pa"ss\\wörd~' + secrets.token_hex(8)  # JSON would escape ", \ and ö
    relay_logging.redactor.register(awkward)
    structlog.get_logger("relayd.tokens").warning("login failed", detail=f"secret was {awkward}")
    logging.getLogger("msal").warning("form: client_secret=%s", urllib.parse.quote(awkward))

    output = stream.getvalue()
    for record in json_lines(output):
        assert awkward not in json.dumps(record, ensure_ascii=False)
    assert json.dumps(awkward)[1:-1] not in output
    assert urllib.parse.quote(awkward, safe="") not in output


def test_operational_fields_stay_readable(capture: Callable[..., io.StringIO]) -> None:
    stream = capture("json")
    fields = {
        "queue_id": "0614E8A2F3C1D4A1B2C",
        "code": "4.3.2",
        "reply": "432 4.3.2 Concurrent connections limit exceeded",
        "message_id": "<20240501.1234@app.example.com>",
        "sender": "app@example.com",
        "recipients": 3,
    }
    structlog.get_logger("relayd.delivery").info("deferred", **fields)

    (record,) = json_lines(stream.getvalue())
    assert {key: record[key] for key in fields} == fields
    assert list(record)[:4] == ["ts", "level", "logger", "event"]  # what a reader wants first


def test_an_authorization_code_in_a_redirect_is_redacted(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json")
    code = "1.AXoA" + b64url(secrets.token_bytes(48))
    logging.getLogger("msal").debug("Got auth response: /?code=%s&state=abc&session_state=x", code)

    assert code[:24] not in stream.getvalue()
    assert "state=abc" in stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("logger_name", ["relayd.tokens", "msal.application"])
def test_tracebacks_are_scrubbed(
    capture: Callable[..., io.StringIO], fmt: str, logger_name: str
) -> None:
    stream = capture(fmt)
    try:
        raise ValueError(f"bad grant {REFRESH_TOKEN} for {ACCESS_TOKEN}")
    except ValueError:
        if logger_name.startswith("relayd"):
            structlog.get_logger(logger_name).exception("refresh failed")
        else:
            logging.getLogger(logger_name).exception("refresh failed")

    output = stream.getvalue()
    assert "ValueError: bad grant <redacted>" in output
    assert leaks(output) == []


def test_a_record_that_cannot_be_formatted_does_not_print_its_arguments(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json")
    logging.getLogger("msal").warning("expires in %d seconds", REFRESH_TOKEN)  # %d of a str

    output = stream.getvalue()
    assert "could not be written" in output
    assert leaks(output) == []


def test_warnings_become_redacted_log_lines(capture: Callable[..., io.StringIO]) -> None:
    stream = capture("json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"token {ACCESS_TOKEN} is about to expire", UserWarning, stacklevel=1)

    (record,) = json_lines(stream.getvalue())
    assert record["logger"] == "py.warnings"
    assert leaks(stream.getvalue()) == []


def test_rotating_secrets_are_bounded_but_permanent_ones_stay() -> None:
    redactor = relay_logging.Redactor()
    redactor.register(CLIENT_SECRET, permanent=True)
    tokens = [secrets.token_hex(16) for _ in range(300)]
    for token in tokens:
        redactor.register(token)

    assert redactor(f"secret {CLIENT_SECRET}") == "secret <redacted>"
    assert redactor(f"newest {tokens[-1]}") == "newest <redacted>"
    assert redactor(f"oldest {tokens[0]}") == f"oldest {tokens[0]}"  # evicted


@pytest.mark.parametrize(
    "pattern", [pattern for pattern, _ in relay_logging._PATTERNS], ids=lambda p: p.pattern[:24]
)
def test_the_quick_pre_check_never_skips_a_line_a_pattern_matches(pattern) -> None:
    # The redactor skips its patterns when a line has none of their words; any text
    # that a pattern matches, wherever it sits in a line, must not be skipped.
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.from_regex(pattern, alphabet=st.characters(max_codepoint=127)))
    def check(text: str) -> None:
        if pattern.search(text):
            assert relay_logging._may_match_a_pattern(text)

    check()


_FIELD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from([ACCESS_TOKEN, REFRESH_TOKEN, CLIENT_SECRET, "Bearer abcdef123", "0.a1.b"]),
    st.builds(lambda a, b: a + CLIENT_SECRET + b, st.text(max_size=8), st.text(max_size=8)),
)
_FIELD_VALUE = st.one_of(_FIELD_TEXT, st.integers(), st.floats(), st.booleans(), st.none())


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(["queue_id", "token", "Refresh_Token", "event"]), st.text()),
        st.one_of(_FIELD_VALUE, st.lists(_FIELD_TEXT, max_size=2)),
        max_size=6,
    )
)
def test_an_event_scrubbed_at_one_look_comes_out_as_scrubbed_field_by_field(event) -> None:
    # redact_event looks at a plain event's strings together and skips the per-field
    # scrub when nothing would change: the result must be the field-by-field one.
    relay_logging.redactor.register(CLIENT_SECRET, permanent=True)
    assert relay_logging.redact_event(None, "info", event) == relay_logging._scrub(event)


# --- levels --------------------------------------------------------------------------------


def test_library_debug_lines_show_only_at_debug_level(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json", level="info")
    logging.getLogger("mail.log").info("session opened")  # library INFO: noise at info
    structlog.get_logger("relayd.app").debug("hidden")
    relay_logging.set_level("debug")
    logging.getLogger("mail.log").debug("shown")
    structlog.get_logger("relayd.app").debug("shown too")

    assert [r["event"] for r in json_lines(stream.getvalue())] == ["shown", "shown too"]


# --- a real XOAUTH2 exchange: aiosmtplib → aiosmtpd, everything at debug -----------------


class ExchangeLikeSMTP(AiosmtpdSMTP):
    # RFC 4954 §4: AUTH lines may be 12288 octets; a real access token needs > 512.
    # (A dict of its own: aiosmtpd's is shared by every SMTP instance in the process.)
    command_size_limits: ClassVar = collections.defaultdict(lambda: 12288)
    line_length_limit = 12288


class XOAuth2Handler:
    """A server that takes XOAUTH2 with or without an initial response."""

    async def auth_XOAUTH2(self, server: AiosmtpdSMTP, args: list[str]) -> AuthResult:
        if len(args) == 2:
            blob = base64.b64decode(args[1])
        else:  # RFC 4954 §4: no initial response; ask for it (and log it, at debug)
            blob = await server.challenge_auth("", log_client_response=True)
        return AuthResult(success=True, auth_data=blob)


async def test_an_xoauth2_exchange_at_debug_level_shows_no_token(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json", level="debug")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ExchangeLikeSMTP(XOAuth2Handler(), auth_require_tls=False),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
            await client.auth_xoauth2(MAILBOX, ACCESS_TOKEN)  # initial response inline
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
            await client.ehlo()
            assert (await client.execute_command(b"AUTH", b"XOAUTH2")).code == 334
            assert (await client.execute_command(XOAUTH2.encode())).code == 235
    finally:
        server.close()
        await server.wait_closed()

    output = stream.getvalue()
    library_lines = [r for r in json_lines(output) if r["logger"] in ("mail.log", "py.warnings")]
    assert any("AUTH XOAUTH2" in r["event"] for r in library_lines)
    assert any(">>" in r["event"] and "<redacted>" in r["event"] for r in library_lines)
    assert leaks(output) == []


def test_relayd_levels_change_at_runtime_and_per_logger(
    capture: Callable[..., io.StringIO],
) -> None:
    stream = capture("json", "warning")
    log = structlog.get_logger("relayd.test")
    log.info("hidden at warning")
    relay_logging.set_level("info")  # what SIGHUP does
    log.info("shown at info", queue_id="0123456789ABCDEF012")
    relay_logging.quiet_logger("relayd.quiet")
    structlog.get_logger("relayd.quiet").error("a quieted logger's error")
    relay_logging.quiet_logger("relayd.quiet", logging.NOTSET)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["shown at info"]
    assert records[0]["logger"] == "relayd.test" and records[0]["level"] == "info"
    assert list(records[0])[:4] == ["ts", "level", "logger", "event"]


# --- the per-message lines: structlog's line, written without structlog's round ---------

FROZEN = datetime(2026, 12, 3, 11, 28, 28, 123456, tzinfo=UTC)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways stamp the same instant (the chain's own TimeStamper, read twice)."""

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return FROZEN

    fake = type("datetime_module", (), {"datetime": Clock, "timezone": timezone})
    monkeypatch.setattr(structlog.processors, "datetime", fake)


class UsualWay:
    """Stands for a PerMessageLogger's structlog logger and counts the lines sent to it."""

    def __init__(self, logger: Any) -> None:
        self.logger, self.lines = logger, 0

    def info(self, event: str, **fields: Any) -> None:
        self.lines += 1
        self.logger.info(event, **fields)


def both_ways(
    capture: Callable[..., io.StringIO], fmt: str, event: str, fields: dict[str, Any]
) -> tuple[str, str, bool]:
    """The per-message logger's output, structlog's logger's for the same call, and
    whether the per-message logger went the usual way."""
    stream = capture(fmt, "info")
    logger = relay_logging.PerMessageLogger("relayd.listener")
    logger._usual = usual = UsualWay(logger._usual)  # type: ignore[assignment]
    logger.info(event, **fields)
    direct = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    structlog.get_logger("relayd.listener").info(event, **fields)
    return direct, stream.getvalue(), usual.lines == 1


RECEIVED = {
    "queue_id": "661B574ACECBD699754",
    "client": "127.0.0.1:53422",
    "sender": "billing@contoso.com",
    "recipients": 2,
    "size": 2231,
    "message_id": "<20261203071000.12345@app.contoso.com>",
}


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_received_line_is_written_directly_and_as_structlog_writes_it(
    capture: Callable[..., io.StringIO], frozen_clock: None, fmt: str
) -> None:
    direct, usual, went_the_usual_way = both_ways(capture, fmt, "received", RECEIVED)

    assert direct == usual
    assert not went_the_usual_way
    if fmt == "json":
        (record,) = json_lines(direct)
        assert list(record)[:5] == ["ts", "level", "logger", "event", "queue_id"]
        assert record["ts"] == "2026-12-03T11:28:28.123456Z"


def test_a_plain_json_line_is_written_without_the_renderers_round(
    capture: Callable[..., io.StringIO], frozen_clock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chain keeps its own renderer (the usual way uses it); only the direct way's
    # copy is replaced, so that a call to it shows.
    def renderer_called(*args: Any) -> str:
        raise AssertionError("the direct way ran the renderer for a plain line")

    stream = capture("json", "info")
    monkeypatch.setitem(relay_logging._CONFIGURED, "render", renderer_called)
    relay_logging.PerMessageLogger("relayd.listener").info("received", **RECEIVED)
    direct = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    structlog.get_logger("relayd.listener").info("received", **RECEIVED)

    assert direct == stream.getvalue()


@pytest.mark.parametrize(
    "value",
    ['say "hi"', "C:\\mail", "jürgen@contoso.com", "tab\there", "\x08earer abcdefghijkl"],
    ids=["a quote", "a backslash", "non-ASCII", "a control character", "a pattern by escaping"],
)
def test_a_json_line_with_an_escape_is_checked_and_rendered_as_before(
    capture: Callable[..., io.StringIO], frozen_clock: None, value: str
) -> None:
    direct, usual, _ = both_ways(capture, "json", "received", {**RECEIVED, "detail": value})

    assert direct == usual
    assert leaks(direct) == []


def test_a_pattern_made_by_json_escaping_is_scrubbed_on_the_direct_way(
    capture: Callable[..., io.StringIO], frozen_clock: None
) -> None:
    # JSON writes \x08 as "\b": the rendered line reads "\bearer <token>", which only
    # the scrub of the rendered line (the chain's last step, shared) catches.
    fields = {**RECEIVED, "detail": "\x08earer abcdefghijkl"}
    direct, usual, went_the_usual_way = both_ways(capture, "json", "received", fields)

    assert direct == usual
    assert not went_the_usual_way
    assert "abcdefghijkl" not in direct and "<redacted>" in direct


# Each of these sends the line the usual way: the direct one would write it otherwise.
UNUSUAL_FIELDS = {
    "a token-shaped value": {"detail": f"got {ACCESS_TOKEN}"},
    "a key-value secret": {"detail": f"refresh_token={REFRESH_TOKEN}"},
    "a sensitive key": {"access_token": "opaque-but-secret-value"},
    "a reserved key": {"level": "overridden"},
    "exc_info": {"exc_info": True},
    "a non-plain value": {"recipients": ["a@contoso.com"]},
    "bytes": {"data": b"AUTH XOAUTH2 " + XOAUTH2.encode()},
    "non-ASCII": {"sender": "jürgen@contoso.com"},
}


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("case", UNUSUAL_FIELDS)
def test_lines_that_need_the_processors_come_out_as_structlog_writes_them(
    capture: Callable[..., io.StringIO], frozen_clock: None, fmt: str, case: str
) -> None:
    fields = {**RECEIVED, **UNUSUAL_FIELDS[case]}
    direct, usual, went_the_usual_way = both_ways(capture, fmt, "received", fields)

    assert direct == usual
    assert went_the_usual_way
    assert leaks(direct) == []


def test_a_registered_secret_is_scrubbed_on_the_direct_way_too(
    capture: Callable[..., io.StringIO], frozen_clock: None
) -> None:
    opaque = secrets.token_hex(12)  # no pattern knows it: only the registration does
    relay_logging.redactor.register(opaque)
    fields = {**RECEIVED, "client": opaque}
    direct, usual, went_the_usual_way = both_ways(capture, "json", "received", fields)

    assert direct == usual
    assert went_the_usual_way
    assert opaque not in direct and "<redacted>" in direct


_KEYS = st.sampled_from(
    [
        "queue_id",
        "reply",
        "detail",
        "code",
        "refresh_token_age",
        "token",
        "password",
        "ts",
        "logger",
        "exc_info",
        "size",
    ]
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["Bearer abcdefghijkl", "code=" + "A" * 40, "0.AXoA" + "b" * 70, XOAUTH2]),
    st.text(alphabet='\x00\x08\x0c"\\ bearBEARcodeyJ0.A1xX', max_size=24),
)
_VALUES = st.one_of(
    _TEXT,
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.binary(max_size=8),
    st.lists(_TEXT, max_size=2),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(event=_TEXT, fields=st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_any_line_comes_out_as_structlog_writes_it(
    capture: Callable[..., io.StringIO],
    frozen_clock: None,
    event: str,
    fields: dict[str, Any],
) -> None:
    for fmt in ("json", "console"):
        direct, usual, _ = both_ways(capture, fmt, event, fields)
        assert direct == usual


def test_the_direct_way_follows_the_level_and_a_quieted_logger(
    capture: Callable[..., io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = capture("json", "warning")
    relay_logging.PerMessageLogger("relayd.listener").info("received", **RECEIVED)
    relay_logging.set_level("info")
    monkeypatch.setitem(relay_logging._logger_thresholds, "relayd.listener", logging.ERROR)
    relay_logging.PerMessageLogger("relayd.listener").info("received", **RECEIVED)
    relay_logging.PerMessageLogger("relayd.scheduler").info("delivered", queue_id="Q1")

    assert [r["logger"] for r in json_lines(stream.getvalue())] == ["relayd.scheduler"]


def test_events_captured_by_a_test_go_the_usual_way(capture: Callable[..., io.StringIO]) -> None:
    stream = capture("json", "info")
    with structlog.testing.capture_logs() as logs:
        relay_logging.PerMessageLogger("relayd.listener").info("received", **RECEIVED)
    assert logs == [{**RECEIVED, "event": "received", "log_level": "info"}]
    assert stream.getvalue() == ""


def test_structlog_context_variables_send_the_line_the_usual_way(
    capture: Callable[..., io.StringIO], frozen_clock: None
) -> None:
    structlog.contextvars.bind_contextvars(session="S1")
    try:
        direct, usual, went_the_usual_way = both_ways(capture, "json", "received", RECEIVED)
    finally:
        structlog.contextvars.clear_contextvars()
    assert direct == usual
    assert went_the_usual_way
    assert json_lines(direct)[0]["session"] == "S1"

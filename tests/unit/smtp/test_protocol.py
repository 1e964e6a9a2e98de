"""RelaySMTP.spawn(): a new connection's protocol without aiosmtpd's per-instance lookups."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from relayd.smtp.protocol import RelaySMTP
from tests.helpers import load_settings


async def test_spawned_protocols_share_settings_and_nothing_of_a_session(tmp_path: Path) -> None:
    handler = SimpleNamespace(settings=load_settings(tmp_path).listen)
    loop = asyncio.get_running_loop()
    template = RelaySMTP(handler, hostname="relay.test", data_size_limit=1000, loop=loop)
    first, second = template.spawn(), template.spawn()
    for protocol in (first, second):
        assert (protocol.hostname, protocol.data_size_limit) == ("relay.test", 1000)
        assert protocol.relay is handler and protocol.session is None
        # Command and built-in AUTH methods act on the new protocol, not on the template.
        assert protocol._smtp_methods["DATA"].__self__ is protocol
        assert protocol._auth_methods["PLAIN"].method.__self__ is protocol
    # asyncio's stream state (reader, the future that says the connection closed) is
    # each connection's own.
    assert first._stream_reader is not second._stream_reader
    assert first._stream_reader is not template._stream_reader
    assert first._closed is not second._closed
    assert first._stream_reader._limit == template._stream_reader._limit


async def test_a_spawned_protocol_resets_the_command_line_limits(tmp_path: Path) -> None:
    # aiosmtpd keeps them in a class attribute that EHLO raises (by 36 for MAIL with
    # SIZE and SMTPUTF8) and __init__ resets; a copy must reset them too, or MAIL's
    # 512-octet limit would grow with every session.
    handler = SimpleNamespace(settings=load_settings(tmp_path).listen)
    template = RelaySMTP(handler, hostname="relay.test", loop=asyncio.get_running_loop())
    try:
        for _ in range(100):
            protocol = template.spawn()
            protocol.command_size_limits["MAIL"] += 36  # what one EHLO does
        assert template.spawn().command_size_limits["MAIL"] == RelaySMTP.command_size_limit
    finally:
        RelaySMTP.command_size_limits.clear()

"""RelaySMTP's shortcuts say exactly what aiosmtplib's own code would: the cached
address quoting and the line-ending fast path (relayd.transports.session)."""

from __future__ import annotations

import ssl

import pytest
import trustme
from aiosmtplib.protocol import normalize_message_line_endings

from relayd.transports.session import RelaySMTP, _normalized
from tests.fakes.hostile import HostileUpstream

CONTENTS = [
    b"",
    b"a",
    b"a\r\n",
    b"a\r\nb\r\n",
    b"a\nb\n",
    b"a\rb\r",
    b"a\r\r\nb\r\n",
    b"a\r\n\nb\r\n",
    b"a\r\nb",
    b"\r\n",
    b"\r",
    b"\n\r",
    b"x\r\n" * 1000,
]


@pytest.mark.parametrize("content", CONTENTS)
def test_line_endings_as_aiosmtplib_makes_them(content: bytes) -> None:
    assert _normalized(content) == normalize_message_line_endings(content)


async def test_a_refused_address_is_refused_every_time(ca: trustme.CA) -> None:
    fake = await HostileUpstream(ca).start()
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        session = RelaySMTP(
            hostname=fake.host, port=fake.port, start_tls=True, tls_context=context, timeout=2
        )
        await session.connect()
        for _ in range(2):  # a ValueError is never cached as an answer
            with pytest.raises(ValueError):
                await session.mail("re lay@example.com")
        await session.mail("Relay <relay@example.com>")  # parsed as aiosmtplib parses it
        for _ in range(2):
            with pytest.raises(ValueError):
                await session.rcpt("us er@example.org")
        await session.rcpt("user@example.org")
        await session.rcpt("user@example.org")  # the cached quoting, same command
        reply = await session.data(b"Subject: x\r\n\r\nbody\r\n", timeout=1, reply_timeout=1)
        assert reply.code == 250
        assert fake.messages[0].mail_from == "relay@example.com"
        session.close()
    finally:
        await fake.stop()

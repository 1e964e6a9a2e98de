"""RelaySMTP's data phase against a real (hostile) server: the two waits and what each
failure means (relayd.transports.session)."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
import trustme

from relayd.transports import smtp as smtp_transport
from relayd.transports.pipelining import PipeliningProtocol
from relayd.transports.session import AmbiguousOutcome, DataCommandRefused, RelaySMTP
from tests.fakes.hostile import HostileUpstream
from tests.fakes.wire import server_tls_context

CONTENT = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n"


async def session_to(hostile: HostileUpstream, ca: trustme.CA) -> RelaySMTP:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    session = RelaySMTP(
        hostname=hostile.host, port=hostile.port, start_tls=True, tls_context=context, timeout=2
    )
    await session.connect()
    await session.mail("relay@example.com")
    await session.rcpt("user@example.org")
    return session


async def test_content_arrives_dot_stuffed_and_whole(hostile, ca) -> None:
    session = await session_to(hostile, ca)
    reply = await session.data(CONTENT, timeout=1, reply_timeout=1)
    assert reply.code == 250 and hostile.messages[0].content == CONTENT
    session.close()


async def test_the_final_reply_gets_its_own_wait(hostile, ca) -> None:
    hostile.final_reply_delay = 0.6
    session = await session_to(hostile, ca)
    reply = await session.data(CONTENT, timeout=0.2, reply_timeout=2)  # 0.2 s: DATA → 354
    assert reply.code == 250
    session.close()


async def test_no_final_reply_in_time_is_ambiguous_and_closes(hostile, ca) -> None:
    hostile.final_reply_delay = 2
    session = await session_to(hostile, ca)
    started = time.monotonic()
    with pytest.raises(AmbiguousOutcome) as raised:
        await session.data(CONTENT, timeout=1, reply_timeout=0.3)
    assert raised.value.timed_out and time.monotonic() - started < 1.5
    assert not session.is_connected and len(hostile.messages) == 1


async def test_refused_data_command_says_so_and_leaves_the_session_open(hostile, ca) -> None:
    hostile.refuse_data = "451 4.3.2 Please try again later"
    session = await session_to(hostile, ca)
    with pytest.raises(DataCommandRefused) as raised:
        await session.data(CONTENT, timeout=1, reply_timeout=1)
    assert raised.value.code == 451 and session.is_connected and hostile.messages == []
    session.close()


def test_final_reply_timeout_allows_for_the_upload() -> None:
    assert smtp_transport.final_reply_timeout(600, 0) == 600
    thirty_five_mib = 35 * 1024 * 1024
    # 32 KiB/s: a 35 MiB message gets 1120 s on top of the 10 minutes.
    assert smtp_transport.final_reply_timeout(600, thirty_five_mib) == pytest.approx(1720)


async def test_implicit_tls_connects_through_the_pipelining_protocol(ca) -> None:
    # upstream.tls: implicit. RelaySMTP sets up its own connection (for the protocol
    # that can pipeline): TLS from the first byte, the certificate checked, the greeting
    # read, and the session's protocol able to pipeline.
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 implicit.test ESMTP ready\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"QUIT"):
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            writer.write(b"250-implicit.test Hello\r\n250 PIPELINING\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls_context(ca))
    port = server.sockets[0].getsockname()[1]
    context = ssl.create_default_context()
    ca.configure_trust(context)
    session = RelaySMTP(
        hostname="127.0.0.1", port=port, use_tls=True, start_tls=False, tls_context=context
    )
    try:
        greeting = await session.connect(timeout=2)
        assert greeting.code == 220 and session.get_transport_info("ssl_object") is not None
        assert isinstance(session.protocol, PipeliningProtocol)
        await session.ehlo()
        assert session.supports_extension("pipelining")
        await session.quit()
    finally:
        server.close()
        await server.wait_closed()

"""PipeliningProtocol parses the replies of a group however the bytes are cut
(relayd.transports.pipelining): every reply in order, multi-line replies whole, and
what ends the reading early said as aiosmtplib would say it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.transports.pipelining import PipeliningProtocol

CODES = st.sampled_from([250, 251, 354, 421, 450, 451, 452, 501, 503, 550, 552, 554])
TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


class _Transport(asyncio.Transport):
    """Takes the group's write; the test plays the server's side."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written.extend(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _wire(reply: tuple[int, list[str]]) -> bytes:
    code, lines = reply
    *first, last = lines or [""]
    return b"".join(f"{code}-{line}\r\n".encode() for line in first) + f"{code} {last}\r\n".encode()


def _as_aiosmtplib_reads(reply: tuple[int, list[str]]) -> aiosmtplib.SMTPResponse:
    """The oracle: aiosmtplib's own parser, given the reply alone."""
    loop = asyncio.new_event_loop()
    try:
        reader = SMTPProtocol(loop=loop)
        reader._buffer.extend(_wire(reply))
        response = reader._read_response_from_buffer()
    finally:
        loop.close()
    assert response is not None
    return response


async def _group(
    replies: list[tuple[int, list[str]]], cuts: list[int], ending: str | None
) -> tuple[list[aiosmtplib.SMTPResponse], aiosmtplib.SMTPException | None, bytes]:
    loop = asyncio.get_running_loop()
    protocol = PipeliningProtocol(loop=loop)
    transport = _Transport()
    protocol.connection_made(transport)
    wire = b"".join(_wire(reply) for reply in replies)
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]

    async def server() -> None:
        for piece in pieces:
            await asyncio.sleep(0)
            protocol.data_received(piece)
        if ending == "eof":
            protocol.eof_received()
        elif ending == "lost":
            protocol.connection_lost(ConnectionResetError())

    count = len(replies) + (1 if ending else 0)  # one reply more than comes, if it ends early
    talking = asyncio.ensure_future(server())
    got, error = await protocol.execute_group(b"MAIL FROM:<a@b>\r\n", count, timeout=5)
    await talking
    return got, error, bytes(transport.written)


@settings(max_examples=300, deadline=None)
@given(
    replies=st.lists(st.tuples(CODES, st.lists(TEXT, min_size=1, max_size=4)), min_size=1),
    data=st.data(),
    ending=st.sampled_from([None, "eof", "lost"]),
)
def test_replies_come_whole_and_in_order_however_they_are_cut(replies, data, ending) -> None:
    wire_length = sum(len(_wire(reply)) for reply in replies)
    cuts = sorted(
        data.draw(st.sets(st.integers(1, max(1, wire_length - 1)), max_size=20), label="cuts")
    )
    cuts = [cut for cut in cuts if 0 < cut < wire_length]
    got, error, written = asyncio.run(_group(replies, cuts, ending))
    assert written == b"MAIL FROM:<a@b>\r\n"  # the whole group, in one write
    assert got == [_as_aiosmtplib_reads(reply) for reply in replies]
    if ending is None:
        assert error is None
    else:  # a reply short: said as aiosmtplib says a lost connection
        assert isinstance(error, aiosmtplib.SMTPServerDisconnected)


def test_a_reply_that_never_ends_is_cut_at_aiosmtplibs_bound() -> None:
    async def flood() -> aiosmtplib.SMTPException | None:
        loop = asyncio.get_running_loop()
        protocol = PipeliningProtocol(loop=loop)
        protocol.connection_made(_Transport())

        async def server() -> None:
            for _ in range(100):  # 100 × 1 KiB of one unfinished line: past the 32 KiB bound
                await asyncio.sleep(0)
                protocol.data_received(b"X" * 1024)

        talking = asyncio.ensure_future(server())
        got, error = await protocol.execute_group(b"RCPT TO:<a@b>\r\n", 2, timeout=5)
        talking.cancel()
        assert got == []
        return error

    error = asyncio.run(flood())
    assert isinstance(error, aiosmtplib.SMTPResponseException) and error.code == -1


def test_no_reply_in_time_is_a_read_timeout() -> None:
    async def silent() -> aiosmtplib.SMTPException | None:
        protocol = PipeliningProtocol(loop=asyncio.get_running_loop())
        protocol.connection_made(_Transport())
        got, error = await protocol.execute_group(b"MAIL FROM:<a@b>\r\n", 1, timeout=0.05)
        assert got == []
        return error

    assert isinstance(asyncio.run(silent()), aiosmtplib.SMTPReadTimeoutError)

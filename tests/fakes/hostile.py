"""A hostile upstream: a real SMTP submission server on loopback that misbehaves on cue.

Not aiosmtpd: a small hand-written server on asyncio streams, so that every byte it
sends (or does not send) is the test's choice. It speaks enough of RFC 5321 for
relayd's transport: greeting, EHLO, STARTTLS (RFC 3207, a trustme certificate),
AUTH XOAUTH2 (any token), MAIL, RCPT, DATA, RSET, NOOP, QUIT, and it keeps the
transaction state a real server keeps: a ``MAIL`` while a transaction is open gets
``503 5.5.1 Error: nested MAIL command`` (Postfix's words), which is what a client
that reuses a session without RSET after a refused DATA command meets.

The misbehaviours, each set on the instance:

* ``final_reply_delay``: the message is complete (and recorded) at the final dot,
  the reply comes this many seconds later, as from a busy Exchange;
* ``refuse_data``: the DATA command itself is refused with this reply (no 354); the
  transaction stays open;
* ``drop_after_dot``: the message is recorded, then the connection is closed
  without a reply;
* ``misreply[stage]``: at ``stage`` (greeting, ehlo, mail, rcpt, data, dot) answer
  with ``GARBAGE`` (bytes that are no SMTP reply), ``ENDLESS`` (a multi-line reply
  that never ends) or ``HUGE`` (one line of several MiB with no end), or close the
  connection instead of answering (``HANG_UP``); an ``ENDLESS`` or ``HUGE`` reply
  goes on until the client hangs up or a bound is reached;
* ``tls_stall``: answer ``220`` to STARTTLS, then never start the handshake;
* ``refuse_mail``, ``refuse_rcpt[address]``: refuse MAIL, or RCPT for that address,
  with this reply; RCPT without an accepted MAIL, and DATA without an accepted
  recipient, get Postfix's ``503`` (``data_without_recipients``: DATA gets ``354``
  even so, as RFC 2920 §3.1 warns a server may answer);
* ``pipelining``: EHLO offers PIPELINING (RFC 2920); ``hold_replies``: the replies
  to MAIL and RCPT wait until the DATA command has been read, then go in one write
  with DATA's (only a client that pipelines gets past MAIL); ``dribble``: every
  reply goes one byte per write.

What it saw: ``messages`` (every message whose final dot arrived, copies included),
``connections``, ``nested_mail`` (503s for a nested MAIL), ``resets`` (RSETs),
``data_commands`` (DATA commands read) and ``sent_bytes`` (every byte it wrote,
floods included).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.fakes.exchange import relay_config, server_tls_context

MAILBOX = "relay@example.com"
GARBAGE = "garbage"
ENDLESS = "endless"
HUGE = "huge"
HANG_UP = "hang up"
STAGES = ("greeting", "ehlo", "mail", "rcpt", "data", "dot")
ENDLESS_LIMIT = 64 * 1024 * 1024  # bytes; a bound for the fake's own loop, never reached
COMMAND_LIMIT = 4096


@dataclass(frozen=True)
class Received:
    mail_from: str
    recipients: tuple[str, ...]
    content: bytes
    connection: int


@dataclass
class _Transaction:
    mail_from: str | None = None
    recipients: list[str] = field(default_factory=list)


class HostileUpstream:
    """Start with ``await start()``; ``port`` is then the listening port."""

    def __init__(self, ca: trustme.CA, *, mailbox: str = MAILBOX, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self.mailbox = mailbox
        self.tls_context = server_tls_context(ca)
        self.final_reply_delay = 0.0
        self.refuse_data: str | None = None
        self.drop_after_dot = False
        self.misreply: dict[str, str] = {}
        self.tls_stall = False
        self.refuse_mail: str | None = None
        self.refuse_rcpt: dict[str, str] = {}
        self.data_without_recipients = False
        self.pipelining = False
        self.hold_replies = False
        self.dribble = False
        self.messages: list[Received] = []
        self.connections = 0
        self.nested_mail = 0
        self.resets = 0
        self.data_commands = 0
        self.sent_bytes = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> HostileUpstream:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def behave(self) -> None:
        """Back to a well-behaved server."""
        self.final_reply_delay = 0.0
        self.refuse_data = None
        self.drop_after_dot = False
        self.misreply.clear()
        self.tls_stall = False
        self.refuse_mail = None
        self.refuse_rcpt.clear()
        self.data_without_recipients = False
        self.hold_replies = False
        self.dribble = False

    def relay_config(self, ca_file: Path, **upstream: Any) -> dict:
        """Config overrides that point relayd at this server."""
        return relay_config(self.host, self.port, self.mailbox, ca_file, **upstream)

    # --- one connection ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        try:
            await _Connection(self, reader, writer, number).run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


class _Connection:
    def __init__(
        self,
        fake: HostileUpstream,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        self.fake = fake
        self.reader = reader
        self.writer = writer
        self.number = number
        self.tls = False
        self.transaction = _Transaction()
        self.held: list[bytes] = []  # replies waiting for the DATA command (hold_replies)

    async def run(self) -> None:
        if not await self._reply("greeting", "220 hostile.test ESMTP ready"):
            return
        while True:
            line = await self.reader.readline()
            if not line:
                return
            verb, _, argument = (
                line[:COMMAND_LIMIT].decode("utf-8", "replace").strip().partition(" ")
            )
            if not await self._command(verb.upper(), argument):
                return

    async def _command(self, verb: str, argument: str) -> bool:
        """Answer one command; False when the connection is over."""
        if verb in ("EHLO", "HELO"):
            return await self._reply("ehlo", self._ehlo_reply())
        if verb == "STARTTLS":
            return await self._starttls()
        if verb == "AUTH":
            return await self._send("235 2.7.0 Authentication successful")
        if verb == "MAIL":
            return await self._mail(argument)
        if verb == "RCPT":
            return await self._rcpt(_address(argument))
        if verb == "DATA":
            return await self._data()
        if verb == "RSET":
            self.fake.resets += 1
            self.transaction = _Transaction()
            return await self._send("250 2.0.0 Resetting")
        if verb == "NOOP":
            return await self._send("250 2.0.0 OK")
        if verb == "QUIT":
            await self._send("221 2.0.0 Bye")
            return False
        return await self._send("502 5.5.2 Error: command not recognized")

    def _ehlo_reply(self) -> str:
        offers = ["SIZE 157286400", "8BITMIME", "SMTPUTF8"]
        if self.fake.pipelining:
            offers.append("PIPELINING")
        offers.append("AUTH XOAUTH2" if self.tls else "STARTTLS")
        lines = ["hostile.test Hello", *offers]
        return "\r\n".join(f"250-{text}" for text in lines[:-1]) + f"\r\n250 {lines[-1]}"

    async def _starttls(self) -> bool:
        await self._send("220 2.0.0 Ready to start TLS")
        if self.fake.tls_stall:
            await asyncio.sleep(3600)  # never a handshake: the client's timeout must end it
            return False
        await self.writer.start_tls(self.fake.tls_context)
        self.tls = True
        return True

    async def _mail(self, argument: str) -> bool:
        if self.transaction.mail_from is not None:
            # RFC 5321 §4.1.4: MAIL may not be sent while a transaction is open.
            self.fake.nested_mail += 1
            return await self._send("503 5.5.1 Error: nested MAIL command")
        if self.fake.refuse_mail is not None:
            return await self._send(self.fake.refuse_mail, hold=True)
        self.transaction.mail_from = _address(argument)
        return await self._reply("mail", "250 2.1.0 Sender OK", hold=True)

    async def _rcpt(self, address: str) -> bool:
        if self.transaction.mail_from is None:
            return await self._send("503 5.5.1 Error: need MAIL command", hold=True)
        refusal = self.fake.refuse_rcpt.get(address)
        if refusal is not None:
            return await self._send(refusal, hold=True)
        self.transaction.recipients.append(address)
        return await self._reply("rcpt", "250 2.1.5 Recipient OK", hold=True)

    async def _data(self) -> bool:
        self.fake.data_commands += 1
        if self.fake.refuse_data is not None:
            return await self._send(self.fake.refuse_data)  # the transaction stays open
        if self.transaction.mail_from is None:
            return await self._send("503 5.5.1 Error: need MAIL command")
        if not self.transaction.recipients and not self.fake.data_without_recipients:
            return await self._send("503 5.5.1 Error: need RCPT command")
        if not await self._reply("data", "354 Start mail input; end with <CRLF>.<CRLF>"):
            return False
        content = await self._read_content()
        transaction, self.transaction = self.transaction, _Transaction()
        self.fake.messages.append(
            Received(
                mail_from=transaction.mail_from or "",
                recipients=tuple(transaction.recipients),
                content=content,
                connection=self.number,
            )
        )
        if self.fake.drop_after_dot:
            return False
        if self.fake.final_reply_delay:
            await asyncio.sleep(self.fake.final_reply_delay)
        return await self._reply("dot", f"250 2.0.0 OK <{len(self.fake.messages)}@hostile.test>")

    async def _read_content(self) -> bytes:
        lines: list[bytes] = []
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)  # RFC 5321 §4.5.2

    async def _reply(self, stage: str, normal: str, hold: bool = False) -> bool:
        """The normal reply at ``stage``, or the misbehaviour set for it."""
        mode = self.fake.misreply.get(stage)
        if mode is None:
            return await self._send(normal, hold)
        await self._write(b"".join(self.held))  # what was held goes before the misbehaviour
        self.held.clear()
        if mode == HANG_UP:
            return False
        if mode == GARBAGE:
            await self._write(b"\x00\xff\xfe this is no SMTP reply \x1b[2J\r\n")
            return True
        if mode == ENDLESS:
            await self._write_forever(b"250-and one more line of a reply that never ends\r\n")
        else:
            await self._write_forever(b"X" * 65536)  # one line, never a CRLF
        return False

    async def _write_forever(self, chunk: bytes) -> None:
        while self.fake.sent_bytes < ENDLESS_LIMIT:
            await self._write(chunk)

    async def _send(self, reply: str, hold: bool = False) -> bool:
        """Write ``reply``; with ``hold`` and ``hold_replies`` keep it for the next
        reply that is not held (DATA's), everything held going first."""
        self.held.append(reply.encode() + b"\r\n")
        if not (hold and self.fake.hold_replies):
            data = b"".join(self.held)
            self.held.clear()
            await self._write(data)
        return True

    async def _write(self, data: bytes) -> None:
        pieces = [data[i : i + 1] for i in range(len(data))] if self.fake.dribble else [data]
        for piece in pieces:
            self.writer.write(piece)
            self.fake.sent_bytes += len(piece)
            await self.writer.drain()


def _address(argument: str) -> str:
    """ "alice@x" from "FROM:<alice@x> SIZE=12" or "TO:<alice@x>"."""
    start, end = argument.find("<"), argument.find(">")
    return argument[start + 1 : end] if 0 <= start < end else ""


@pytest.fixture
async def hostile(ca: trustme.CA) -> AsyncIterator[HostileUpstream]:
    fake = await HostileUpstream(ca).start()
    yield fake
    await fake.stop()

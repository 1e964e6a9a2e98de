"""The SMTP protocol: aiosmtpd's, with the relay's overrides where aiosmtpd's own
behaviour is not what a relay may do: access control before the greeting, the null
sender and quoted local parts, DATA read and measured as RFC 5321 and RFC 1870 say,
EHLO names kept printable, no AUTH, reply wording, and 421 that closes.

relayd's rules live in ``RelayHandler``'s hooks (relayd.smtp.listener); this class
only speaks the protocol. Sessions begin on the fast path (relayd.smtp.fastpath) and
come here (``take_over``) at the first line it leaves to aiosmtpd. Every reply code
cites the RFC section that chose it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session, _AuthMechAttr, syntax

from relayd.smtp.addresses import printable_name, split_command_path
from relayd.smtp.content import READ_CHUNK, DataResult, check_data, read_data
from relayd.smtp.wording import safe_reply

if TYPE_CHECKING:
    from relayd.smtp.listener import RelayHandler


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP protocol with the relay's access control and DATA handling."""

    def __init__(self, handler: RelayHandler, **kwargs: Any) -> None:
        settings = handler.settings
        # aiosmtpd sizes its StreamReader from this attribute in __init__. DATA is read
        # in chunks of up to this size; command lines are still held to 512 octets.
        self.line_length_limit = max(READ_CHUNK, settings.max_line_length + 3)
        super().__init__(handler, **kwargs)
        self.relay = handler
        self.client_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self._idle_deadline = 0.0
        # A big message's parts after the first (DataResult.rest), for handle_DATA.
        self.data_rest: tuple[bytes | memoryview, ...] = ()
        self._taken_over = False  # from the fast path (take_over): already greeted
        self._skip_greeting = False

    # --- a protocol per connection -------------------------------------------------

    def spawn(self) -> RelaySMTP:
        """A protocol for a new connection, with this one's settings.

        aiosmtpd's ``__init__`` looks up its command, hook and AUTH methods with
        ``inspect.getmembers`` and ``dir`` on every instance: a third of the event
        loop's time with a new connection per message (bench/README.md). The result
        only depends on the class and the handler, so a new connection copies this
        instance's settings, binds the same methods to itself, and gets a stream
        reader of its own (asyncio's part of the state: never shared).
        """
        clone = object.__new__(type(self))
        clone.__dict__.update(self._settings_state())
        # aiosmtpd's command line limits are a class attribute that each EHLO raises
        # (SIZE, SMTPUTF8) and each new protocol clears: one session's EHLO raised
        # another's limits. Each session has its own here.
        clone.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        asyncio.StreamReaderProtocol.__init__(
            clone,
            asyncio.StreamReader(limit=self.line_length_limit, loop=self.loop),
            client_connected_cb=clone._cb_client_connected,
            loop=self.loop,
        )
        clone._smtp_methods = _BoundCommands(clone, self._command_names())
        clone._auth_methods = {
            name: _AuthMechAttr(getattr(clone, attr.method.__name__), True)
            if attr.is_builtin
            else attr
            for name, attr in self._auth_methods.items()
        }
        return clone

    def _command_names(self) -> dict[str, str]:
        """aiosmtpd's command table (name -> method), as method names: bound lazily."""
        names = self.__dict__.get("_spawn_commands")
        if names is None:
            names = {name: method.__name__ for name, method in self._smtp_methods.items()}
            self._spawn_commands = names
        return names

    def _settings_state(self) -> dict[str, Any]:
        """What SMTP.__init__ and ours set, without asyncio's per-connection state."""
        state = self.__dict__.get("_spawn_state")
        if state is None:
            reader = asyncio.StreamReader(loop=self.loop)
            probe = asyncio.StreamReaderProtocol(reader, loop=self.loop)
            state = {key: value for key, value in vars(self).items() if key not in vars(probe)}
            self._spawn_state = state
        return state

    # --- idle timeout ------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Called before every command. aiosmtpd cancels and schedules a timer each time;
        here a command only moves the deadline, and a timer that fires early sleeps again
        for the rest. Same timeout, one timer per session instead of one per command."""
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._idle_deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)
            return
        super()._timeout_cb()

    # --- connection --------------------------------------------------------------

    def take_over(self, transport: Any, session: Session, envelope: Envelope) -> None:
        """Go on with a session the fast path (relayd.smtp.fastpath) began: its HELO
        name and ESMTP state, its envelope so far; no second greeting."""
        self._taken_over = self._skip_greeting = True
        transport.set_protocol(self)
        self.connection_made(transport)
        self.session = session
        self.envelope = envelope
        if session.extended_smtp:
            # What smtp_EHLO adds to MAIL's line limit for SIZE and SMTPUTF8.
            self.command_size_limits["MAIL"] += 26 * bool(self.data_size_limit) + 10

    async def _handle_client(self) -> None:
        """Refuse a client before the greeting when it may not use the relay."""
        assert self.session is not None
        self.client_address = peer_address(self.session.peer)  # parsed once per session
        refusal = None if self._taken_over else self.relay.connection_refusal(self)
        if refusal:
            with contextlib.suppress(ConnectionError):
                await self.push(refusal)
            if self.transport is not None:
                self.transport.close()
            return
        self.relay.session_opened(self)
        try:
            await super()._handle_client()
        finally:
            self.relay.session_closed(self)

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd's push (write the reply line, log it at debug level, drain), with
        the reply made safe; one call less for each of the seven replies a message
        with its own connection gets."""
        raw = status.encode("utf-8", "replace") if isinstance(status, str) else status
        if self._skip_greeting:
            self._skip_greeting = False
            return  # aiosmtpd's greeting (its first reply): the fast path gave it
        reply = safe_reply(raw)
        self._writer.write(reply + b"\r\n")
        if _AIOSMTPD_LOG.isEnabledFor(logging.DEBUG):
            _AIOSMTPD_LOG.debug("%r << %r", self.session and self.session.peer, reply)
        await self._writer.drain()
        if raw.startswith(b"421") and self.transport is not None:
            # RFC 5321 §3.8: a server that answers 421 closes the channel; a client that
            # sent another command would otherwise have it answered (250 to a NOOP).
            self.transport.close()

    # --- greeting and AUTH ---------------------------------------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        await super().smtp_HELO(printable_name(hostname) if hostname else hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        # The name is kept printable before anything stores it (envelope, Received:):
        # a byte that is not UTF-8 once broke the spool's group commit for every
        # session of the batch. Accepted and shown as "?" (Postfix's printable()); we
        # differ from Postfix with smtputf8_enable=yes, which answers "500 5.5.2 bad
        # UTF-8 syntax", because the name is only trace information (RFC 5321 §4.1.4:
        # a server must not refuse mail for what the EHLO name says).
        # smtp_EHLO adds SIZE's 26 and SMTPUTF8's 10 octets to MAIL's line limit at
        # every EHLO; RFC 1870 §3 and RFC 6531 §3.4 add them once (and the fast path
        # hands a session over with them once).
        if hostname:
            self.command_size_limits.clear()
        await super().smtp_EHLO(printable_name(hostname) if hostname else hostname)

    async def smtp_AUTH(self, arg: str) -> None:
        # relayd offers no AUTH (clients are allowed by address). RFC 5321 §4.2.4: 502
        # command not implemented, as Postfix without SASL (unimpl_cmd). aiosmtpd's
        # "538 5.7.11 Encryption required" would suggest that TLS makes it work.
        await self.push(
            "502 5.5.1 AUTH is not offered: this relay takes mail from allowed"
            " clients (listen.allowed_clients) without authentication"
        )

    # --- envelope ----------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Split "<address> params" as the client wrote it, without reinterpreting it.

        aiosmtpd's RFC 5322 parser is lenient (it turns <a b@x> into "a b"@x) and
        refuses the null reverse-path <> that bounces must use (RFC 5321 §4.5.5).
        The MAIL/RCPT hooks validate the raw text and answer with the right code.
        """
        return split_command_path(arg)

    # --- DATA ----------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Send RCPT TO before DATA")
            return
        if arg:
            await self.push("501 5.5.4 DATA takes no arguments")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        result = await self._read_data()
        if result.problem is None:
            self.envelope.content = self.envelope.original_content = result.content
            self.data_rest = result.rest
            try:
                status = await self._call_handler_hook("DATA")
            finally:
                self.data_rest = ()
        else:
            status = self.relay.refuse_data(result.problem)
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self) -> DataResult:
        limit = self.data_size_limit or 0
        content = await read_data(self._reader, limit)
        if content is None:
            return DataResult(b"", "too_big")
        settings = self.relay.settings
        result = await check_data(content, settings.bare_line_endings, settings.max_line_length)
        del content  # the checked copy is what is kept
        if limit and result.size > limit:  # bare line ends made CRLF grew it
            return DataResult(b"", "too_big")
        return result


def peer_address(peer: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    return _parsed_address(peer[0])


@functools.lru_cache(maxsize=1024)
def _parsed_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parsed once per client address, not once per connection (ipaddress is slow, and
    the same few applications connect again for every message)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class _BoundCommands(Mapping[str, Any]):
    """aiosmtpd's command table for one protocol: each method bound when the command
    is looked up (once per command) rather than all of them for every connection."""

    __slots__ = ("_names", "_owner")

    def __init__(self, owner: RelaySMTP, names: dict[str, str]) -> None:
        self._owner = owner
        self._names = names

    def __getitem__(self, name: str) -> Any:
        return getattr(self._owner, self._names[name])

    def get(self, name: str, default: Any = None) -> Any:
        attribute = self._names.get(name)
        return default if attribute is None else getattr(self._owner, attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_AIOSMTPD_LOG = logging.getLogger("mail.log")
_LOG_METHOD_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_library_sanitized_log = aiosmtpd.smtp.sanitized_log


def _sanitized_log_when_enabled(func: Callable[..., None], msg: Any, *args: Any, **kw: Any) -> None:
    """aiosmtpd's sanitized_log, skipped when its logger would drop the line anyway.

    aiosmtpd runs every command line through a regular expression (to hide AUTH
    credentials) for two log calls per command, before the logger decides to print
    nothing: relayd keeps "mail.log" at WARNING unless it runs at debug level. Same
    lines, same sanitizing, whenever the level lets them through."""
    logger = getattr(func, "__self__", None)
    level = _LOG_METHOD_LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level and not logger.isEnabledFor(level):
        return
    _library_sanitized_log(func, msg, *args, **kw)


# aiosmtpd's command loop looks the function up in its module at every call.
aiosmtpd.smtp.sanitized_log = _sanitized_log_when_enabled

"""HTTP on metrics.address:metrics.port: /metrics, /healthz and /readyz.

aiohttp's HTTP server, the library relayd's Graph client uses too (one HTTP library in
both directions), on the daemon's own event loop: one request per connection, GET and
HEAD only. aiohttp parses; a thin guard in front of each connection keeps the limits
the endpoint has always had, so a slow or hostile client can neither hold it nor grow
the daemon's memory: the request head bounded in size (MAX_REQUEST_BYTES in all,
MAX_HEADER_LINES lines: 431) and in time (REQUEST_TIMEOUT: 408, and as long again to
take the answer), and at most MAX_CONNECTIONS connections (503 beyond; a flood of
twice as many is cut off without a word).

- ``/metrics``: the Prometheus text format, or OpenMetrics when the scraper asks for it
  (``Accept``), gzip when accepted.
- ``/healthz``: 200 as long as the event loop answers (liveness).
- ``/readyz``: 200 once the listener is bound and the spool recovered, else 503, with
  a JSON body an operator can read. Auth or upstream trouble does not make the relay
  unready: it still accepts and queues mail, which is what readiness is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = structlog.get_logger("relayd.health")

MAX_REQUEST_BYTES = 8192  # request line + headers; Prometheus sends a few hundred
MAX_HEADER_LINES = 64
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0  # seconds to send the request head, and again to take the answer
LINGER_BYTES = 65536  # what a refused client may still send before we hang up
_METHODS = ("GET", "HEAD")
# aiohttp logs a malformed request with its traceback at ERROR; the client gets its 400
# and the daemon's log stays about mail.
_AIOHTTP_LOG = logging.getLogger("relayd.health.aiohttp")
_AIOHTTP_LOG.addHandler(logging.NullHandler())
_AIOHTTP_LOG.propagate = False


@dataclass
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


# --- readiness -------------------------------------------------------------------------


class QueueCounts(Protocol):
    """The spool's counters as /readyz reads them (relayd.queue.census.Census)."""

    messages: dict[str, int]

    @property
    def pending(self) -> int: ...

    def oldest_age(self, now: float) -> float: ...


class CountedQueue(Protocol):
    def census(self) -> QueueCounts: ...


class RelayState(Protocol):
    """What /readyz reads from the running relay (relayd.app.Relay)."""

    ready: bool
    phase: str
    spool: CountedQueue


def readiness_report(relay: RelayState) -> tuple[bool, dict[str, Any]]:
    """(ready?, the JSON body for /readyz).

    Queue figures are left out until the spool is recovered: before that the
    counters describe a half-scanned directory. ``auth`` and ``circuit`` are null
    when the daemon runs without a token manager or a scheduler (maildir transport).
    """
    tokens = getattr(relay, "tokens", None)
    scheduler = getattr(relay, "scheduler", None)
    circuit_open = getattr(scheduler, "circuit_open", None) if scheduler else None
    body: dict[str, Any] = {
        "ready": bool(relay.ready),
        "phase": relay.phase,
        "auth": getattr(tokens, "state", None) if tokens else None,
        "circuit": None if circuit_open is None else ("open" if circuit_open else "closed"),
        "queue": None,
    }
    mailboxes = getattr(relay, "mailbox_report", None)
    if callable(mailboxes):
        report = mailboxes()
        if report:  # a relay with routes: every mailbox's auth state and circuit
            body["mailboxes"] = report
    if relay.phase in ("ready", "stopping"):
        census = relay.spool.census()
        body["queue"] = {
            "depth": census.pending,
            "oldest_age_seconds": round(census.oldest_age(time.time()), 3),
            "messages": census.messages,
        }
    return body["ready"], body


# --- server ----------------------------------------------------------------------------


class HealthServer:
    """Serves /metrics, /healthz and /readyz until ``stop()``."""

    def __init__(
        self,
        address: str,
        port: int,
        *,
        registry: CollectorRegistry,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        before_scrape: Callable[[], None] = lambda: None,
        request_timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.address = address
        self.port = port
        self.registry = registry
        self.readiness = readiness
        self.before_scrape = before_scrape
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._http: web.Server | None = None
        self._guards: set[_Guard] = set()
        self._routes: dict[str, Callable[[web.BaseRequest], Any]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    @property
    def bound_port(self) -> int:
        """The port actually bound (differs from ``port`` when that is 0)."""
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    @property
    def connection_count(self) -> int:
        """Connections open now, served or being refused."""
        return len(self._guards)

    async def start(self) -> None:
        self._http = web.Server(
            self._handle,
            max_line_size=MAX_REQUEST_BYTES,
            max_field_size=MAX_REQUEST_BYTES,
            max_headers=MAX_HEADER_LINES,
            keepalive_timeout=0,  # one request per connection
            lingering_time=self.request_timeout,
            access_log=None,
            logger=_AIOHTTP_LOG,
        )
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._connection, self.address, self.port)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            where = f"{self._url_host()}:{self.port}"
            raise OSError(
                error.errno, f"metrics.address/metrics.port: cannot listen on {where}: {reason}"
            ) from None
        log.info("health endpoint listening", url=f"http://{self._url_host()}:{self.bound_port}")

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for guard in list(self._guards):  # hang up on clients still sending
            guard.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None

    # --- connections -------------------------------------------------------------

    def _connection(self) -> asyncio.Protocol:
        assert self._http is not None
        return _Guard(self, self._http())

    def opened(self, guard: _Guard) -> str:
        """A new connection: "serve", "busy" (answer 503) or "drop" (a flood)."""
        self._guards.add(guard)
        if len(self._guards) > 2 * self.max_connections:
            return "drop"
        return "busy" if len(self._guards) > self.max_connections else "serve"

    def closed(self, guard: _Guard) -> None:
        self._guards.discard(guard)

    # --- requests ------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._respond(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Server"] = "relayd"
        response.force_close()  # one request per connection keeps state away
        log.debug("http request", method=request.method, path=request.path, status=response.status)
        return response

    async def _respond(self, request: web.BaseRequest) -> web.Response:
        route = self._routes.get(request.path)
        if route is None:
            return _text(HTTPStatus.NOT_FOUND, "not found; try /metrics, /healthz or /readyz\n")
        if request.method not in _METHODS:
            response = _text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD\n")
            response.headers["Allow"] = ", ".join(_METHODS)
            return response
        try:
            return await route(request)
        except Exception:
            log.exception("health endpoint failed", path=request.path)
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")

    # --- routes ------------------------------------------------------------------

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        self.before_scrape()
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        # Collecting reads /proc and renders every series: a thread keeps the loop free.
        body = await asyncio.to_thread(encoder, self.registry)
        response = web.Response(status=HTTPStatus.OK, body=body)
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            response.body = gzip.compress(body)
            response.headers["Content-Encoding"] = "gzip"
        response.headers["Content-Type"] = content_type
        return response

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        return _text(HTTPStatus.OK, "ok\n")

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        ready, body = self.readiness()
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        response = web.Response(status=status, body=json.dumps(body).encode() + b"\n")
        response.headers["Content-Type"] = "application/json"
        return response

    def _url_host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address


def _head_problem(head: bytes) -> str | None:
    """Why a complete request head is refused before aiohttp sees it (RFC 9112 §3, §5):
    aiohttp accepts more (absolute targets, HTTP/0.9, bytes beyond ASCII) and answers
    what it refuses with the request line echoed back."""
    if not head.isascii():
        return "request head is not ASCII"
    request_line, *fields = head.decode("ascii").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return "malformed request line"
    if not parts[1].startswith("/"):
        return "request target must be a path"
    for line in fields:
        name, colon, _ = line.partition(":")
        if line and (not colon or not name or name != name.strip()):
            return "malformed header line"
    return None


def _text(status: HTTPStatus, text: str) -> web.Response:
    response = web.Response(status=status, body=text.encode())
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    return response


def _canned(status: HTTPStatus, text: str) -> bytes:
    """A refusal sent before aiohttp has a request to answer (limits, busy)."""
    body = text.encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
    )
    return head.encode() + body


class _Guard(asyncio.Protocol):
    """In front of aiohttp's protocol for one connection: counts the connection, bounds
    the request head in bytes, lines and time, and bounds the time to take the answer.

    Bytes are handed to aiohttp only once the head so far is within its budget, so a
    refused request never reaches it; a refusal is written here, then the connection
    half-closes and drops what the client still sends (a close with unread input
    resets the connection, and the reset can overtake the answer).
    """

    def __init__(self, owner: HealthServer, inner: asyncio.Protocol) -> None:
        self.owner, self.inner = owner, inner
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()  # the request head so far, until its blank line
        self._head_done = False
        self._refused = False
        self._discarded = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        verdict = self.owner.opened(self)
        if verdict == "drop":
            transport.abort()  # type: ignore[attr-defined]
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.owner.request_timeout, self._timed_out
        )
        if verdict == "busy":
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n")
            return
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.abort()
            return
        if self._head_done:
            self.inner.data_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        head = self._head if end < 0 else self._head[: end + 4]
        if len(head) > MAX_REQUEST_BYTES or head.count(b"\n") > MAX_HEADER_LINES + 1:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large\n")
        elif end >= 0:
            self._head_done = True
            self._restart_timer()  # now as long again to send the answer
            problem = _head_problem(bytes(head))
            if problem:
                self._refuse(HTTPStatus.BAD_REQUEST, f"{problem}\n")
                return
            received, self._head = bytes(self._head), bytearray()
            self.inner.data_received(received)

    def eof_received(self) -> bool | None:
        if self._refused:
            self.abort()
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.closed(self)
        if self._timer is not None:
            self._timer.cancel()
        if not self._refused or self._forwarded():
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # --- limits ------------------------------------------------------------------------

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _forwarded(self) -> bool:
        return getattr(self.inner, "transport", None) is not None

    def _restart_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.owner.request_timeout, self.abort)

    def _timed_out(self) -> None:
        if self._head_done or self._refused:
            self.abort()
        else:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, "request timeout\n")

    def _refuse(self, status: HTTPStatus, text: str) -> None:
        assert self.transport is not None
        self._refused = True
        self.transport.write(_canned(status, text))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
        self._restart_timer()

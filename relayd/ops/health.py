"""HTTP on metrics.address:metrics.port: /metrics, /healthz and /readyz.

A deliberately small HTTP/1.x server on the daemon's own event loop (asyncio
streams): one request per connection, GET and HEAD only, the request head bounded in
size and in time, and a bounded number of connections, so a slow or hostile client
can neither hold the endpoint nor grow the daemon's memory.

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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

log = structlog.get_logger("relayd.health")

MAX_REQUEST_BYTES = 8192  # request line + headers; Prometheus sends a few hundred
MAX_HEADER_LINES = 64
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0  # seconds to send the request head, and again to take the answer
LINGER_BYTES = 65536  # what a refused client may still send before we hang up
_METHODS = ("GET", "HEAD")


class BadRequest(Exception):
    """The request head cannot be understood; answered with ``status``."""

    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


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
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._routes: dict[str, Callable[[Request], Any]] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }

    @property
    def bound_port(self) -> int:
        """The port actually bound (differs from ``port`` when that is 0)."""
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.address, self.port, limit=MAX_REQUEST_BYTES
            )
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
        # Hang up on clients still sending (cancelling their tasks instead makes
        # asyncio's stream callback log a spurious CancelledError in Python 3.11).
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None

    # --- connections -------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= 2 * self.max_connections:
            writer.transport.abort()  # a flood: not even a refusal
            return
        self._connections[task] = writer
        try:
            if len(self._connections) > self.max_connections:
                await self._reply(reader, writer, _text(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n"))
            else:
                await self._serve(reader, writer)
        finally:
            del self._connections[task]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(_read_request(reader), self.request_timeout)
        except TimeoutError:
            timeout = _text(HTTPStatus.REQUEST_TIMEOUT, "request timeout\n")
            await self._reply(reader, writer, timeout)
            return
        except BadRequest as error:
            await self._reply(reader, writer, _text(error.status, f"{error}\n"))
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()  # the client went away before finishing its request
            return
        response = await self._respond(request)
        log.debug("http request", method=request.method, path=request.path, status=response.status)
        await self._reply(reader, writer, response, head_only=request.method == "HEAD")

    async def _reply(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: Response,
        head_only: bool = False,
    ) -> None:
        """Send and close, within the timeout: a client that does not read is cut off."""
        try:
            await asyncio.wait_for(_send(reader, writer, response, head_only), self.request_timeout)
        except TimeoutError:
            writer.transport.abort()

    async def _respond(self, request: Request) -> Response:
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

    async def _metrics(self, request: Request) -> Response:
        self.before_scrape()
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        # Collecting reads /proc and renders every series: a thread keeps the loop free.
        body = await asyncio.to_thread(encoder, self.registry)
        response = Response(HTTPStatus.OK, body, content_type)
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            response.body = gzip.compress(body)
            response.headers["Content-Encoding"] = "gzip"
        return response

    async def _healthz(self, request: Request) -> Response:
        return _text(HTTPStatus.OK, "ok\n")

    async def _readyz(self, request: Request) -> Response:
        ready, body = self.readiness()
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return Response(status, json.dumps(body).encode() + b"\n", "application/json")

    def _url_host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address


# --- HTTP/1.x framing --------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> Request:
    """Read the request line and headers (RFC 9112 §2-§5); any body is ignored."""
    head = _HeadReader(reader)
    parts = (await head.line()).split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, _ = parts
    if not target.startswith("/"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "request target must be a path")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await head.line()
        if not line:
            return Request(method, target.split("?", 1)[0], headers)
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
        headers[name.lower()] = value.strip()
    raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header lines")


class _HeadReader:
    """Lines of a request head, at most MAX_REQUEST_BYTES in all (the stream's own
    limit bounds one line; this bounds their sum)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.remaining = MAX_REQUEST_BYTES

    async def line(self) -> str:
        too_large = BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        try:
            raw = await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise too_large from None
        self.remaining -= len(raw)
        if self.remaining < 0:
            raise too_large
        try:
            return raw.rstrip(b"\r\n").decode("ascii")
        except UnicodeDecodeError:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "request head is not ASCII") from None


def _text(status: HTTPStatus, text: str) -> Response:
    return Response(status, text.encode())


async def _send(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    response: Response,
    head_only: bool = False,
) -> None:
    """Write the response and close: one request per connection keeps state away."""
    headers = {
        "Content-Type": response.content_type,
        "Content-Length": str(len(response.body)),
        "Connection": "close",
        "Cache-Control": "no-store",
        **response.headers,
    }
    head = f"HTTP/1.1 {response.status.value} {response.status.phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    try:
        writer.write(head.encode() + (b"" if head_only else response.body))
        await writer.drain()
        await _linger(reader, writer)
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then drop what the client still sends until it closes too.

    Closing a socket with unread input resets the connection, and the reset can
    overtake the answer (a refusal sent before the request was read, like 431 or
    "busy"). The caller's timeout bounds the wait; LINGER_BYTES bounds the reading.
    """
    if not writer.can_write_eof():
        return
    writer.write_eof()
    discarded = 0
    while discarded < LINGER_BYTES:
        chunk = await reader.read(4096)
        if not chunk:
            return
        discarded += len(chunk)

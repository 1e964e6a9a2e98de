"""relayd.ops.health: the HTTP endpoint, over real loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import relayd
from relayd.ops.health import MAX_REQUEST_BYTES, HealthServer, readiness_report
from relayd.ops.metrics import Metrics
from relayd.queue.model import Envelope, new_queue_id
from relayd.queue.spool import Spool
from tests.helpers import Scrape


class Readiness:
    """What the relay would answer; the test flips it."""

    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"ready": self.ready, "phase": "ready" if self.ready else "recovering"}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), process=False)


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


async def start_server(metrics: Metrics, readiness: Readiness, **kwargs: Any) -> HealthServer:
    server = HealthServer("127.0.0.1", 0, registry=metrics.registry, readiness=readiness, **kwargs)
    await server.start()
    return server


@pytest.fixture
async def server(metrics: Metrics, readiness: Readiness) -> AsyncIterator[HealthServer]:
    server = await start_server(metrics, readiness)
    yield server
    await server.stop()


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse_response(raw)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str, method: str = "GET", **headers: str) -> tuple[int, dict, bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return await exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode())


# --- routes ------------------------------------------------------------------------------


async def test_metrics_serves_the_registry_in_prometheus_text_format(
    server: HealthServer, metrics: Metrics
) -> None:
    metrics.messages_received.inc(3)
    metrics.message_size.observe(2048)

    status, headers, body = await get(server.bound_port, "/metrics")

    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert headers["content-length"] == str(len(body))
    scrape = Scrape(body.decode())
    assert scrape.value("relayd_messages_received_total") == 3
    assert scrape.value("relayd_message_size_bytes_count") == 1
    assert scrape.value("relayd_message_size_bytes_sum") == 2048
    assert scrape.value("relayd_build_info", version=relayd.__version__) == 1
    assert metrics.registry.get_sample_value("relayd_messages_received_total") == 3


async def test_metrics_speaks_openmetrics_and_gzip_when_asked(server: HealthServer) -> None:
    status, headers, body = await get(
        server.bound_port,
        "/metrics",
        Accept="application/openmetrics-text; version=1.0.0; charset=utf-8",
        Accept_Encoding="gzip",
    )

    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert headers["content-encoding"] == "gzip"
    text = gzip.decompress(body).decode()
    assert text.rstrip().endswith("# EOF")
    assert "relayd_messages_received_total 0.0" in text


async def test_metrics_runs_the_before_scrape_hook(metrics: Metrics, readiness: Readiness) -> None:
    def refresh() -> None:
        metrics.queue_messages.labels("incoming").set(7)

    server = await start_server(metrics, readiness, before_scrape=refresh)
    try:
        _, _, body = await get(server.bound_port, "/metrics?name[]=ignored")
    finally:
        await server.stop()

    assert Scrape(body.decode()).value("relayd_queue_messages", state="incoming") == 7


async def test_healthz_answers_while_not_ready(server: HealthServer) -> None:
    status, headers, body = await get(server.bound_port, "/healthz")

    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"


async def test_readyz_follows_readiness_with_a_json_body(
    server: HealthServer, readiness: Readiness
) -> None:
    status, headers, body = await get(server.bound_port, "/readyz")
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"ready": False, "phase": "recovering"}

    readiness.ready = True
    status, _, body = await get(server.bound_port, "/readyz")
    assert status == 200
    assert json.loads(body)["ready"] is True


async def test_head_sends_the_headers_without_a_body(server: HealthServer) -> None:
    _, get_headers, get_body = await get(server.bound_port, "/healthz")
    status, headers, body = await get(server.bound_port, "/healthz", method="HEAD")

    assert status == 200
    assert body == b""
    assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))


# --- refusals ----------------------------------------------------------------------------


async def test_unknown_path_is_404(server: HealthServer) -> None:
    status, _, body = await get(server.bound_port, "/admin")

    assert status == 404
    assert b"/metrics" in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_405_with_allow(server: HealthServer, method: str) -> None:
    status, headers, _ = await get(server.bound_port, "/readyz", method=method)

    assert status == 405
    assert headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "request_head",
    [
        b"HELLO\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics SMTP/1.0\r\n\r\n",
        b"GET http://example.com/metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX-Bytes: \xff\xfe\r\n\r\n",
    ],
)
async def test_malformed_requests_are_400(server: HealthServer, request_head: bytes) -> None:
    status, _, _ = await exchange(server.bound_port, request_head)

    assert status == 400


@pytest.mark.parametrize(
    "request_head",
    [
        # One header line longer than the whole budget.
        b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n",
        # Many lines, each small, that add up to more than the budget.
        b"GET /metrics HTTP/1.1\r\n"
        + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 1000) for n in range(10))
        + b"\r\n",
        # More header lines than allowed.
        b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n",
    ],
)
async def test_oversized_request_heads_are_431(server: HealthServer, request_head: bytes) -> None:
    status, _, _ = await exchange(server.bound_port, request_head)

    assert status == 431


async def test_a_slow_client_is_cut_off_with_408(metrics: Metrics, readiness: Readiness) -> None:
    server = await start_server(metrics, readiness, request_timeout=0.2)
    try:
        # Half a request and then silence: the server must not wait for the rest.
        status, _, _ = await exchange(server.bound_port, b"GET /metrics HTTP/1.1\r\n", timeout=10)
    finally:
        await server.stop()

    assert status == 408


async def test_connections_beyond_the_limit_get_503_and_stop_closes_idle_ones(
    metrics: Metrics, readiness: Readiness
) -> None:
    server = await start_server(metrics, readiness, max_connections=2, request_timeout=60)
    idle = [await asyncio.open_connection("127.0.0.1", server.bound_port) for _ in range(2)]
    try:
        await asyncio.sleep(0)  # let the server accept both
        for _ in range(100):  # bounded: until both idle connections are being served
            if server.connection_count == 2:
                break
            await asyncio.sleep(0.01)
        status, _, body = await get(server.bound_port, "/healthz")
        assert (status, body) == (503, b"busy\n")

        await asyncio.wait_for(server.stop(), 10)

        for reader, _ in idle:  # the server hung up on them instead of waiting 60 s
            assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        for _, writer in idle:
            writer.close()


async def test_a_busy_port_is_reported_with_the_config_keys(
    server: HealthServer, metrics: Metrics, readiness: Readiness
) -> None:
    second = HealthServer(
        "127.0.0.1", server.bound_port, registry=metrics.registry, readiness=readiness
    )
    with pytest.raises(OSError, match=r"metrics\.address/metrics\.port: cannot listen on"):
        await second.start()


# --- the /readyz body --------------------------------------------------------------------


def relay_state(spool: Spool, phase: str, **extra: Any) -> SimpleNamespace:
    return SimpleNamespace(spool=spool, phase=phase, ready=phase == "ready", **extra)


async def test_readiness_report_leaves_out_queue_figures_until_recovered(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    ready, body = readiness_report(relay_state(spool, "recovering"))

    assert ready is False
    assert body == {
        "ready": False,
        "phase": "recovering",
        "auth": None,
        "circuit": None,
        "queue": None,
    }


async def test_readiness_report_shows_queue_auth_and_circuit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    envelope = Envelope(sender="a@example.com", recipients=("b@example.com",))
    await spool.commit(new_queue_id(), envelope, b"Subject: x\r\n\r\nbody\r\n")
    relay = relay_state(
        spool,
        "ready",
        tokens=SimpleNamespace(state="reauth_required"),
        scheduler=SimpleNamespace(circuit_open=True),
    )

    ready, body = readiness_report(relay)

    # Broken auth and an open circuit do not make the relay unready: it still queues.
    assert ready is True
    assert body["auth"] == "reauth_required"
    assert body["circuit"] == "open"
    assert body["queue"]["depth"] == 1
    assert body["queue"]["messages"]["incoming"] == 1
    assert body["queue"]["oldest_age_seconds"] >= 0

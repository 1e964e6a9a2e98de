"""Every Prometheus metric relayd exports, defined in one place on an injected registry.

Labels only ever take values from small fixed sets (reasons, states, status-code
classes): never an address, a message id or anything a client can choose.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from relayd import __version__
from relayd.ops.auth_states import AUTH_STATES as TOKEN_STATES
from relayd.ops.auth_states import NOT_USED

AUTH_STATES = (*TOKEN_STATES, NOT_USED)
MAILBOX_LABEL = "mailbox"  # relayd.config.Settings.default_mailbox or a route's mailbox
# The metrics about one upstream mailbox: labelled by it in a relay with routes.
PER_MAILBOX = (
    "messages_delivered",
    "recipients_delivered",
    "messages_deferred",
    "messages_failed",
    "dsn_sent",
    "delivery_duration",
    "upstream_ambiguous",
    "deliveries_paused",
    "upstream_connections",
    "upstream_replies",
    "upstream_circuit_open",
    "rate_limit_tokens",
    "daily_recipients_used",
    "auth_healthy",
    "auth_state",
    "access_token_expiry",
    "refresh_token_rotated",
    "token_refresh",
    "messages_held",
    "graph_responses",
    "upstream_transport",
    "transport_switches",
)
HEALTHY_AUTH_STATES = ("ok", "refreshing", NOT_USED)

# Fixed label values. Anything else is folded into "other".
REJECT_REASONS = (
    "access_denied",
    "too_many_connections",
    "too_big",
    "too_many_recipients",
    "bad_address",
    "smuggling",
    "line_too_long",
    "loop",
    "disk",
    "spool_error",
    "sender_policy",
)
QUEUE_STATES = ("incoming", "active", "deferred", "hold", "failed")
HELD_REASONS = ("too_big",)  # relayd.transports.base.HELD_REASONS (below it in the layers)

_ENHANCED_CODE = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = tuple(2**n for n in range(10, 27, 2))  # 1 KiB … 64 MiB


class Recording:
    """How the metrics are told things; shared by ``Metrics`` and a mailbox's view."""

    messages_rejected: Any
    upstream_replies: Any
    graph_responses: Any
    upstream_transport: Any
    auth_state: Any
    auth_healthy: Any

    def reject(self, reason: str) -> None:
        self.messages_rejected.labels(reason if reason in REJECT_REASONS else "other").inc()

    def upstream_reply(self, code: int, message: str) -> None:
        # Once per delivered message at least: the labelled child is looked up once
        # per code class (prometheus_client keeps it; nothing here removes children).
        label = enhanced_code_class(code, message)
        children = self.__dict__.setdefault("_reply_children", {})
        child = children.get(label)
        if child is None:
            child = children[label] = self.upstream_replies.labels(label)
        child.inc()

    def graph_response(self, status: int | None) -> None:
        self.graph_responses.labels(graph_status_label(status)).inc()

    def using_transport(self, name: str) -> None:
        for known in ("smtp", "graph"):
            self.upstream_transport.labels(known).set(1 if known == name else 0)

    def set_auth_state(self, state: str) -> None:
        for known in AUTH_STATES:
            self.auth_state.labels(known).set(1 if known == state else 0)
        self.auth_healthy.set(1 if state in HEALTHY_AUTH_STATES else 0)

    def _precreate(self) -> None:
        """Series that exist before anything happens (alerts see 0, not nothing)."""
        for reason in HELD_REASONS:
            self.messages_held.labels(reason)  # type: ignore[attr-defined]
        for destination in ("smtp", "graph"):
            self.transport_switches.labels(destination)  # type: ignore[attr-defined]
        self.set_auth_state("no_token")


class Metrics(Recording):
    """Holds the metric objects. Create one per process (or per test) with a registry.

    ``per_mailbox`` (a relay with ``routes:``): the metrics about one upstream
    mailbox (deliveries, pauses, replies, tokens, limits, connections, breaker) carry a
    ``mailbox`` label, one value per configured route, and each route records through
    ``for_mailbox(name)``. Without it they have no such label, as with one mailbox.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        process: bool = True,
        per_mailbox: bool = False,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_mailbox = per_mailbox
        self._views: dict[str, MailboxMetrics] = {}
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

        Info("relayd_build", "relayd version", registry=r).info({"version": __version__})

        # Accepting
        self.messages_received = Counter(
            "relayd_messages_received", "Messages accepted and queued (250 sent)", registry=r
        )
        self.messages_rejected = Counter(
            "relayd_messages_rejected",
            "Messages or sessions refused by the listener, by reason",
            ["reason"],
            registry=r,
        )
        self.accept_duration = Histogram(
            "relayd_accept_duration_seconds",
            "End of DATA to the 250 reply (includes the durable spool commit)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.message_size = Histogram(
            "relayd_message_size_bytes",
            "Size of accepted messages",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.smtp_sessions = Gauge("relayd_smtp_sessions", "Open client SMTP sessions", registry=r)

        # Delivering
        self.messages_delivered = Counter(
            "relayd_messages_delivered",
            "Messages delivered to every recipient, each counted once, when it is done",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.recipients_delivered = Counter(
            "relayd_recipients_delivered",
            "Recipients the upstream accepted a message for, each counted once",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.messages_deferred = Counter(
            "relayd_messages_deferred",
            "Delivery attempts deferred, by reason",
            self._mailbox_labels("reason"),
            registry=r,
        )
        self.messages_failed = Counter(
            "relayd_messages_failed",
            "Messages failed permanently, by reason",
            self._mailbox_labels("reason"),
            registry=r,
        )
        self.dsn_sent = Counter(
            "relayd_dsn_sent",
            "Delivery status notifications queued to senders",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.delivery_duration = Histogram(
            "relayd_delivery_duration_seconds",
            "Upstream SMTP transaction time per message",
            buckets=DELIVERY_BUCKETS,
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.upstream_ambiguous = Counter(
            "relayd_upstream_ambiguous",
            "Messages whose final reply never came (connection lost, timed out or"
            " unreadable after the final dot): they may have been delivered; sent again",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.deliveries_paused = Gauge(
            "relayd_deliveries_paused",
            "1 for the reason no delivery starts now (throttled, connection, timeout, auth,"
            " daily_limit, quota, mailbox_full, account_restricted, tenant_blocked)",
            self._mailbox_labels("reason"),
            registry=r,
        )
        self.upstream_connections = Gauge(
            "relayd_upstream_connections",
            "Open upstream SMTP connections",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.upstream_replies = Counter(
            "relayd_upstream_replies",
            "Upstream replies by enhanced status code (e.g. 2.0.0, 4.3.2, 5.7.3)",
            self._mailbox_labels("code"),
            registry=r,
        )
        self.upstream_circuit_open = Gauge(
            "relayd_upstream_circuit_open",
            "1 while deliveries are paused because the upstream throttles or is down",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.rate_limit_tokens = Gauge(
            "relayd_rate_limit_tokens",
            "Messages that may be sent now under the rate limit",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.daily_recipients_used = Gauge(
            "relayd_daily_recipients_used",
            "Recipients sent in the last 24 hours",
            labelnames=self._mailbox_labels(),
            registry=r,
        )

        # Queue
        self.queue_messages = Gauge(
            "relayd_queue_messages", "Messages in the queue, by state", ["state"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "relayd_queue_oldest_message_age_seconds",
            "Age of the oldest message waiting for delivery (incoming, active, deferred;"
            " held messages wait for the operator and do not count); 0 when none waits",
            registry=r,
        )
        self.queue_bytes = Gauge(
            "relayd_queue_bytes", "Bytes of queue files, failed ones excluded", registry=r
        )

        # Tokens
        self.auth_healthy = Gauge(
            "relayd_auth_healthy",
            "1 when a usable access token can be obtained",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.auth_state = Gauge(
            "relayd_auth_state",
            "1 for the current auth state",
            self._mailbox_labels("state"),
            registry=r,
        )
        self.access_token_expiry = Gauge(
            "relayd_access_token_expiry_timestamp_seconds",
            "Unix time the cached access token expires",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.refresh_token_rotated = Gauge(
            "relayd_refresh_token_last_rotated_timestamp_seconds",
            "Unix time the refresh token was last redeemed and replaced",
            labelnames=self._mailbox_labels(),
            registry=r,
        )
        self.token_refresh = Counter(
            "relayd_token_refresh",
            "Token refresh attempts by result",
            self._mailbox_labels("result"),
            registry=r,
        )

        # Microsoft Graph (upstream.transport graph or auto)
        self.messages_held = Counter(
            "relayd_messages_held",
            "Messages moved to hold/ for an operator, by reason (too_big: over Graph's"
            " request limit with no other way to send it)",
            self._mailbox_labels("reason"),
            registry=r,
        )
        self.graph_responses = Counter(
            "relayd_graph_responses",
            "Microsoft Graph HTTP answers by status (error: no answer)",
            self._mailbox_labels("status"),
            registry=r,
        )
        self.upstream_transport = Gauge(
            "relayd_upstream_transport",
            "1 for the way mail leaves now (smtp or graph; auto moves between them)",
            self._mailbox_labels("transport"),
            registry=r,
        )
        self.transport_switches = Counter(
            "relayd_upstream_transport_switches",
            "Moves of upstream.transport auto between SMTP and Graph, by destination",
            self._mailbox_labels("to"),
            registry=r,
        )
        for state in QUEUE_STATES:
            self.queue_messages.labels(state)
        for reason in REJECT_REASONS:
            self.messages_rejected.labels(reason)
        if not per_mailbox:
            self._precreate()

    def _mailbox_labels(self, *names: str) -> list[str]:
        return [*names, MAILBOX_LABEL] if self.per_mailbox else list(names)

    def for_mailbox(self, mailbox: str) -> Metrics | MailboxMetrics:
        """What one route records through: its view (``mailbox`` label set to its
        name), or these metrics themselves when they are not per mailbox."""
        if not self.per_mailbox:
            return self
        if mailbox not in self._views:
            self._views[mailbox] = MailboxMetrics(self, mailbox)
        return self._views[mailbox]


class _Bound:
    """One per-mailbox metric with its ``mailbox`` label filled in: ``labels(...)``
    takes the other labels, as the metric without the mailbox label would."""

    def __init__(self, metric: Any, mailbox: str) -> None:
        self._metric, self._mailbox = metric, mailbox

    def labels(self, *values: str) -> Any:
        return self._metric.labels(*values, self._mailbox)

    def __getattr__(self, name: str) -> Any:  # inc, set, observe of an unlabelled one
        return getattr(self._metric.labels(self._mailbox), name)


class MailboxMetrics(Recording):
    """One route's metrics: the per-mailbox ones bound to its name, the rest shared."""

    def __init__(self, metrics: Metrics, mailbox: str) -> None:
        self._metrics = metrics
        self.mailbox = mailbox
        self.registry = metrics.registry
        for name in PER_MAILBOX:
            setattr(self, name, _Bound(getattr(metrics, name), mailbox))
        self._precreate()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metrics, name)


# Graph's answers that mean something to relayd; any other is counted by its class.
GRAPH_STATUSES = (200, 201, 202, 204, 400, 401, 403, 404, 413, 429, 500, 503, 504)


def graph_status_label(status: int | None) -> str:
    if status is None:
        return "error"
    if status in GRAPH_STATUSES:
        return str(status)
    return f"{str(status)[:1]}xx" if 100 <= status < 600 else "other"


def enhanced_code_class(code: int, message: str) -> str:
    """ "5.7.3" from "535 5.7.3 Authentication unsuccessful"; "4.x.x" when absent.

    The subject and detail are each at most three digits (RFC 3463), so the label has
    a bounded set of values even when a server says something unusual.
    """
    match = _ENHANCED_CODE.match(message or "")
    if match and match.group(1) == str(code)[:1]:
        return f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"
    first = str(code)[:1] if code else "0"
    return f"{first}.x.x" if first in "245" else "other"

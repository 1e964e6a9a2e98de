"""relayd.ops.metrics: the registry's real values, bounded labels, reply-code classes."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import relayd
from relayd.ops.auth_states import AUTH_STATES
from relayd.ops.metrics import QUEUE_STATES, REJECT_REASONS, Metrics, enhanced_code_class

# Label names whose values come from fixed sets; an address or a message id as a
# label would give every message its own time series.
# status: Graph's answers folded into GRAPH_STATUSES or a class; transport and to:
# smtp or graph.
BOUNDED_LABELS = {"reason", "state", "code", "result", "version", "status", "transport", "to"}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry(), process=False)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_fresh_registry_already_has_the_series_alerts_look_at(metrics: Metrics) -> None:
    for state in QUEUE_STATES:
        assert value(metrics, "relayd_queue_messages", state=state) == 0
    for reason in REJECT_REASONS:
        assert value(metrics, "relayd_messages_rejected_total", reason=reason) == 0
    assert value(metrics, "relayd_messages_received_total") == 0
    assert value(metrics, "relayd_upstream_circuit_open") == 0
    assert value(metrics, "relayd_build_info", version=relayd.__version__) == 1


def test_process_metrics_are_optional() -> None:
    with_process = Metrics(CollectorRegistry())
    without = Metrics(CollectorRegistry(), process=False)

    assert with_process.registry.get_sample_value("process_resident_memory_bytes") > 0
    assert without.registry.get_sample_value("process_resident_memory_bytes") is None


def test_unknown_reject_reasons_fold_into_other(metrics: Metrics) -> None:
    metrics.reject("too_big")
    metrics.reject("client typed <someone@example.com>")

    assert value(metrics, "relayd_messages_rejected_total", reason="too_big") == 1
    assert value(metrics, "relayd_messages_rejected_total", reason="other") == 1


@pytest.mark.parametrize("state", AUTH_STATES)
def test_auth_state_is_one_hot_and_drives_auth_healthy(metrics: Metrics, state: str) -> None:
    metrics.set_auth_state(state)

    for known in AUTH_STATES:
        assert value(metrics, "relayd_auth_state", state=known) == (1 if known == state else 0)
    healthy = value(metrics, "relayd_auth_healthy")
    assert healthy == (1 if state in ("ok", "refreshing") else 0)


def test_auth_starts_as_no_token(metrics: Metrics) -> None:
    assert value(metrics, "relayd_auth_state", state="no_token") == 1
    assert value(metrics, "relayd_auth_healthy") == 0


@pytest.mark.parametrize(
    "code, message, expected",
    [
        (250, "2.0.0 OK <DB9PR01MB1234@eurprd01.prod.exchangelabs.com> [Hostname=X]", "2.0.0"),
        (235, "2.7.0 Authentication successful", "2.7.0"),
        (432, "4.3.2 Concurrent connections limit exceeded", "4.3.2"),
        (535, "5.7.3 Authentication unsuccessful [AM0PR02CA0001.eurprd02.prod]", "5.7.3"),
        (535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication disabled", "5.7.139"),
        (554, "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x@y", "5.2.252"),
        (421, "Service not available, closing transmission channel", "4.x.x"),
        (250, "5.0.0 a class that contradicts the reply code", "2.x.x"),
        (452, "4.3.2000 too many digits to be an enhanced code", "4.x.x"),
        (550, "", "5.x.x"),
        (0, "no reply at all", "other"),
        (999, "9.9.9 nonsense", "other"),
    ],
)
def test_enhanced_code_class(code: int, message: str, expected: str) -> None:
    assert enhanced_code_class(code, message) == expected


def test_upstream_replies_are_counted_by_class(metrics: Metrics) -> None:
    metrics.upstream_reply(432, "4.3.2 Concurrent connections limit exceeded")
    metrics.upstream_reply(432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")

    assert value(metrics, "relayd_upstream_replies_total", code="4.3.2") == 2


def test_every_label_is_one_with_a_bounded_set_of_values(metrics: Metrics) -> None:
    wrappers = [item for item in vars(metrics).values() if isinstance(item, MetricWrapperBase)]
    assert len(wrappers) >= 20  # every metric the issue lists is an attribute

    labels = {name for wrapper in wrappers for name in wrapper._labelnames}
    assert labels <= BOUNDED_LABELS, labels - BOUNDED_LABELS


def test_registries_are_independent() -> None:
    first, second = Metrics(CollectorRegistry(), process=False), Metrics(process=False)
    first.messages_received.inc()

    assert value(first, "relayd_messages_received_total") == 1
    assert value(second, "relayd_messages_received_total") == 0


def test_graph_status_labels_are_a_bounded_set() -> None:
    from relayd.ops.metrics import GRAPH_STATUSES, graph_status_label

    labels = {graph_status_label(status) for status in [None, *range(0, 1000)]}
    assert labels == {str(s) for s in GRAPH_STATUSES} | {"1xx", "2xx", "3xx", "4xx", "5xx"} | {
        "other",
        "error",
    }

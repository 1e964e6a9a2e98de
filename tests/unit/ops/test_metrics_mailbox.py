"""The mailbox label: only with routes, on the per-mailbox metrics, one value per route."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from relayd.ops.metrics import PER_MAILBOX, Metrics


def label_names(metrics: Metrics) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(family.name, set()).update(sample.labels)
    return names


def test_without_routes_no_metric_has_a_mailbox_label() -> None:
    metrics = Metrics(CollectorRegistry(), process=False)
    assert metrics.for_mailbox("relay@contoso.example") is metrics
    assert not any("mailbox" in labels for labels in label_names(metrics).values())
    metrics.messages_deferred.labels("auth").inc()  # as every caller does today
    assert metrics.registry.get_sample_value("relayd_messages_deferred_total", {"reason": "auth"})


def test_with_routes_each_route_records_under_its_own_mailbox() -> None:
    metrics = Metrics(CollectorRegistry(), process=False, per_mailbox=True)
    hr, default = metrics.for_mailbox("hr@contoso.example"), metrics.for_mailbox("relay@c.example")
    assert metrics.for_mailbox("hr@contoso.example") is hr  # one view per route
    hr.messages_deferred.labels("auth").inc()
    hr.messages_delivered.inc(2)
    default.messages_delivered.inc()
    hr.set_auth_state("reauth_required")
    default.set_auth_state("ok")
    hr.upstream_reply(432, "4.3.2 Concurrent connections limit exceeded")
    hr.delivery_duration.observe(0.2)
    value = metrics.registry.get_sample_value
    assert value("relayd_messages_delivered_total", {"mailbox": "hr@contoso.example"}) == 2
    assert value("relayd_messages_delivered_total", {"mailbox": "relay@c.example"}) == 1
    assert value(
        "relayd_messages_deferred_total", {"reason": "auth", "mailbox": "hr@contoso.example"}
    )
    assert value("relayd_auth_healthy", {"mailbox": "hr@contoso.example"}) == 0
    assert value("relayd_auth_healthy", {"mailbox": "relay@c.example"}) == 1
    assert value(
        "relayd_upstream_replies_total", {"code": "4.3.2", "mailbox": "hr@contoso.example"}
    )
    # Series that alerts expect to exist before anything happens, per mailbox.
    held = {"reason": "too_big", "mailbox": "relay@c.example"}
    assert value("relayd_messages_held_total", held) == 0
    # The listener's and the queue's metrics stay the whole relay's.
    hr.reject("too_big")
    assert value("relayd_messages_rejected_total", {"reason": "too_big"}) == 1
    labelled = {getattr(metrics, name)._name for name in PER_MAILBOX}
    for family, labels in label_names(metrics).items():
        if "mailbox" in labels:
            assert family in labelled, family
    assert "mailbox" not in label_names(metrics)["relayd_queue_messages"]

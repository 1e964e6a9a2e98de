"""`relayd queue shape`: queued recipients by domain and age, as Postfix's qshape.

Rows are recipient domains (or, with --senders, sender domains, counting messages),
busiest first, under a TOTAL row; columns are age buckets in minutes since arrival,
doubling from 5 to 1280 (qshape's defaults, -t 5 -b 10), then older. Only recipients
still to be delivered count: those already delivered or failed for good do not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from relayd.queue.model import Envelope, QueueEntry

BUCKETS = tuple(5 * 2**n for n in range(9))  # 5, 10, 20 … 1280 minutes
COLUMNS = len(BUCKETS) + 1  # the last: older than the last bucket
HEADINGS = ("T", *(str(limit) for limit in BUCKETS), f"{BUCKETS[-1]}+")


def bucket(age_seconds: float) -> int:
    minutes = max(0.0, age_seconds) / 60
    for index, limit in enumerate(BUCKETS):
        if minutes <= limit:
            return index
    return len(BUCKETS)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if address else "MAILER-DAEMON"


def shape(
    items: Iterable[tuple[QueueEntry, Envelope | None, tuple[str, ...]]],
    now: float,
    *,
    by_sender: bool = False,
) -> dict[str, list[int]]:
    """Counts per domain and bucket; ``items`` are (entry, envelope, pending recipients)."""
    table: dict[str, list[int]] = {}
    for entry, envelope, pending in items:
        if envelope is None:
            counts = Counter({"(unreadable)": 1})
        elif by_sender:
            counts = Counter({domain_of(envelope.sender): 1})
        else:
            counts = Counter(domain_of(recipient) for recipient in pending)
        column = bucket(now - entry.received_at)
        for domain, count in counts.items():
            table.setdefault(domain, [0] * COLUMNS)[column] += count
    return table


def render(table: dict[str, list[int]]) -> list[str]:
    """qshape's layout: right-aligned columns, TOTAL first, then busiest first."""
    rows = sorted(table.items(), key=lambda item: (-sum(item[1]), item[0]))
    total = [sum(column) for column in zip(*table.values(), strict=True)] if table else []
    total = total or [0] * COLUMNS
    lines = [("", HEADINGS), ("TOTAL", _cells(total))]
    lines += [(domain, _cells(counts)) for domain, counts in rows]
    name_width = max(len(name) for name, _ in lines)
    widths = [max(len(cells[i]) for _, cells in lines) for i in range(len(HEADINGS))]
    return [
        f"{name:>{name_width}} "
        + " ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True))
        for name, cells in lines
    ]


def _cells(counts: list[int]) -> tuple[str, ...]:
    return (str(sum(counts)), *(str(count) for count in counts))

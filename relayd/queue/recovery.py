"""What a start does to the spool after any stop, clean or not (``Spool.recover``).

Half-written files in tmp/ never got a 250 and are removed. Messages that were being
delivered (active/) go back to be retried: at worst a duplicate, never a loss; with a
delivery state they go to deferred/ (due now), so their recipients already done stay
done. Stray files with names that are not queue ids are set aside in corrupt/.
Delivery states whose message is gone (a crash between the two removals of a
delivered message) are removed.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from relayd.ops.files import fsync_directory
from relayd.queue.model import is_queue_id

if TYPE_CHECKING:
    from relayd.queue.spool import Spool


def recover(spool: Spool) -> dict[str, int]:
    spool.ensure_layout()
    report = {"removed_partial": 0, "requeued": 0, "set_aside": 0, "orphan_meta": 0}
    for entry in os.scandir(spool.path("tmp")):
        try:
            os.unlink(entry.path)
            report["removed_partial"] += 1
        except FileNotFoundError:
            continue
        except (IsADirectoryError, PermissionError):  # a directory: not ours
            spool._set_aside(entry.path, "not a file relayd writes")
    for entry in os.scandir(spool.path("active")):
        tried = os.path.lexists(spool._meta_path(entry.name))
        spool._rename(entry.name, "active", "deferred" if tried else "incoming")
        report["requeued"] += 1
    # One pass over the queue both counts it and sets strays aside: with 100,000
    # messages queued, each pass costs a good part of a second before READY=1.
    queued: set[str] = set()
    strays = spool._scan(queued)
    for path in strays:
        spool._set_aside(path, "file name is not a queue id")
    report["set_aside"] = len(strays)
    report["orphan_meta"] = _remove_orphan_meta(spool, queued)
    for state in ("incoming", "deferred"):  # the messages put back above
        fsync_directory(spool.path(state))
    return report


def _remove_orphan_meta(spool: Spool, queued: set[str]) -> int:
    removed = 0
    for entry in os.scandir(spool.path("meta")):
        queue_id, _, extension = entry.name.partition(".")
        if extension == "json" and is_queue_id(queue_id) and queue_id not in queued:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed

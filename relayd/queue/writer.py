"""The spool writer: a process of its own that writes the listener's small queue files.

Why a process: in the daemon, the threads that wrote and synced a commit batch waited
for the GIL that the event loop holds while it serves SMTP sessions, and every client
of the batch waited with them for its 250 (bench/README.md). Here the same
``FileWriter`` runs with a GIL of its own, and the event loop hands it a whole batch in
one message on a socket pair and reads one reply, with no thread in between
(``relayd.queue.writer_client``; ``relayd.queue.lanes`` decides what goes in a batch).

The writer never decides anything: it writes the files it is given under tmp/, renames
them into incoming/ and fsyncs incoming/, and says for each whether it is queued. It
exits when its socket closes, so it never outlives the daemon, and it ignores SIGTERM,
SIGINT and SIGHUP. If it dies, stops answering or answers nonsense, the daemon kills
it, removes whatever of its batch is in tmp/ or incoming/ and writes the batch itself.

This module is all the writer process imports (``python -P -m relayd.queue.writer FD
SPOOL``, started by ``relayd.queue.writer_client``): no asyncio, no subprocess, no TLS.
Each of those modules is resident memory in every writer; without them a writer holds
about 15 MiB instead of 21 (tests/unit/queue/test_writer.py checks what it imports).

Wire format, both ways a 4-byte big-endian length and then the body. The writer's
first frame is ``ready``. A batch's body: a JSON line listing ``[queue_id, size]``
pairs, then the files' bytes one after the other. A reply's body: a JSON list, ``null``
for a queued file or the error's words.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import sys
from collections.abc import Sequence

from relayd.queue.writing import FileWriter, QueueFile

FRAME_LENGTH = struct.Struct(">I")


def serve(channel: socket.socket, directory: str) -> None:
    """Write each batch that arrives on ``channel`` and answer it, until it closes."""
    writer = FileWriter(directory)
    channel.sendall(FRAME_LENGTH.pack(5) + b"ready")
    while True:
        try:
            body = _receive(channel)
        except ConnectionError:
            return
        end = body.index(b"\n")
        view, files, offset = memoryview(body), [], end + 1
        for queue_id, size in json.loads(body[:end]):
            files.append(QueueFile(str(queue_id), (view[offset : offset + size],)))
            offset += size
        outcomes = writer.write(files)
        replies = [None if isinstance(size, int) else str(size) for size in outcomes]
        reply = json.dumps(replies).encode()
        channel.sendall(FRAME_LENGTH.pack(len(reply)) + reply)


def _receive(channel: socket.socket) -> bytes:
    """One frame (blocking: the writer process has nothing else to do)."""
    (length,) = FRAME_LENGTH.unpack(_exactly(channel, FRAME_LENGTH.size))
    return _exactly(channel, length)


def _exactly(channel: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = channel.recv(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError("the daemon closed its end")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def main(argv: Sequence[str]) -> int:
    # The writer ends when its socket does, after the daemon has had every reply it
    # waits for: a SIGTERM or Ctrl-C sent to the whole process group (systemd's
    # KillMode=control-group, a terminal) must not cut the commits of a shutdown's
    # grace period short.
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    fd, directory = int(argv[0]), argv[1]
    channel = socket.socket(fileno=fd)
    with contextlib.suppress(BrokenPipeError, ConnectionError):
        serve(channel, directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

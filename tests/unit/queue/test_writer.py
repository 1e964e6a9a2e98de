"""The spool writer processes (relayd.queue.writer) at their edges: a batch written whole
by another process, one bad file in a batch, and a writer that dies, hangs, answers
nonsense, queues a batch and dies before it answers, or cannot start. In every case each
message that gets its 250 is in incoming/ exactly once, whole, and nothing is left in
tmp/."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relayd.queue import writer_client as writer_module
from relayd.queue.model import Envelope, SpoolError, new_queue_id
from relayd.queue.spool import Spool
from relayd.queue.writer_client import WriterClient, WriterFailed

ENVELOPE = Envelope("app@example.com", ("a@example.com",), "127.0.0.1", "app")


def content(number: int, size: int = 2000) -> bytes:
    return f"Subject: message {number}\r\n\r\n".encode() + b"x" * size + b"\r\n"


@pytest.fixture
async def spool(tmp_path: Path):
    spool = Spool(tmp_path / "spool", writer_process=True)
    spool.recover()
    await spool.start_writers()
    yield spool
    await spool.stop_writers()


def writers(spool: Spool) -> list[WriterClient]:
    return [lane.writer for lane in spool._commit._lanes if lane.writer is not None]


async def commit_many(spool: Spool, count: int, size: int = 2000) -> dict[str, bytes]:
    sent = {new_queue_id(): content(number, size) for number in range(count)}
    await asyncio.gather(*(spool.commit(qid, ENVELOPE, body) for qid, body in sent.items()))
    return sent


def assert_queued_once(spool: Spool, sent: dict[str, bytes]) -> None:
    assert sorted(os.listdir(spool.path("incoming"))) == sorted(sent)
    assert os.listdir(spool.path("tmp")) == []
    for queue_id, body in sent.items():
        message = spool.claim(queue_id)
        assert message is not None and message.read_content() == body
    assert spool.census().messages["active"] == len(sent)


async def test_small_messages_are_written_by_processes_of_their_own(spool: Spool) -> None:
    sent = await commit_many(spool, 40)
    pids = {client.pid for client in writers(spool)}
    assert len(pids) == 2 and os.getpid() not in pids and None not in pids
    assert spool.census().messages["incoming"] == 40
    assert_queued_once(spool, sent)


async def test_a_big_message_is_written_in_the_daemon_s_process(spool: Spool) -> None:
    big = {new_queue_id(): content(0, 2 * 1024 * 1024)}
    for client in writers(spool):
        os.kill(client.pid, signal.SIGSTOP)  # a writer given this message would hang
    try:
        queue_id, body = next(iter(big.items()))
        await asyncio.wait_for(spool.commit(queue_id, ENVELOPE, body), 20)
    finally:
        for client in writers(spool):
            os.kill(client.pid, signal.SIGCONT)
    assert_queued_once(spool, big)


async def test_one_file_the_writer_cannot_create_fails_alone(spool: Spool) -> None:
    sent = {new_queue_id(): content(number) for number in range(6)}
    planted = next(iter(sent))
    (spool.path("tmp") / planted).write_bytes(b"not ours")  # O_EXCL refuses the name
    results = await asyncio.gather(
        *(spool.commit(qid, ENVELOPE, body) for qid, body in sent.items()),
        return_exceptions=True,
    )
    failed = [qid for qid, result in zip(sent, results, strict=True) if result is not None]
    assert failed == [planted]
    assert isinstance(results[0], SpoolError) and "cannot write queue file" in str(results[0])
    del sent[planted]
    assert_queued_once(spool, sent)
    assert all(client.pid is not None for client in writers(spool))  # no writer failed


async def test_a_writer_killed_while_it_has_a_batch_costs_the_batch_nothing(
    spool: Spool,
) -> None:
    clients = writers(spool)
    pids = [client.pid for client in clients]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # the batch reaches a writer that does not answer
    commits = asyncio.ensure_future(commit_many(spool, 10))
    await asyncio.sleep(0.3)
    assert not commits.done()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    sent = await asyncio.wait_for(commits, 20)
    assert_queued_once(spool, sent)
    assert all(client.pid is None and not client.available() for client in clients)


async def test_a_hung_writer_is_killed_after_its_timeout(spool: Spool) -> None:
    clients = writers(spool)
    for client in clients:
        client.timeout = 0.5
        os.kill(client.pid, signal.SIGSTOP)
    pids = [client.pid for client in clients]
    started = time.monotonic()
    sent = await asyncio.wait_for(commit_many(spool, 10), 20)
    assert time.monotonic() - started < 10
    assert_queued_once(spool, sent)
    for pid in pids:  # killed and reaped, not left stopped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_after_the_restart_delay_a_new_writer_takes_over(spool: Spool) -> None:
    clients = writers(spool)
    for client in clients:
        client.restart_delay = 0.2
        os.kill(client.pid, signal.SIGKILL)
    first = await commit_many(spool, 4)  # these find the writers dead
    assert all(client.pid is None for client in clients)
    await asyncio.sleep(0.3)
    second = await commit_many(spool, 20)
    assert all(client.pid is not None for client in clients)
    assert_queued_once(spool, {**first, **second})


FAKE_WRITERS = {
    # Queues the whole batch, then dies before it answers: the daemon must take every
    # file of it back out before it writes the batch itself (else: two copies of each).
    "queues-then-dies": (
        "import socket, sys, os\n"
        "from relayd.queue import writer\n"
        "from relayd.queue.writing import FileWriter, QueueFile\n"
        "import json\n"
        "channel = socket.socket(fileno=int(sys.argv[1]))\n"
        "channel.sendall(writer.FRAME_LENGTH.pack(5) + b'ready')\n"
        "body = writer._receive(channel)\n"
        "end = body.index(b'\\n')\n"
        "files, offset = [], end + 1\n"
        "for qid, size in json.loads(body[:end]):\n"
        "    files.append(QueueFile(qid, (body[offset:offset + size],)))\n"
        "    offset += size\n"
        "FileWriter(sys.argv[2]).write(files)\n"
        "os._exit(1)\n"
    ),
    # Dies half-way through writing the first file of its batch under tmp/: the daemon
    # must remove the half file, or its own write of that message is refused (O_EXCL).
    "writes-half-then-dies": (
        "import socket, sys, os, json\n"
        "from relayd.queue import writer\n"
        "channel = socket.socket(fileno=int(sys.argv[1]))\n"
        "channel.sendall(writer.FRAME_LENGTH.pack(5) + b'ready')\n"
        "body = writer._receive(channel)\n"
        "qid, size = json.loads(body[: body.index(b'\\n')])[0]\n"
        "with open(os.path.join(sys.argv[2], 'tmp', qid), 'xb') as half:\n"
        "    half.write(b'{\"v\":1,')\n"
        "os._exit(1)\n"
    ),
    # Answers every batch with something that does not fit it.
    "nonsense": (
        "import socket, sys\n"
        "from relayd.queue import writer\n"
        "channel = socket.socket(fileno=int(sys.argv[1]))\n"
        "channel.sendall(writer.FRAME_LENGTH.pack(5) + b'ready')\n"
        "while True:\n"
        "    writer._receive(channel)\n"
        "    channel.sendall(writer.FRAME_LENGTH.pack(7) + b'[1,2,3]')\n"
    ),
    # Cannot start at all (a broken installation).
    "cannot-start": "import sys\nsys.exit(3)\n",
}


@pytest.mark.parametrize("behaviour", sorted(FAKE_WRITERS))
async def test_a_misbehaving_writer_never_costs_a_message_or_doubles_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str
) -> None:
    script = tmp_path / "fake_writer.py"
    script.write_text(FAKE_WRITERS[behaviour])

    def spawn(self: WriterClient, theirs: socket.socket) -> subprocess.Popen[bytes]:
        # The same hand-over as the real writer's: the socket's number and the spool.
        command = [sys.executable, str(script), str(theirs.fileno()), str(self.directory)]
        environment = {**os.environ, "PYTHONPATH": writer_module._PACKAGE_ROOT}
        return subprocess.Popen(command, pass_fds=(theirs.fileno(),), env=environment)

    monkeypatch.setattr(WriterClient, "_spawn", spawn)
    spool = Spool(tmp_path / "spool", writer_process=True)
    spool.recover()
    await spool.start_writers()  # cannot-start: a warning, not an error
    try:
        sent = await asyncio.wait_for(commit_many(spool, 12), 30)
        assert_queued_once(spool, sent)
        assert all(not client.available() for client in writers(spool))
    finally:
        await spool.stop_writers()


async def test_start_reports_a_writer_that_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module.sys, "executable", "/nonexistent/python")
    client = WriterClient(tmp_path)
    with pytest.raises(WriterFailed):
        await client.start()
    assert not client.available() and client.pid is None


async def test_the_writer_ignores_sigterm_and_ends_with_its_socket(spool: Spool) -> None:
    clients = writers(spool)
    pids = [client.pid for client in clients]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # as systemd's KillMode=control-group sends it
        os.kill(pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    await asyncio.sleep(0.2)
    sent = await commit_many(spool, 10)
    assert [client.pid for client in clients] == pids  # the same writers did it
    assert_queued_once(spool, sent)
    await spool.stop_writers()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_writer_process_imports_no_event_loop_subprocess_or_tls() -> None:
    # Every module a writer imports is resident memory in each writer process, beside
    # the daemon's: asyncio, subprocess and ssl (the daemon's side of the socket pair)
    # took a writer from about 14 to 21 MiB.
    script = (
        "import sys, relayd.queue.writer\n"
        "print(' '.join(m for m in ('asyncio', 'subprocess', 'ssl') if m in sys.modules))\n"
    )
    environment = {**os.environ, "PYTHONPATH": writer_module._PACKAGE_ROOT}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True
    )
    assert result.stdout.split() == []


async def test_a_relayd_in_the_working_directory_is_not_the_writer_s_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "python -m" puts the working directory first on the module path: a relayd/ there
    # must not be what the writer runs.
    (tmp_path / "elsewhere" / "relayd").mkdir(parents=True)
    (tmp_path / "elsewhere" / "relayd" / "__init__.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    spool = Spool(tmp_path / "spool", writer_process=True)
    spool.recover()
    await spool.start_writers()
    try:
        assert all(client.pid is not None for client in writers(spool))
        sent = await asyncio.wait_for(commit_many(spool, 4), 30)
        assert_queued_once(spool, sent)
    finally:
        await spool.stop_writers()

"""A private Postfix for comparison, and Postfix's own load generator.

Debian's ``postfix`` package provides them (bench only, never a CI dependency)::

    DEBIAN_FRONTEND=noninteractive apt-get install -y postfix

``LocalPostfix`` runs a Postfix instance entirely under a directory of its own
(``-c`` config directory, queue and data directories), listening on 127.0.0.1 only and
relaying everything to a local ``smtp-sink``; it never reads or changes the machine's
own mail set-up (/etc/postfix/main.cf is not used, nothing listens on port 25).
Its settings are Postfix's defaults except where a relay on loopback needs otherwise
(see ``MAIN_CF``); like relayd, it syncs every queue file before answering 250.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port, wait_for_port

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin:/bin")
SMTP_SOURCE = shutil.which("smtp-source", path="/usr/sbin:/usr/bin")
SMTP_SINK = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin")

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = postfix-bench.relayd.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink_port}
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
alias_maps =
alias_database =
local_recipient_maps =
biff = no
"""

# Only the services a relay uses; chroot off (the instance lives in a temp directory).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def available() -> bool:
    return POSTFIX is not None and SMTP_SINK is not None


def reap_orphans() -> None:
    """Postfix's daemons outlive its master for a moment; as the subreaper we collect
    them, so that no zombie is left behind (a container's init may not)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def become_subreaper() -> None:
    """Orphaned descendants (Postfix's daemons) become our children (Linux prctl)."""
    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


class SmtpSink:
    """Postfix's smtp-sink: accepts and discards every message (the upstream)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> SmtpSink:
        user = ["-u", "postfix"] if os.geteuid() == 0 else []  # it refuses to run as root
        assert SMTP_SINK is not None
        self.process = subprocess.Popen(
            [SMTP_SINK, *user, f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


class LocalPostfix:
    """A Postfix instance under ``base`` on 127.0.0.1:``port``, relaying to a sink.

    ``holding``: it keeps every message queued instead (``defer_transports``), as
    relayd's mail stays queued in the listener rows."""

    def __init__(self, base: Path, sink_port: int, *, holding: bool = False) -> None:
        self.base = base
        self.port = free_port()
        self.config = base / "conf"
        self.sink_port = sink_port
        self.holding = holding
        self.master: subprocess.Popen | None = None

    def __enter__(self) -> LocalPostfix:
        for name in ("conf", "queue", "data"):
            (self.base / name).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.base / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        (self.config / "main.cf").write_text(self.main_cf())
        (self.config / "master.cf").write_text(self.master_cf())
        assert POSTFIX is not None
        # start-fg keeps the master our child: we can wait for it and reap what it leaves.
        self.master = subprocess.Popen(
            [POSTFIX, "-c", str(self.config), "start-fg"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=30)
        except TimeoutError:
            self.__exit__()
            raise RuntimeError(f"Postfix did not start; see {self.base / 'maillog'}") from None
        return self

    def main_cf(self) -> str:
        """The instance's main.cf (a subclass adds to it: bench/postfix_xoauth2.py)."""
        main_cf = MAIN_CF.format(base=self.base, sink_port=self.sink_port)
        # postconf(5): mail for these transports is deferred without an attempt.
        return main_cf + ("defer_transports = smtp, relay\n" if self.holding else "")

    def master_cf(self) -> str:
        return MASTER_CF.format(port=self.port)

    def settle(self, timeout: float = 600) -> None:
        """Wait until Postfix has relayed everything it accepted: its deliveries must not
        run on into the next measurement (of relayd or of itself). A holding
        Postfix delivers nothing: there is nothing to wait for."""
        if self.holding:
            return
        deadline = time.monotonic() + timeout
        while self._queued() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _queued(self) -> bool:
        queue = self.base / "queue"
        return any(
            files
            for state in ("maildrop", "incoming", "active", "deferred")
            for _, _, files in os.walk(queue / state)
        )

    def __exit__(self, *exc: object) -> None:
        assert POSTFIX is not None and self.master is not None
        subprocess.run([POSTFIX, "-c", str(self.config), "stop"], capture_output=True, check=False)
        try:
            self.master.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.master.pid, signal.SIGKILL)
            self.master.wait(10)
        time.sleep(0.5)  # its daemons exit when they see the master gone
        reap_orphans()


def smtp_source(port: int, clients: int, messages: int, size: int) -> float:
    """Seconds smtp-source takes to send ``messages`` of ``size`` payload bytes over
    ``clients`` connections, each kept for many messages (-d), as our generator does."""
    assert SMTP_SOURCE is not None
    command = [
        SMTP_SOURCE,
        "-d",
        "-s",
        str(clients),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        "bench@example.com",
        "-t",
        "user@example.com",
        f"127.0.0.1:{port}",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return time.perf_counter() - started

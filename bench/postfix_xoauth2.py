"""A private Postfix that forwards like relayd does: STARTTLS + AUTH XOAUTH2 to the fake
Exchange, with the sasl-xoauth2 Cyrus SASL plugin (github.com/tarickb/sasl-xoauth2).

The plugin has no Debian package; install it per its own project's instructions (it
then lives in a libsasl2 plugin directory such as /usr/lib/x86_64-linux-gnu/sasl2) or
pass the path of ``libsasl-xoauth2.so`` (``--sasl-xoauth2-plugin``). Nothing here
builds it.

Only loopback is ever contacted. The plugin reads its own config file (installed with
it; the placeholder values of its example are enough) and then the token file this
module writes, whose values override the config file's: the fake Entra ID's client id
and secret, its token endpoint on 127.0.0.1 (the plugin's default endpoint is Google's)
and the CA of the fakes. The token file holds a refresh token from the fake Entra ID
and no access token, so the first AUTH of each ``smtp`` process redeems it at the fake
Entra ID (as the plugin does in production); the access token it gets lives an hour,
longer than a run, so there is no refresh after that. The plugin writes the token file
back (a new refresh token), so its directory belongs to the postfix user.
"""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path

from bench.postfix import LocalPostfix

PLUGIN_NAME = "libsasl-xoauth2.so"
# Where Cyrus SASL looks for plugins on Debian/Ubuntu and other distributions, and where
# `make install` puts it with the default prefix.
PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu/sasl2",
    "/usr/lib/aarch64-linux-gnu/sasl2",
    "/usr/lib64/sasl2",
    "/usr/lib/sasl2",
    "/usr/local/lib/sasl2",
    "/usr/local/lib64/sasl2",
)

# What sasl-xoauth2's README asks of main.cf for Microsoft 365, pointed at the fake:
# TLS required (the fake offers AUTH only after STARTTLS), XOAUTH2 the only mechanism,
# SASL_PATH for a plugin outside the system directory, and Exchange Online's
# 3 connections per mailbox. With ``reuse`` (the benchmark's default), TLS connections
# are kept for further deliveries (smtp_tls_connection_reuse = yes, through tlsproxy):
# with Postfix's own default (no), each delivery opens its own TLS session and
# authenticates, and as an smtp process reports its delivery before it says QUIT, the
# next connection often opens before the last one closed: the fake, like Exchange,
# counts 4-6 and answers 432 4.3.2, and Postfix defers that message for 5 minutes.
XOAUTH2_CF = """\
relayhost = [127.0.0.1]:{exchange_port}
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca_file}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:{base}/sasl_passwd
smtp_sasl_security_options =
smtp_sasl_tls_security_options =
smtp_sasl_mechanism_filter = xoauth2
smtp_destination_concurrency_limit = {connections}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE
    POSTLOG_HOSTNAME SASL_PATH={plugin_dir}
smtp_tls_connection_reuse = {reuse}
"""


def find_plugin(explicit: Path | None = None) -> Path | None:
    """The installed plugin: ``explicit`` if given, else the first plugin directory that
    has it."""
    if explicit is not None:
        return explicit if explicit.is_file() else None
    for directory in PLUGIN_DIRS:
        candidate = Path(directory) / PLUGIN_NAME
        if candidate.is_file():
            return candidate
    return None


class XOAuth2Postfix(LocalPostfix):
    """LocalPostfix whose relayhost is the fake Exchange, through sasl-xoauth2."""

    def __init__(
        self,
        base: Path,
        *,
        exchange_port: int,
        plugin: Path,
        ca_file: Path,
        token: dict[str, str],
        mailbox: str,
        connections: int = 3,
        reuse: bool = False,
    ) -> None:
        super().__init__(base, exchange_port)
        self.plugin = plugin
        self.ca_file = ca_file
        self.token = token
        self.mailbox = mailbox
        self.connections = connections
        self.reuse = reuse

    def main_cf(self) -> str:
        return super().main_cf() + XOAUTH2_CF.format(
            exchange_port=self.sink_port,
            ca_file=self.ca_file,
            base=self.base,
            connections=self.connections,
            plugin_dir=self.plugin.parent,
            reuse="yes" if self.reuse else "no",
        )

    def master_cf(self) -> str:
        # The SMTP client's TLS needs its session cache and entropy manager.
        # tlsproxy: TLS connections kept for reuse (smtp_tls_connection_reuse).
        return super().master_cf() + (
            "tlsmgr    unix  - - n 1000? 1 tlsmgr\ntlsproxy  unix  - - n -  0 tlsproxy\n"
        )

    def __enter__(self) -> XOAuth2Postfix:
        self.base.mkdir(parents=True, exist_ok=True)
        token_file = self._write_token_file()
        # texthash: read by each smtp process at start, no postmap needed. The nexthop
        # key of a relayhost is written as it is configured, brackets and port.
        passwd = self.base / "sasl_passwd"
        passwd.write_text(f"[127.0.0.1]:{self.sink_port} {self.mailbox}:{token_file}\n")
        passwd.chmod(0o644)
        super().__enter__()
        return self

    def master_pid(self) -> int:
        """The master's pid (it runs setsid: its session holds every daemon)."""
        deadline = time.monotonic() + 10
        pid_file = self.base / "queue" / "pid" / "master.pid"
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        return int(pid_file.read_text().split()[0])

    def log_problems(self) -> list[str]:
        """maillog lines about deliveries that did not go well (deferrals, warnings)."""
        lines = (self.base / "maillog").read_text(errors="replace").splitlines()
        return [line for line in lines if "status=deferred" in line or "warning:" in line]

    def _write_token_file(self) -> Path:
        postfix_user = pwd.getpwnam("postfix")
        directory = self.base / "tokens"
        directory.mkdir(mode=0o700, exist_ok=True)
        token_file = directory / "token.json"
        token_file.write_text(json.dumps(self.token))
        token_file.chmod(0o600)
        for path in (directory, token_file):
            os.chown(path, postfix_user.pw_uid, postfix_user.pw_gid)
        return token_file


def token_file_for(entra, ca_file: Path) -> dict[str, str]:
    """sasl-xoauth2's token file for the fake Entra ID (keys from its docs/sasl-xoauth2
    .conf.5 "TOKEN FILE": each overrides the config file's value)."""
    return {
        "refresh_token": entra.issue_refresh_token(),
        "client_id": entra.client_id,
        "client_secret": entra.client_secret,
        "token_endpoint": f"{entra.authority}/oauth2/v2.0/token",
        "ca_bundle_file": str(ca_file),
        "user": entra.signin_user,
    }

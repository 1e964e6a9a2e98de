"""`relayd send-test`: send one short message and show each step, with a hint on failure.

Two ways, both with the code that carries real mail:

* through the running relay (the default): SMTP to ``listen.address:port`` as any
  application would, then follow the queue id in the spool until the message is
  delivered, deferred or failed (bounded by ``--wait``);
* ``--direct``: straight to the upstream with the current token, through the daemon's
  own ``SmtpTransport`` and sender policy; only the session class differs, so that
  each command and reply is printed.

Exit status 0 only when the message was delivered (or accepted by the upstream).
"""

from __future__ import annotations

import asyncio
import functools
import re
import smtplib
import sys
import time
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TextIO

from relayd import config as relayd_config
from relayd.auth import tokens as auth
from relayd.auth.mailboxes import commands_for
from relayd.auth.signin import when
from relayd.config import ListenSettings, Settings
from relayd.config.routes import route_for
from relayd.delivery.policy import SenderPolicy
from relayd.ops import logging as relay_logging
from relayd.ops.metrics import Metrics
from relayd.queue.model import Envelope, NotFound, QueuedMessage, SpoolError
from relayd.queue.spool import Spool
from relayd.tools.sendtrace import (
    GRAPH_HINTS,
    RELAY_HINTS,
    UPSTREAM_HINTS,
    Steps,
    TracedSMTP,
    graph_observer,
    hint,
    one_line,
)
from relayd.transports.auto import auth_disabled
from relayd.transports.base import Attempt, Submission
from relayd.transports.graph import GraphTransport
from relayd.transports.graph_client import GraphClient
from relayd.transports.replies import AUTH_DISABLED_EXPLANATION, SEND_AS_EXPLANATION, reply_text
from relayd.transports.smtp import SmtpTransport
from relayd.units import format_duration

EXIT_OK, EXIT_FAILED = 0, 1
POLL_INTERVAL = 0.2  # seconds between looks at the spool
RELAY_TIMEOUT = 30.0  # seconds for each SMTP reply from the local relay
QUEUED_AS = re.compile(r"queued as ([0-9A-F]{19})")
DAEMON_EXPLANATIONS = (AUTH_DISABLED_EXPLANATION, SEND_AS_EXPLANATION)
# Their failures are this command's steps; their log lines would only repeat them.
QUIET_LOGGERS = ("relayd.delivery", "relayd.tokens")
# Where the message is while it waits, as the follow-up prints it.
_WAITING = {
    "incoming": "waits for its first delivery attempt",
    "active": "is being delivered",
}


class SendTest:
    """One test send. ``through_relay()`` or ``direct()``, each returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None,
        to: str,
        sender: str | None = None,
        wait: float = 60.0,
        out: TextIO | None = None,
    ) -> None:
        self.config_path = config_path
        self.to = to
        self.hostname = settings.hostname
        self.sender = sender or settings.upstream.mailbox or f"relayd@{self.hostname}"
        # With routes, the sender chooses the mailbox (its token cache, its limits).
        self.route = route_for(settings.routes, self.sender)
        self.all_settings = settings
        self.settings = settings = relayd_config.settings_for_sender(settings, self.sender)
        self.wait = wait
        self.steps = Steps(out or sys.stdout)
        config = str(config_path) if config_path else settings.source
        upstream = settings.upstream
        login = f"relayd auth login -c {config}"
        if self.route is not None:
            login += f" --mailbox {self.route.mailbox}"
        self.context = {
            "mailbox": upstream.mailbox or "(upstream.mailbox)",
            "sender": self.sender,
            "host": upstream.host,
            "port": upstream.port,
            "graph_url": upstream.graph_url,
            "config": config,
            "login": login,
        }

    def message(self, route: str) -> bytes:
        """A short plain-text message (RFC 5322), marked as automatic (RFC 3834)."""
        lines = [
            f"From: <{self.sender}>",
            f"To: <{self.to}>",
            f"Subject: relayd test message from {self.hostname}",
            f"Date: {formatdate()}",
            f"Message-ID: {make_msgid('relayd-send-test', domain=self.hostname)}",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Auto-Submitted: auto-generated",
            "",
            f"This is a test message from `relayd send-test` on {self.hostname},",
            f"sent {route}.",
            "",
            "If you can read it, relayd can send mail. No answer is needed.",
            "",
        ]
        return "\r\n".join(lines).encode("utf-8")

    # --- through the running relay ---------------------------------------------------

    def through_relay(self) -> int:
        host, port = relay_address(self.settings.listen)
        self.steps.title(f"<{self.sender}> to <{self.to}> through the relay at {host}:{port}")
        if self.all_settings.routes:
            which = "a route" if self.route is not None else "no route: the default mailbox"
            self.steps.step("route", f"leaves as {self.settings.upstream.mailbox} ({which})")
        blocked = self._daemon_auth_problem()
        queue_id = self._submit(host, port)
        if queue_id is None:
            return EXIT_FAILED
        return self._follow(queue_id, blocked)

    def _submit(self, host: str, port: int) -> str | None:
        """SMTP to the relay, step by step; the queue id, or None once the failure is shown."""
        content = self.message(f"through the relay at {host}:{port}")
        self.steps.step("connect", f"{host} port {port}")
        name, reply = "connect", ""
        try:
            with smtplib.SMTP(timeout=RELAY_TIMEOUT) as client:
                commands = (
                    ("connect", "greeting", lambda: client.connect(host, port)),
                    ("EHLO", self.hostname, lambda: client.ehlo(self.hostname)),
                    ("MAIL FROM", f"<{self.sender}>", lambda: client.mail(self.sender)),
                    ("RCPT TO", f"<{self.to}>", lambda: client.rcpt(self.to)),
                    ("DATA", f"{len(content)} bytes", lambda: client.data(content)),
                )
                for name, detail, command in commands:
                    reply = _reply(*command())
                    if not reply.startswith("2"):
                        self.steps.failed(name, f"{detail}: {reply}")
                        self.steps.failure(reply, hint(reply, self.context, RELAY_HINTS))
                        return None
                    self.steps.step(name, f"{detail}: {reply}")
        except smtplib.SMTPResponseException as error:  # DATA itself refused
            reply = _reply(error.smtp_code, error.smtp_error)
            self.steps.failed(name, reply)
            self.steps.failure(reply, hint(reply, self.context, RELAY_HINTS))
            return None
        except (OSError, smtplib.SMTPException) as error:
            self.steps.failed(name, one_line(error))
            self.steps.failure(
                f"the relay at {host}:{port} cannot be used: {one_line(error)}",
                "Is relayd running (systemctl status relayd; relayd serve --sandbox to try"
                " it)? It listens on listen.address and listen.port in"
                f" {self.context['config']}.",
            )
            return None
        match = QUEUED_AS.search(reply)
        if match is None:  # relayd always names the queue id; another server may not
            self.steps.failure(f"the server at {host}:{port} gave no queue id: {reply}")
            return None
        return match.group(1)

    def _follow(self, queue_id: str, auth_problem: str | None) -> int:
        """Watch the spool until the message is gone (delivered), deferred or failed."""
        spool = Spool(self.settings.spool.directory)
        try:
            found = spool.path("incoming").is_dir()
        except OSError as error:  # e.g. the spool belongs to the daemon's user
            self.steps.failure(
                f"queued as {queue_id}, but the spool cannot be read: {error}",
                "run send-test as the daemon's user (sudo -u relayd relayd send-test …)",
            )
            return EXIT_FAILED
        if not found:
            self.steps.failure(
                f"queued as {queue_id}, but there is no spool at {spool.directory} to follow"
                f" it (spool.directory in {self.context['config']}): is this the"
                " configuration of the relay that answered?"
            )
            return EXIT_FAILED
        self.steps.step("queue", f"waiting up to {format_duration(self.wait)} for {queue_id}")
        deadline, shown = time.monotonic() + self.wait, ""
        while True:
            try:
                state, message = _find(spool, queue_id)
            except NotFound:
                return self._delivered(queue_id)
            except (SpoolError, OSError) as error:
                self.steps.failure(f"cannot read the spool {spool.directory}: {error}")
                return EXIT_FAILED
            if state not in _WAITING:
                return self._stopped(state, message)
            if state != shown:
                self.steps.step("queue", f"{queue_id} {_WAITING[state]} ({state}/)")
                shown = state
            if auth_problem and state == "incoming":
                self.steps.failure(
                    f"{queue_id} stays queued until relayd has a token: {auth_problem}",
                    f"Sign in: {self.context['login']}; the message goes out then.",
                )
                return EXIT_FAILED
            if time.monotonic() > deadline:
                self.steps.failure(
                    f"{queue_id} is still {state}/ after {format_duration(self.wait)}",
                    "relayd may be pausing deliveries (throttling, an unreachable upstream,"
                    " the rate limit): see its log, `relayd queue show "
                    f"{queue_id}`, or try --direct.",
                )
                return EXIT_FAILED
            time.sleep(POLL_INTERVAL)

    def _delivered(self, queue_id: str) -> int:
        upstream = self.settings.upstream
        if upstream.transport == "maildir":
            stored = sorted(upstream.maildir.glob(f"*/*_{queue_id}.*"))
            where = f"into the Maildir: {stored[0]}" if stored else f"into {upstream.maildir}"
            self.steps.success(f"{queue_id} was delivered {where}")
        else:
            self.steps.success(
                f"{queue_id} was delivered: {upstream.host} accepted it (relayd keeps no"
                " copy of delivered mail; its log line 'delivered' has the upstream's reply)"
            )
        return EXIT_OK

    def _stopped(self, state: str, message: QueuedMessage) -> int:
        queue_id, delivery = message.queue_id, message.state
        if state == "hold":
            self.steps.failed("queue", f"{queue_id} is on hold (hold/)")
            self.steps.failure(
                f"{queue_id} was held by an operator", f"relayd queue release {queue_id}"
            )
            return EXIT_FAILED
        what = "failed for good" if state == "failed" else "was deferred; relayd retries it"
        self.steps.failed("queue", f"{queue_id} {what} ({state}/, {delivery.attempts} attempts)")
        error = delivery.last_error or "not attempted: relayd paused deliveries to the upstream"
        self.steps.failure(error, hint(error, self.context, UPSTREAM_HINTS))
        return EXIT_FAILED

    def _daemon_auth_problem(self) -> str | None:
        """The sign-in problem the daemon recorded, if deliveries wait for a person."""
        if self.settings.upstream.transport == "maildir" or self.config_path is None:
            return None
        try:
            report = commands_for(
                self.all_settings, self.config_path, self.route and self.route.mailbox
            ).status_report()
        except (OSError, ValueError) as error:  # e.g. the cache is the daemon user's
            self.steps.step("auth", f"cannot read the token cache: {error}")
            return None
        if report["state"] not in auth.BLOCKED_STATES:
            self.steps.step("auth", f"{report['account']}: {report['state']}")
            return None
        problem = f"{report['state']}: {report['advice']}"
        self.steps.failed("auth", problem)
        return problem

    # --- straight to the upstream -----------------------------------------------------

    async def direct(self) -> int:
        upstream = self.settings.upstream
        if upstream.transport == "maildir":
            self.steps.failure(
                "--direct needs upstream.transport smtp, graph or auto; this configuration"
                " writes into a Maildir (send through the relay instead, without --direct)"
            )
            return EXIT_FAILED
        metrics = Metrics(process=False)
        tokens = auth.TokenManager(
            self.settings,
            metrics,
            config_path=self.config_path,
            login_mailbox=self.route.mailbox if self.route is not None else None,
        )
        await tokens.load()
        if upstream.transport == "graph":
            return await self._through_graph(tokens, metrics)
        attempt = await self._by_smtp(tokens, metrics)
        if upstream.transport == "auto" and attempt is not None and auth_disabled(attempt):
            self.steps.step("auto", "SMTP AUTH is disabled: relayd sends through Graph then")
            return await self._through_graph(tokens, metrics)
        return self._verdict(attempt, upstream.host, UPSTREAM_HINTS)

    async def _by_smtp(self, tokens: auth.TokenManager, metrics: Metrics) -> Attempt | None:
        upstream = self.settings.upstream
        self.steps.title(
            f"<{self.sender}> to <{self.to}> straight to {upstream.host}:{upstream.port}"
            f" as {upstream.mailbox}"
        )
        source = self._usable(tokens, "smtp")
        if source is None:
            return None
        transport = SmtpTransport(
            self.settings,
            metrics,
            ReportingTokens(source, self.steps),
            session_factory=functools.partial(TracedSMTP, self.steps),
        )
        try:
            return await transport.deliver(self._submission(upstream.host))
        finally:
            await transport.close()

    async def _through_graph(self, tokens: auth.TokenManager, metrics: Metrics) -> int:
        upstream = self.settings.upstream
        self.steps.title(
            f"<{self.sender}> to <{self.to}> through Microsoft Graph ({upstream.graph_url})"
            f" as {upstream.mailbox}"
        )
        source = self._usable(tokens, "graph")
        if source is None:
            return EXIT_FAILED
        client = GraphClient(self.settings, observer=graph_observer(self.steps))
        transport = GraphTransport(
            self.settings, metrics, ReportingTokens(source, self.steps), client=client
        )
        try:
            attempt = await transport.deliver(self._submission("Microsoft Graph"))
        finally:
            await transport.close()
        return self._verdict(attempt, "Microsoft Graph", GRAPH_HINTS + UPSTREAM_HINTS)

    def _usable(self, tokens: auth.TokenManager, name: str) -> auth.ResourceTokens | None:
        source = tokens.source(name)
        if source.state in auth.BLOCKED_STATES:
            self.steps.failed("token", source.advice())
            self.steps.failure(f"no access token ({source.state})", source.advice())
            return None
        return source

    def _verdict(self, attempt: Attempt | None, upstream: str, hints: tuple) -> int:
        if attempt is None:
            return EXIT_FAILED  # the token step said why
        if attempt.delivered:
            self.steps.success(f"{upstream} accepted the message: {attempt.reply}")
            return EXIT_OK
        reply = attempt.failed[0][1] if attempt.failed else attempt.reply
        for explanation in DAEMON_EXPLANATIONS:  # written for the queue: the hint says more
            reply = reply.split(f" ({explanation})")[0]
        self.steps.failure(reply, hint(reply, self.context, hints))
        return EXIT_FAILED

    def _submission(self, host: str) -> Submission:
        """The message as the scheduler would hand it over: after the sender policy."""
        envelope = Envelope(sender=self.sender, recipients=(self.to,), received_at=time.time())
        content = self.message(f"directly to {host} (relayd send-test --direct)")
        mail_from, prepared = SenderPolicy(self.settings.upstream).prepare(envelope, content)
        if prepared != content:
            self.steps.step(
                "policy",
                f"{self.sender} is neither upstream.mailbox nor in upstream.send_as: sent"
                f" as {mail_from} (upstream.from_rewrite)",
            )
        return Submission("send-test", mail_from, (self.to,), prepared)


class ReportingTokens:
    """The token module as delivery sees it (``TokenSource``), reporting what it hands out."""

    def __init__(self, tokens: auth.ResourceTokens, steps: Steps) -> None:
        self._tokens, self._steps = tokens, steps

    @property
    def state(self) -> str:
        return self._tokens.state

    async def access_token(self) -> str:
        try:
            token = await self._tokens.access_token()
        except auth.AuthUnavailable as error:
            self._steps.failed("token", str(error))
            raise
        view = self._tokens.view
        expires = f", valid until {when(view.expires_at)}"
        for_what = self._tokens.resource.permissions
        self._steps.step("token", f"access token ({for_what}) for {view.account}{expires}")
        return token

    async def token_rejected(self, token: str, reply: str) -> None:
        self._steps.step("token", "refused; asking Entra ID for a fresh one (once)")
        await self._tokens.token_rejected(token, reply)

    def mark_rejected(self, reply: str) -> None:
        self._tokens.mark_rejected(reply)

    def mark_accepted(self) -> None:
        self._tokens.mark_accepted()

    async def wait_until_usable(self) -> None:
        await self._tokens.wait_until_usable()


def relay_address(listen: ListenSettings) -> tuple[str, int]:
    """Where a local client reaches the listener (a wildcard address means loopback)."""
    address = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(  # noqa: S104
        listen.address, listen.address
    )
    return address, listen.port


def _find(spool: Spool, queue_id: str) -> tuple[str, QueuedMessage]:
    """The message's state; NotFound only when it is gone (delivered). spool.find() looks
    in incoming/, active/, deferred/… in turn; most moves go the same way, but a claim
    (deferred/ → active/) or a release (active/ → incoming/) during one look can hide the
    message from it: a second look a moment later settles it."""
    try:
        return spool.find(queue_id)
    except NotFound:
        time.sleep(POLL_INTERVAL)
        return spool.find(queue_id)


def _reply(code: int, text: bytes | str) -> str:
    """One line from smtplib's (code, text): the first line of a multi-line reply."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    lines = text.splitlines()
    return reply_text(code, lines[0] if lines else "")


def run(settings: Settings, config_path: Path | None, *, direct: bool, **options) -> int:
    for name in QUIET_LOGGERS:
        relay_logging.quiet_logger(name)
    test = SendTest(settings, config_path=config_path, **options)
    if direct:
        return asyncio.run(test.direct())
    return test.through_relay()

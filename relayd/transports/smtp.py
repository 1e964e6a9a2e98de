"""The SMTP transport: Microsoft 365 (or any SMTP submission server) by SMTP.

STARTTLS (TLS 1.2+, verified), AUTH XOAUTH2 with the token module's access token, a
pool of at most ``upstream.max_connections`` sessions, a circuit breaker that pauses
everything on throttling or when the upstream cannot be reached, and per-recipient
results. It never touches the spool: it returns an ``Attempt`` and the scheduler
decides what happens to the message.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import structlog

from relayd.auth import tokens as auth
from relayd.auth.tokens import TokenSource
from relayd.config import Settings
from relayd.ops.metrics import Metrics
from relayd.transports.base import (
    ACCOUNT_RESTRICTED,
    AUTH,
    CONNECTION,
    MAILBOX_FULL,
    NOTHING,
    QUOTA,
    SEND_AS_DENIED,
    TEMPORARY,
    TENANT_BLOCKED,
    THROTTLED,
    TIMEOUT,
    Attempt,
    Blocked,
    Submission,
)
from relayd.transports.breaker import CircuitBreaker
from relayd.transports.pool import ConnectionPool
from relayd.transports.replies import (
    ACCOUNT_EXPLANATIONS,
    ACCOUNT_KINDS,
    AUTH_DISABLED_EXPLANATION,
    AUTH_KINDS,
    SEND_AS_EXPLANATION,
    Kind,
    classify,
    reply_text,
)
from relayd.transports.session import AmbiguousOutcome, RelaySMTP
from relayd.transports.transaction import CONNECTION_ERRORS, StaleSession, Transaction

log = structlog.get_logger("relayd.delivery")

# Token states in which asking for a token is pointless: a person must sign in, or
# the token module is already retrying the token endpoint by itself.
_WAITING_STATES = (auth.NO_TOKEN, auth.REAUTH_REQUIRED, auth.UNAVAILABLE)
_USABLE_STATES = (auth.OK, auth.REFRESHING)
AUTH_STATE_POLL = 1.0  # seconds between looks at the token state during an auth pause
# The data phase's wait grows by one second per MIN_UPLOAD_RATE bytes of the message
# (32 KiB/s, 256 kbit/s: a slow link still gets a 35 MB message through in time).
MIN_UPLOAD_RATE = 32 * 1024
ACCOUNT_REASON = {
    Kind.QUOTA: QUOTA,
    Kind.MAILBOX_FULL: MAILBOX_FULL,
    Kind.ACCOUNT_RESTRICTED: ACCOUNT_RESTRICTED,
    Kind.TENANT_BLOCKED: TENANT_BLOCKED,
}


class _Unusable(Exception):
    """No session could be had; carries what that means for the message."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.reply)
        self.attempt = attempt


class SmtpTransport:
    """Microsoft 365 (or any SMTP submission server) with STARTTLS and XOAUTH2."""

    rate_limited = True

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        tokens: TokenSource | None,
        *,
        session_factory: Callable[..., RelaySMTP] = RelaySMTP,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tokens = tokens
        # `relayd send-test --direct` passes a subclass that prints each step.
        self.session_factory = session_factory
        self.breaker = CircuitBreaker(start_probing=True)
        self._tls: tuple[Path | None, ssl.SSLContext] | None = None
        self._auth_state_at_pause = auth.OK  # token state when auth paused the upstream
        self._probe_lock = asyncio.Lock()
        self.pool = ConnectionPool(
            self._open_session,
            limit=settings.upstream.max_connections,
            idle_timeout=settings.upstream.idle_timeout,
            on_count=metrics.upstream_connections.set,
        )

    @property
    def concurrency(self) -> int:
        return self.settings.upstream.max_connections

    def blocked(self) -> Blocked | None:
        waiting = self._token_wait_reason()
        if waiting:
            return Blocked(AUTH, None, waiting)
        if self._signed_in_again():
            self.breaker.resume()  # somebody fixed auth: probe now, not after the pause
        remaining = self.breaker.remaining()
        if remaining > 0:
            return Blocked(self.breaker.reason, remaining, "the upstream is paused")
        return None

    async def wait_until_available(self) -> None:
        """Returns when the token state may let deliveries go again; a pause otherwise
        simply runs out (the scheduler's own timeout)."""
        if self.tokens is None:
            await asyncio.Event().wait()
        state = self.tokens.state
        if state in _WAITING_STATES:
            await self.tokens.wait_until_usable()
        elif self.breaker.reason == AUTH and self.breaker.is_open:
            # After a rejection the token module counts as usable already; a new
            # sign-in only shows as a change of state (TokenSource has no event for it).
            while self.tokens.state == state:  # noqa: ASYNC110
                await asyncio.sleep(AUTH_STATE_POLL)
        else:
            await asyncio.Event().wait()

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.pool.reconfigure(settings.upstream.max_connections, settings.upstream.idle_timeout)

    async def close(self) -> None:
        await self.pool.close()

    async def deliver(self, submission: Submission) -> Attempt:
        for _ in range(2):
            try:
                session, reused = await self.pool.acquire()
            except _Unusable as problem:
                return _for_recipients(problem.attempt, submission.recipients)
            if reused and self.breaker.is_open:
                # Paused while this message waited for a session (another session met
                # throttling or an account refusal): it goes back untouched.
                self.pool.release(session, reusable=True)
                reply = f"not attempted: the upstream is paused ({self.breaker.reason})"
                return Attempt.not_attempted(submission.recipients, self.breaker.reason, reply)
            started = time.monotonic()
            transaction = Transaction(
                session,
                submission,
                self,
                command_timeout=self.settings.upstream.timeout,
                data_timeout=final_reply_timeout(
                    self.settings.upstream.data_timeout, len(submission.content)
                ),
            )
            try:
                attempt = await transaction.run(reused)
            except StaleSession:
                # The server closed an idle session we had not noticed yet: replace
                # it (and its idle siblings) once, nothing was sent.
                self.pool.release(session, reusable=False)
                self.pool.discard_idle()
                continue
            except BaseException:
                self.pool.release(session, reusable=False)
                raise
            self.pool.release(session, reusable=session.is_connected)
            self.metrics.delivery_duration.observe(time.monotonic() - started)
            return attempt
        return Attempt.deferred_all(
            submission.recipients, CONNECTION, "the upstream closed fresh connections"
        ).using(NOTHING)

    async def probe(self) -> str | None:
        """Open one session now, paused or not (``upstream.transport: auto`` looks again
        while Graph carries the mail): None when it authenticated (the session stays in
        the pool for the next message), else what went wrong."""
        self.breaker.resume()
        try:
            session, _ = await self.pool.acquire()
        except _Unusable as problem:
            return problem.attempt.reply
        self.pool.release(session, reusable=True)
        return None

    # --- sessions ------------------------------------------------------------------

    def _signed_in_again(self) -> bool:
        """Auth paused the upstream while tokens were unusable, and now they are usable
        (a new sign-in, the token endpoint back): no reason to sit out the pause."""
        if self.tokens is None or self.breaker.reason != AUTH or not self.breaker.is_open:
            return False
        state = self.tokens.state
        return state in _USABLE_STATES and self._auth_state_at_pause not in _USABLE_STATES

    def _pause_for_auth(self) -> float:
        self._auth_state_at_pause = self.tokens.state if self.tokens is not None else auth.OK
        return self.breaker.failure(AUTH, *self._pause_bounds())

    def _token_wait_reason(self) -> str | None:
        if self.tokens is None:
            return "no token source is configured"
        state = self.tokens.state
        return f"auth state {state}" if state in _WAITING_STATES else None

    async def _open_session(self) -> aiosmtplib.SMTP:
        """Connect, STARTTLS and authenticate; after a failure, one probe at a time."""
        if self.breaker.probing:
            async with self._probe_lock:
                self._check_usable()
                return await self._connect_and_authenticate()
        self._check_usable()
        return await self._connect_and_authenticate()

    def _check_usable(self) -> None:
        blocked = self.blocked()
        if blocked is not None:
            raise _Unusable(
                Attempt.not_attempted((), blocked.reason, f"not attempted: {blocked.detail}")
            )

    async def _connect_and_authenticate(self) -> aiosmtplib.SMTP:
        for first_try in (True, False):
            issued: list[str] = []
            session = await self._new_session(issued)
            try:
                await session.connect()
            except aiosmtplib.SMTPAuthenticationError as error:
                self.metrics.upstream_reply(error.code, error.message)
                kind = classify(error.code, error.message)
                if kind is Kind.TOKEN_REJECTED and first_try and issued and self.tokens:
                    # 535 5.7.3: the token may have been revoked early; get a fresh
                    # one once (TokenSource.token_rejected) before giving up.
                    reply = reply_text(error.code, error.message)
                    await self.tokens.token_rejected(issued[0], reply)
                    continue
                raise self._auth_failed(kind, error) from None
            except auth.AuthUnavailable as error:
                session.close()
                self._pause_for_auth()  # released, not deferred: it goes once a token is back
                raise _Unusable(
                    Attempt.not_attempted((), AUTH, f"no access token: {error}")
                ) from None
            except aiosmtplib.SMTPResponseException as error:
                raise self._refused_session(error) from None
            except CONNECTION_ERRORS as error:
                raise self._unreachable(error) from None
            self.metrics.upstream_reply(235, "2.7.0")
            if self.tokens is not None:
                self.tokens.mark_accepted()
            self.breaker.success()
            return session
        raise AssertionError("unreachable")  # pragma: no cover

    async def _new_session(self, issued: list[str]) -> aiosmtplib.SMTP:
        upstream = self.settings.upstream

        async def token() -> str:
            if self.tokens is None:
                raise auth.AuthUnavailable(auth.NO_TOKEN, "no token source is configured")
            value = await self.tokens.access_token()
            issued.append(value)
            return value

        implicit = upstream.tls == "implicit"
        return self.session_factory(
            hostname=upstream.host,
            port=upstream.port,
            use_tls=implicit,
            start_tls=not implicit,  # True: upgrade or fail; never AUTH in the clear
            tls_context=await self._tls_context(),
            local_hostname=upstream.helo_name or None,
            timeout=upstream.timeout,
            username=upstream.mailbox,
            oauth_token_generator=token,
        )

    async def _tls_context(self) -> ssl.SSLContext:
        ca_file = self.settings.upstream.ca_file
        if self._tls is None or self._tls[0] != ca_file:
            # Loading the system CA store reads files: not on the event loop.
            context = await asyncio.to_thread(_client_tls_context, ca_file)
            self._tls = (ca_file, context)
        return self._tls[1]

    def _pause_bounds(self) -> tuple[float, float]:
        retry = self.settings.retry
        return retry.min_delay, retry.max_delay

    def _auth_failed(self, kind: Kind, error: aiosmtplib.SMTPResponseException) -> _Unusable:
        reply = reply_text(error.code, error.message)
        if kind is Kind.THROTTLED:  # 432 4.3.2 answers AUTH on a 4th connection
            return _Unusable(Attempt.deferred_all((), THROTTLED, reply, self._throttle(reply)))
        if kind in ACCOUNT_KINDS:
            return self._account_unusable(kind, reply)
        if kind is Kind.AUTH_DISABLED:
            reply = f"{reply} ({AUTH_DISABLED_EXPLANATION})"
        if self.tokens is not None and kind in (Kind.TOKEN_REJECTED, Kind.AUTH_DISABLED):
            self.tokens.mark_rejected(reply)
        pause = self._pause_for_auth()
        log.error(
            "upstream refused authentication; deliveries wait",
            reply=reply,
            mailbox=self.settings.upstream.mailbox,
            retry_in=round(pause, 1),
        )
        return _Unusable(Attempt.deferred_all((), AUTH, reply, pause))

    def _refused_session(self, error: aiosmtplib.SMTPResponseException) -> _Unusable:
        """A reply other than success while opening the session (greeting, EHLO, AUTH)."""
        self.metrics.upstream_reply(error.code, error.message)
        reply = reply_text(error.code, error.message)
        kind = classify(error.code, error.message)
        if kind is Kind.THROTTLED:
            return _Unusable(Attempt.deferred_all((), THROTTLED, reply, self._throttle(reply)))
        if kind in ACCOUNT_KINDS:  # e.g. 550 5.7.708 in the greeting
            return self._account_unusable(kind, reply)
        return self._unreachable(error)

    def _account_unusable(self, kind: Kind, reply: str) -> _Unusable:
        reason, pause, explained = self._pause_for_account(kind, reply)
        return _Unusable(Attempt.deferred_all((), reason, explained, pause))

    def _throttle(self, reply: str) -> float:
        """421 / 432 4.3.2: pause the whole upstream for upstream.throttle_pause."""
        pause = self.settings.upstream.throttle_pause
        self.breaker.trip(THROTTLED, pause)
        log.warning("upstream throttles; pausing deliveries", reply=reply, pause=pause)
        return pause

    def _unreachable(self, error: BaseException) -> _Unusable:
        reason = _reason(error)
        pause = self.breaker.failure(reason, *self._pause_bounds())
        upstream = self.settings.upstream
        detail = f"cannot use {upstream.host}:{upstream.port}: {_describe(error)}"
        log.warning("upstream unreachable; pausing deliveries", error=detail, pause=round(pause, 1))
        return _Unusable(Attempt.deferred_all((), reason, detail, pause))

    # --- judging one transaction ------------------------------------------------

    def replied(self, code: int, message: str) -> None:
        self.metrics.upstream_reply(code, message)

    def judge(self, recipients: tuple[str, ...], code: int, message: str) -> Attempt:
        """The result for ``recipients`` of one refusal reply."""
        self.metrics.upstream_reply(code, message)
        reply = reply_text(code, message)
        kind = classify(code, message)
        if kind is Kind.PERMANENT:
            return Attempt(failed=tuple((r, reply) for r in recipients), reply=reply)
        if kind is Kind.THROTTLED:
            return Attempt.deferred_all(recipients, THROTTLED, reply, self._throttle(reply))
        if kind in ACCOUNT_KINDS:
            reason, pause, explained = self._pause_for_account(kind, reply)
            return Attempt.deferred_all(recipients, reason, explained, pause)
        if kind is Kind.SEND_AS_DENIED:
            log.error("upstream refused the sender", reply=reply, help=SEND_AS_EXPLANATION)
            explained = f"{reply} ({SEND_AS_EXPLANATION})"
            return Attempt.deferred_all(recipients, SEND_AS_DENIED, explained)
        if kind in AUTH_KINDS:
            # e.g. 530 5.7.57 at MAIL: the session lost its authentication.
            session_pause = self._pause_for_auth()
            log.error("upstream refused the session's authentication", reply=reply)
            return Attempt.deferred_all(recipients, AUTH, reply, session_pause)
        return Attempt.deferred_all(recipients, TEMPORARY, reply)

    def broken(self, recipients: tuple[str, ...], error: BaseException) -> Attempt:
        """The session broke before the message was sent: it is retried."""
        reply = f"connection broke: {_describe(error)}"
        return Attempt.deferred_all(recipients, _reason(error), reply)

    def ambiguous(self, submission: Submission, error: AmbiguousOutcome) -> Attempt:
        """No reply to the final dot: the upstream may have the message. Retried, as
        Postfix does (at worst a duplicate, never a loss), and counted."""
        self.metrics.upstream_ambiguous.inc()
        log.warning(
            "no reply after the final dot; the message may have been delivered and is"
            " sent again at the next attempt",
            queue_id=submission.queue_id,
            error=_describe(error),
        )
        reason = TIMEOUT if error.timed_out else CONNECTION
        reply = f"{_describe(error)} (the message may have been delivered)"
        return Attempt.deferred_all(submission.recipients, reason, reply)

    def _pause_for_account(self, kind: Kind, reply: str) -> tuple[str, float, str]:
        """The relay's mailbox or tenant may not send now: pause every delivery (the
        scheduler shows it as relayd_deliveries_paused{reason}); one log line per pause."""
        reason = ACCOUNT_REASON[kind]
        pause = self.settings.retry.max_delay
        explanation = ACCOUNT_EXPLANATIONS[kind]
        if not (self.breaker.is_open and self.breaker.reason == reason):
            log.error(
                "the upstream refuses this account; deliveries pause",
                reason=reason,
                reply=reply,
                mailbox=self.settings.upstream.mailbox,
                pause=pause,
                help=explanation,
            )
        self.breaker.trip(reason, pause)
        return reason, pause, f"{reply} ({explanation})"


def final_reply_timeout(data_timeout: float, size: int) -> float:
    """The wait for the reply to the final dot: upstream.data_timeout (RFC 5321
    §4.5.3.2.6: 10 minutes) plus the time to upload ``size`` bytes at MIN_UPLOAD_RATE,
    because the message is written at once and that one wait covers its upload too."""
    return data_timeout + size / MIN_UPLOAD_RATE


def _for_recipients(template: Attempt, recipients: tuple[str, ...]) -> Attempt:
    """A session-level result (no recipients yet) applied to this message's recipients:
    no session, so nothing reached the upstream's limits."""
    return Attempt(
        deferred=recipients,
        reason=template.reason,
        reply=template.reply,
        retry_after=template.retry_after,
        attempted=template.attempted,
        usage=NOTHING,
    )


def _client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # Microsoft 365 requires 1.2+
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def _reason(error: BaseException) -> str:
    return TIMEOUT if isinstance(error, TimeoutError | asyncio.TimeoutError) else CONNECTION


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]

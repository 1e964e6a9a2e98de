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
    AUTH,
    CONNECTION,
    QUOTA,
    SEND_AS_DENIED,
    TEMPORARY,
    THROTTLED,
    TIMEOUT,
    Attempt,
    Blocked,
    Submission,
)
from relayd.transports.breaker import CircuitBreaker
from relayd.transports.pool import ConnectionPool
from relayd.transports.replies import (
    AUTH_DISABLED_EXPLANATION,
    SEND_AS_EXPLANATION,
    Kind,
    classify,
    reply_text,
)

log = structlog.get_logger("relayd.delivery")

# Token states in which asking for a token is pointless: a person must sign in, or
# the token module is already retrying the token endpoint by itself.
_WAITING_STATES = (auth.NO_TOKEN, auth.REAUTH_REQUIRED, auth.UNAVAILABLE)
_USABLE_STATES = (auth.OK, auth.REFRESHING)
AUTH_STATE_POLL = 1.0  # seconds between looks at the token state during an auth pause
_CONNECTION_ERRORS = (aiosmtplib.SMTPException, OSError, ssl.SSLError, asyncio.TimeoutError)


class _Unusable(Exception):
    """No session could be had; carries what that means for the message."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.reply)
        self.attempt = attempt


class _StaleSession(Exception):
    """A reused session was found closed at the first command: nothing was sent."""


class SmtpTransport:
    """Microsoft 365 (or any SMTP submission server) with STARTTLS and XOAUTH2."""

    rate_limited = True

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        tokens: TokenSource | None,
        *,
        session_factory: Callable[..., aiosmtplib.SMTP] = aiosmtplib.SMTP,
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
            started = time.monotonic()
            try:
                attempt = await self._transact(session, submission, reused)
            except _StaleSession:
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
        )

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
            except _CONNECTION_ERRORS as error:
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
        if classify(error.code, error.message) is Kind.THROTTLED:
            return _Unusable(Attempt.deferred_all((), THROTTLED, reply, self._throttle(reply)))
        return self._unreachable(error)

    def _throttle(self, reply: str) -> float:
        """421 / 432 4.3.2: pause the whole upstream for upstream.throttle_pause."""
        pause = self.settings.upstream.throttle_pause
        self.breaker.trip(THROTTLED, pause)
        log.warning("upstream throttles; pausing deliveries", reply=reply, pause=pause)
        return pause

    def _unreachable(self, error: BaseException) -> _Unusable:
        reason = TIMEOUT if isinstance(error, TimeoutError | asyncio.TimeoutError) else CONNECTION
        pause = self.breaker.failure(reason, *self._pause_bounds())
        upstream = self.settings.upstream
        detail = f"cannot use {upstream.host}:{upstream.port}: {_describe(error)}"
        log.warning("upstream unreachable; pausing deliveries", error=detail, pause=round(pause, 1))
        return _Unusable(Attempt.deferred_all((), reason, detail, pause))

    # --- one transaction -------------------------------------------------------------

    async def _transact(
        self, session: aiosmtplib.SMTP, submission: Submission, reused: bool
    ) -> Attempt:
        """MAIL, RCPT for each recipient, DATA; per-recipient results."""
        options = _mail_options(session, submission)
        if options is None:
            return self._judge(
                submission.recipients,
                553,
                "5.6.7 The upstream server does not support SMTPUTF8, which this message needs",
            )
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        try:
            await session.mail(submission.mail_from, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as error:
            attempt = self._judge(submission.recipients, error.code, error.message)
            await _reset(session)
            return attempt
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as error:
            if reused:
                raise _StaleSession from error
            return self._broken(submission.recipients, error)
        except _CONNECTION_ERRORS as error:
            return self._broken(submission.recipients, error)
        return await self._recipients_and_data(session, submission, encoding)

    async def _recipients_and_data(
        self, session: aiosmtplib.SMTP, submission: Submission, encoding: str
    ) -> Attempt:
        accepted: list[str] = []
        refused = Attempt(attempted=True)
        try:
            for recipient in submission.recipients:
                try:
                    await session.rcpt(recipient, encoding=encoding)
                    accepted.append(recipient)
                except aiosmtplib.SMTPRecipientRefused as error:
                    refused = refused.merge(self._judge((recipient,), error.code, error.message))
                except ValueError:  # cannot be written on an SMTP command line at all
                    unsendable = reply_text(501, "5.1.3 Address cannot be sent over SMTP")
                    refused = refused.merge(Attempt(failed=((recipient, unsendable),)))
            if not accepted:
                await _reset(session)
                return refused
            response = await session.data(submission.content)
        except aiosmtplib.SMTPResponseException as error:
            # DATA refused (or a non-RCPT reply broke the transaction): every
            # recipient accepted so far shares that reply.
            return refused.merge(self._judge(tuple(accepted), error.code, error.message))
        except _CONNECTION_ERRORS as error:
            return self._broken(submission.recipients, error)
        self.metrics.upstream_reply(response.code, response.message)
        delivered = Attempt(
            delivered=tuple(accepted), reply=reply_text(response.code, response.message)
        )
        return delivered.merge(refused)

    def _judge(self, recipients: tuple[str, ...], code: int, message: str) -> Attempt:
        """The result for ``recipients`` of one refusal reply."""
        self.metrics.upstream_reply(code, message)
        reply = reply_text(code, message)
        kind = classify(code, message)
        if kind is Kind.PERMANENT:
            return Attempt(failed=tuple((r, reply) for r in recipients), reply=reply)
        if kind is Kind.THROTTLED:
            return Attempt.deferred_all(recipients, THROTTLED, reply, self._throttle(reply))
        if kind is Kind.QUOTA:
            pause = self.settings.retry.max_delay
            self.breaker.trip(QUOTA, pause)
            log.error("the mailbox's sending quota is used up; pausing", reply=reply, pause=pause)
            return Attempt.deferred_all(recipients, QUOTA, reply, pause)
        if kind is Kind.SEND_AS_DENIED:
            log.error("upstream refused the sender", reply=reply, help=SEND_AS_EXPLANATION)
            explained = f"{reply} ({SEND_AS_EXPLANATION})"
            return Attempt.deferred_all(recipients, SEND_AS_DENIED, explained)
        if kind in (Kind.TOKEN_REJECTED, Kind.AUTH_DISABLED, Kind.AUTH):
            # e.g. 530 5.7.57 at MAIL: the session lost its authentication.
            session_pause = self._pause_for_auth()
            log.error("upstream refused the session's authentication", reply=reply)
            return Attempt.deferred_all(recipients, AUTH, reply, session_pause)
        return Attempt.deferred_all(recipients, TEMPORARY, reply)

    def _broken(self, recipients: tuple[str, ...], error: BaseException) -> Attempt:
        """The session broke mid-transaction: whether the upstream kept the message is
        unknown, so it is retried (at worst a duplicate, never a loss)."""
        reason = TIMEOUT if isinstance(error, TimeoutError | asyncio.TimeoutError) else CONNECTION
        return Attempt.deferred_all(recipients, reason, f"connection broke: {_describe(error)}")


def _for_recipients(template: Attempt, recipients: tuple[str, ...]) -> Attempt:
    """A session-level result (no recipients yet) applied to this message's recipients."""
    return Attempt(
        deferred=recipients,
        reason=template.reason,
        reply=template.reply,
        retry_after=template.retry_after,
        attempted=template.attempted,
    )


def _mail_options(session: aiosmtplib.SMTP, submission: Submission) -> list[str] | None:
    """MAIL FROM parameters the upstream understands; None if the message cannot go."""
    options: list[str] = []
    if session.supports_extension("size"):
        options.append(f"SIZE={len(submission.content)}")  # RFC 1870 §3
    requested = {option.upper() for option in submission.mail_options}
    if "BODY=8BITMIME" in requested and session.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152
    if "SMTPUTF8" in requested:
        if not session.supports_extension("smtputf8"):
            return None
        options.append("SMTPUTF8")  # RFC 6531 §3.4
    return options


async def _reset(session: aiosmtplib.SMTP) -> None:
    """RSET after a refused transaction so the session can carry the next message."""
    if session.is_connected:
        try:
            await session.rset()
        except _CONNECTION_ERRORS:
            session.close()


def _client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # Microsoft 365 requires 1.2+
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:300]

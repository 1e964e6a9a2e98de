"""The Graph transport: Microsoft 365 through Microsoft Graph's sendMail, for tenants
where SMTP AUTH is switched off.

``POST {graph_url}/me/sendMail`` with the message in base64 (``Content-Type:
text/plain``), as the signed-in mailbox, with the same delegated sign-in as SMTP
(``Mail.Send``). ``202`` means Exchange took the message: delivered. The recipients
are the envelope's (``relayd.transports.graph_mime``). A message over Graph's request
limit goes as a draft with upload sessions when ``upstream.graph_large_messages`` is on
(``relayd.transports.graph_large``), else it is held for an operator: never bounced.
Like the SMTP transport it never touches the spool; it returns an ``Attempt``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from relayd.auth import tokens as auth
from relayd.auth.tokens import TokenSource
from relayd.config import Settings
from relayd.ops.metrics import Metrics
from relayd.transports import graph_large
from relayd.transports.base import (
    AUTH,
    CONNECTION,
    NOTHING,
    QUOTA,
    SEND_AS_DENIED,
    TEMPORARY,
    THROTTLED,
    TIMEOUT,
    TOO_BIG,
    Attempt,
    Blocked,
    Submission,
    Usage,
)
from relayd.transports.breaker import CircuitBreaker
from relayd.transports.graph_client import (
    GRAPH_CONCURRENCY,
    GraphClient,
    GraphPaused,
    GraphReply,
    GraphUnreachable,
)
from relayd.transports.graph_mime import encoded_size, for_envelope
from relayd.transports.graph_replies import (
    ACCOUNT_EXPLANATION,
    GRAPH_REQUEST_LIMIT,
    PERMISSION_EXPLANATION,
    Verdict,
    judge,
    permanent_line,
    reply_line,
)
from relayd.transports.replies import SEND_AS_EXPLANATION
from relayd.units import format_size

log = structlog.get_logger("relayd.delivery")

_WAITING_STATES = (auth.NO_TOKEN, auth.REAUTH_REQUIRED, auth.UNAVAILABLE)
_USABLE_STATES = (auth.OK, auth.REFRESHING)
AUTH_STATE_POLL = 1.0  # seconds between looks at the token state during an auth pause
Call = Callable[[str], Awaitable[GraphReply]]


class GraphTransport:
    """Microsoft 365 through Microsoft Graph, as the signed-in mailbox."""

    rate_limited = True  # Exchange's 30/min and 10,000 recipients/day apply to Graph too
    concurrency = GRAPH_CONCURRENCY

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        tokens: TokenSource | None,
        large_tokens: TokenSource | None = None,
        *,
        client: GraphClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tokens = tokens
        self.large_tokens = large_tokens  # Mail.ReadWrite: drafts and upload sessions
        # `relayd send-test --direct` passes a client that prints each request.
        self.client = client or GraphClient(settings)
        self.client.gate = self._paused
        self.breaker = CircuitBreaker(start_probing=True)
        self._probe_lock = asyncio.Lock()
        self._auth_state_at_pause = auth.OK

    # --- Transport -----------------------------------------------------------------------

    def blocked(self) -> Blocked | None:
        if self.tokens is None:
            return Blocked(AUTH, None, "no token source is configured")
        state = self.tokens.state
        if state in _WAITING_STATES:
            return Blocked(AUTH, None, f"auth state {state}")
        if self._signed_in_again():
            self.breaker.resume()  # somebody fixed auth: probe now, not after the pause
        remaining = self.breaker.remaining()
        if remaining > 0:
            return Blocked(self.breaker.reason, remaining, "Microsoft Graph is paused")
        return None

    async def wait_until_available(self) -> None:
        if self.tokens is None:
            await asyncio.Event().wait()
        state = self.tokens.state
        if state in _WAITING_STATES:
            await self.tokens.wait_until_usable()
        elif self.breaker.reason == AUTH and self.breaker.is_open:
            while self.tokens.state == state:  # noqa: ASYNC110 (no event for a new sign-in)
                await asyncio.sleep(AUTH_STATE_POLL)
        else:
            await asyncio.Event().wait()

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.client.reconfigure(settings)

    async def close(self) -> None:
        await self.client.close()

    async def deliver(self, submission: Submission) -> Attempt:
        if self.breaker.probing:  # after a pause, one message at a time until one goes
            async with self._probe_lock:
                attempt = await self._deliver(submission)
        else:
            attempt = await self._deliver(submission)
        return attempt.using(_counted(attempt))

    # --- one message -------------------------------------------------------------------

    async def _deliver(self, submission: Submission) -> Attempt:
        blocked = self.blocked()
        if blocked is not None:
            reply = f"not attempted: {blocked.detail}"
            return Attempt.not_attempted(submission.recipients, blocked.reason, reply)
        mime = for_envelope(submission.content, submission.recipients)
        if encoded_size(len(mime)) > GRAPH_REQUEST_LIMIT:
            return await self._large(submission, mime, None)
        assert self.tokens is not None  # blocked() says so otherwise
        attempt = await self._request(
            self.tokens, submission, lambda token: self.client.send_mail(token, mime)
        )
        if isinstance(attempt, GraphReply):  # 413: Graph's limit is lower than ours
            return await self._large(submission, mime, attempt)
        return attempt

    async def _large(self, submission: Submission, mime: bytes, refused: GraphReply | None):
        """Over the request limit: draft + upload sessions, or held with the reason."""
        tokens = self.large_tokens if self.settings.upstream.graph_large_messages else None
        if tokens is None:
            return self._hold(submission, mime, "upstream.graph_large_messages is off", refused)
        plan = graph_large.plan(mime)
        if plan is None:
            why = "no attachment can be taken out to make it fit"
            return self._hold(submission, mime, why, refused)
        try:
            await tokens.access_token()
        except auth.AuthUnavailable as error:
            if error.state == auth.REAUTH_REQUIRED:  # e.g. Mail.ReadWrite not consented
                why = f"Entra ID refuses the token for drafts ({error.detail})"
                return self._hold(submission, mime, why, refused)
            # Otherwise a passing problem: _request pauses and the message waits.
        attempt = await self._request(
            tokens, submission, lambda token: graph_large.send(self.client, token, plan)
        )
        if isinstance(attempt, GraphReply):
            return self._hold(submission, mime, "Graph refused it as too large", attempt)
        return attempt

    async def _request(
        self, tokens: TokenSource, submission: Submission, call: Call
    ) -> Attempt | GraphReply:
        """``call`` with a token: one fresh token after a 401, then the judged answer
        (a GraphReply when Graph said the message is too large)."""
        for first_try in (True, False):
            try:
                token = await tokens.access_token()
            except auth.AuthUnavailable as error:
                self._pause_for_auth()  # released, not deferred: it goes once a token is back
                reply = f"no access token: {error}"
                return Attempt.not_attempted(submission.recipients, AUTH, reply)
            try:
                reply = await call(token)
            except GraphPaused as error:
                reply = f"not attempted: {error}"
                return Attempt.not_attempted(submission.recipients, self.breaker.reason, reply)
            except GraphUnreachable as error:
                self.metrics.graph_response(None)
                return self._unreachable(submission, error)
            self.metrics.graph_response(reply.status)
            if reply.status == 401 and first_try:
                # 401 InvalidAuthenticationToken: revoked early, or expired in flight.
                await tokens.token_rejected(token, reply_line(reply))
                continue
            if judge(reply) is Verdict.TOO_BIG:
                return reply
            return self._judged(submission, reply, tokens)
        raise AssertionError("unreachable")  # pragma: no cover

    def _judged(self, submission: Submission, reply: GraphReply, tokens: TokenSource) -> Attempt:
        recipients, line = submission.recipients, reply_line(reply)
        verdict = judge(reply)
        fields = {"queue_id": submission.queue_id, "request_id": reply.request_id}
        if verdict is Verdict.ACCEPTED:
            self.breaker.success()
            tokens.mark_accepted()
            log.debug("graph accepted", status=reply.status, **fields)
            return Attempt(delivered=recipients, reply=line)
        log.info("graph refused", reply=line, **fields)
        if verdict is Verdict.THROTTLED:
            return Attempt.deferred_all(recipients, THROTTLED, line, self._throttle(reply))
        if verdict is Verdict.PERMANENT:
            failed = permanent_line(reply)
            return Attempt(failed=tuple((r, failed) for r in recipients), reply=failed)
        if verdict is Verdict.TEMPORARY:
            return Attempt.deferred_all(recipients, TEMPORARY, line)
        if verdict is Verdict.SEND_AS_DENIED:
            log.error("Microsoft Graph refused the sender", reply=line, help=SEND_AS_EXPLANATION)
            explained = f"{line} ({SEND_AS_EXPLANATION})"
            return Attempt.deferred_all(recipients, SEND_AS_DENIED, explained)
        if verdict is Verdict.QUOTA:
            pause = self.settings.retry.max_delay
            self.breaker.trip(QUOTA, pause)
            log.error("the mailbox's sending quota is used up; pausing", reply=line, pause=pause)
            return Attempt.deferred_all(recipients, QUOTA, line, pause)
        return self._auth_trouble(submission, reply, verdict, tokens)

    def _auth_trouble(
        self, submission: Submission, reply: GraphReply, verdict: Verdict, tokens: TokenSource
    ) -> Attempt:
        """401 again, 403 ErrorAccessDenied, no mailbox: pause, never bounce."""
        line = reply_line(reply)
        if verdict is Verdict.PERMISSION:
            permissions = getattr(getattr(tokens, "resource", None), "permissions", "Mail.Send")
            line = f"{line} ({PERMISSION_EXPLANATION.format(permissions=permissions)})"
        elif verdict is Verdict.ACCOUNT:
            line = f"{line} ({ACCOUNT_EXPLANATION})"
        tokens.mark_rejected(line)
        pause = self._pause_for_auth()
        log.error(
            "Microsoft Graph refused the token or its permissions; deliveries wait",
            reply=line,
            queue_id=submission.queue_id,
            retry_in=round(pause, 1),
        )
        return Attempt.deferred_all(submission.recipients, AUTH, line, pause)

    def _hold(
        self, submission: Submission, mime: bytes, why: str, refused: GraphReply | None
    ) -> Attempt:
        said = f"; Graph answered {refused.text()}" if refused else ""
        reply = (
            f"held: the message ({format_size(len(mime))}, {encoded_size(len(mime)):,} bytes"
            f" in base64) is over Microsoft Graph's 4 MB request limit{said}, and {why}."
            " To send it: set upstream.graph_large_messages: true and run relayd auth login"
            " (it asks for Mail.ReadWrite), or send it by SMTP (upstream.transport: auto"
            f" with SMTP AUTH enabled); then relayd queue release {submission.queue_id}"
        )
        log.warning("too large for Microsoft Graph; held", queue_id=submission.queue_id, why=why)
        return Attempt.held(submission.recipients, TOO_BIG, reply)

    # --- pauses ------------------------------------------------------------------------

    def _paused(self) -> str | None:
        """The client's gate: a request that queued for a slot does not go during a pause."""
        remaining = self.breaker.remaining()
        return f"Microsoft Graph is paused for {remaining:.1f}s" if remaining > 0 else None

    def _throttle(self, reply: GraphReply) -> float:
        """429 / 503 / 504: pause the whole transport for Retry-After (or throttle_pause)."""
        pause = reply.retry_after
        if pause is None:
            pause = self.settings.upstream.throttle_pause
        self.breaker.trip(THROTTLED, pause)
        log.warning("Microsoft Graph throttles; pausing", reply=reply.text(), pause=pause)
        return pause

    def _unreachable(self, submission: Submission, error: GraphUnreachable) -> Attempt:
        reason = TIMEOUT if error.timed_out else CONNECTION
        retry = self.settings.retry
        pause = self.breaker.failure(reason, retry.min_delay, retry.max_delay)
        detail = f"cannot use {self.client.base}: {error}"
        log.warning("Microsoft Graph unreachable; pausing deliveries", error=detail, pause=pause)
        return Attempt.deferred_all(submission.recipients, reason, detail, pause)

    def _pause_for_auth(self) -> float:
        self._auth_state_at_pause = self.tokens.state if self.tokens is not None else auth.OK
        retry = self.settings.retry
        return self.breaker.failure(AUTH, retry.min_delay, retry.max_delay)

    def _signed_in_again(self) -> bool:
        if self.tokens is None or self.breaker.reason != AUTH or not self.breaker.is_open:
            return False
        state = self.tokens.state
        return state in _USABLE_STATES and self._auth_state_at_pause not in _USABLE_STATES


def _counted(attempt: Attempt) -> Usage | None:
    """What Exchange counted against the mailbox's sending limits: a send Graph accepted
    (202) costs one message and its recipients; a throttle, a refusal or a hold was no
    send at all. A request lost in flight may have been sent: keep what was reserved."""
    if attempt.delivered:
        return Usage(messages=1, recipients=len(attempt.delivered))
    if attempt.reason in (CONNECTION, TIMEOUT):
        return None
    return NOTHING

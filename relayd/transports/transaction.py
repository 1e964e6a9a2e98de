"""One SMTP mail transaction on a pooled session: MAIL, RCPT for each recipient, DATA.

Two rules make a pooled session safe to reuse:

* After any refusal or error mid-transaction the session is RSET before it carries
  another message (a refused DATA command leaves the transaction open: without RSET
  the next MAIL meets ``503 nested MAIL`` and fails). If RSET fails, the session is
  closed.
* A session in an unknown state is closed, never reused: after a reply that is no
  SMTP reply (garbage, too long, endless), a timeout or a connection error.

What the replies mean is the transport's judgement (``Judge``); this module only
knows the order of the steps and what each step's failure means for the session,
for the message (delivered, refused, may have been delivered) and for the upstream's
sending limits (``Usage``: Exchange counts a message whose content reached it and
the recipients it accepted).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol

import aiosmtplib

from relayd.transports.base import NOTHING, Attempt, Submission, Usage
from relayd.transports.replies import ACCOUNT_KINDS, Kind, classify, classify_recipient, reply_text
from relayd.transports.session import AmbiguousOutcome, DataCommandRefused, RelaySMTP

CONNECTION_ERRORS = (aiosmtplib.SMTPException, OSError, ssl.SSLError, asyncio.TimeoutError)
RSET_TIMEOUT = 10.0  # seconds; a server that cannot answer RSET is not reused anyway


class StaleSession(Exception):
    """A reused session was found closed at the first command: nothing was sent."""


class Judge(Protocol):
    """What the transport decides about replies and broken sessions."""

    def judge(self, recipients: tuple[str, ...], code: int, message: str) -> Attempt: ...

    def replied(self, code: int, message: str) -> None:
        """The upstream accepted the message (for the reply metrics)."""
        ...

    def broken(self, recipients: tuple[str, ...], error: BaseException) -> Attempt: ...

    def ambiguous(self, submission: Submission, error: AmbiguousOutcome) -> Attempt: ...


class Transaction:
    """Carries ``submission`` over ``session``; ``run`` returns the Attempt."""

    def __init__(
        self,
        session: RelaySMTP,
        submission: Submission,
        judge: Judge,
        *,
        command_timeout: float,
        data_timeout: float,
    ) -> None:
        self.session = session
        self.submission = submission
        self.judge = judge
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout

    async def run(self, reused: bool) -> Attempt:
        submission = self.submission
        options = mail_options(self.session, submission)
        if options is None:
            return self.judge.judge(
                submission.recipients,
                553,
                "5.6.7 The upstream server does not support SMTPUTF8, which this message needs",
            ).using(NOTHING)
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        session = self.session
        try:
            # One write and one wait for MAIL, the RCPTs and DATA where the server offers
            # PIPELINING; the calls below then read their replies from that group.
            await session.pipeline(
                submission.mail_from,
                submission.recipients,
                options=options,
                encoding=encoding,
                timeout=self.command_timeout,
            )
            await session.mail(submission.mail_from, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as error:
            return await self._refused(submission.recipients, error)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as error:
            if reused:
                raise StaleSession from error
            return self._broken(submission.recipients, error)
        except CONNECTION_ERRORS as error:
            return self._broken(submission.recipients, error)
        return await self._recipients_and_data(encoding)

    # --- the steps -------------------------------------------------------------------

    async def _recipients_and_data(self, encoding: str) -> Attempt:
        accepted: list[str] = []
        refused = Attempt(attempted=True)
        recipients = self.submission.recipients
        try:
            for recipient in recipients:
                try:
                    await self.session.rcpt(recipient, encoding=encoding)
                    accepted.append(recipient)
                except aiosmtplib.SMTPRecipientRefused as error:
                    kind = classify_recipient(error.code, error.message)
                    if kind is Kind.GARBLED or kind in ACCOUNT_KINDS:
                        # About the session or the whole account, not this recipient.
                        return await self._refused(recipients, error)
                    refused = refused.merge(self._judge_one(recipient, error))
                except ValueError:  # cannot be written on an SMTP command line at all
                    unsendable = reply_text(501, "5.1.3 Address cannot be sent over SMTP")
                    refused = refused.merge(Attempt(failed=((recipient, unsendable),)))
        except CONNECTION_ERRORS as error:
            return self._broken(recipients, error)
        if not accepted:
            await self._reset()
            return refused.using(NOTHING)
        return (await self._data(tuple(accepted))).merge(refused)

    async def _data(self, accepted: tuple[str, ...]) -> Attempt:
        counted = Usage(messages=1, recipients=len(accepted))
        try:
            response = await self.session.data(
                self.submission.content,
                timeout=self.command_timeout,
                reply_timeout=self.data_timeout,
            )
        except AmbiguousOutcome as error:
            return self.judge.ambiguous(self.submission, error).using(counted)
        except DataCommandRefused as error:
            return await self._refused(accepted, error)  # nothing sent, nothing counted
        except aiosmtplib.SMTPResponseException as error:
            if classify(error.code, error.message) is Kind.GARBLED:
                return self._broken(accepted, error)  # an unreadable answer to DATA
            # The message was refused after the final dot: Exchange has seen it.
            return (await self._refused(accepted, error)).using(counted)
        except CONNECTION_ERRORS as error:
            return self._broken(accepted, error)  # before 354: nothing was sent
        self.judge.replied(response.code, response.message)
        return Attempt(
            delivered=accepted, reply=reply_text(response.code, response.message), usage=counted
        )

    # --- what a failed step means --------------------------------------------------

    async def _refused(
        self, recipients: tuple[str, ...], error: aiosmtplib.SMTPResponseException
    ) -> Attempt:
        """A reply refused the transaction: judge it, then RSET (or close) the session."""
        if classify(error.code, error.message) is Kind.GARBLED:
            return self._broken(recipients, error)
        attempt = self.judge.judge(recipients, error.code, error.message)
        await self._reset()
        return attempt.using(NOTHING)

    def _judge_one(self, recipient: str, error: aiosmtplib.SMTPRecipientRefused) -> Attempt:
        return self.judge.judge((recipient,), error.code, error.message)

    def _broken(self, recipients: tuple[str, ...], error: BaseException) -> Attempt:
        """The session is in an unknown state: close it; nothing reached the upstream."""
        self.session.close()
        return self.judge.broken(recipients, error).using(NOTHING)

    async def _reset(self) -> None:
        """RSET so the session can carry the next message; close it if that fails."""
        session = self.session
        if not session.is_connected:
            return
        try:
            response = await session.rset(timeout=min(self.command_timeout, RSET_TIMEOUT))
        except CONNECTION_ERRORS:
            session.close()
            return
        if response.code != aiosmtplib.SMTPStatus.completed:
            session.close()


def mail_options(session: aiosmtplib.SMTP, submission: Submission) -> list[str] | None:
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

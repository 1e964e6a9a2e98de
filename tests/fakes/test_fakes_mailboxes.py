"""The fakes' per-mailbox behaviour, checked with plain clients (the routes tests rely on it)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relayd import config
from tests.auth_helpers import auth_overrides, sign_in
from tests.fakes.entra import MAILBOX, FakeEntra
from tests.fakes.exchange import SEND_AS_DENIED_AT_MAIL, TOO_MANY_CONNECTIONS, FakeExchange
from tests.fakes.mailboxes import RATE_EXCEEDED, REFUSE, Mailboxes
from tests.helpers import base_config, deep_merge, make_message

OTHER = "approvals@contoso.example"
SHARED = "hr@contoso.example"


def tokens_for(*users: str) -> tuple[dict[str, str], object]:
    """One token per user and a validator that accepts exactly those."""
    tokens = {user: f"token-of-{user}" for user in users}
    return tokens, lambda user, token: tokens.get(user) == token


async def connect(exchange: FakeExchange, ca_file: Path, user: str, token: str) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=exchange.port,
        start_tls=True,
        tls_context=ssl.create_default_context(cafile=str(ca_file)),
        timeout=10,
    )
    await client.connect()
    await client.auth_xoauth2(user, token)
    return client


@pytest.fixture
async def two_mailboxes(ca: trustme.CA):
    tokens, validator = tokens_for(MAILBOX, OTHER)
    fake = await FakeExchange(ca, validator=validator, mailbox=MAILBOX, mailboxes=(OTHER,)).start()
    yield fake, tokens
    await fake.stop()


async def test_each_message_records_the_mailbox_that_signed_in(two_mailboxes, ca_file) -> None:
    exchange, tokens = two_mailboxes
    for user in (MAILBOX, OTHER):
        client = await connect(exchange, ca_file, user, tokens[user])
        await client.sendmail(user, ["a@example.org"], make_message(sender=user))
        await client.quit()
    assert [m.mailbox for m in exchange.messages] == [MAILBOX, OTHER]
    assert len(exchange.sent_through(OTHER)) == 1


async def test_three_connections_per_mailbox_not_per_client(two_mailboxes, ca_file) -> None:
    exchange, tokens = two_mailboxes
    clients = [await connect(exchange, ca_file, MAILBOX, tokens[MAILBOX]) for _ in range(3)]
    clients += [await connect(exchange, ca_file, OTHER, tokens[OTHER]) for _ in range(3)]
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await connect(exchange, ca_file, OTHER, tokens[OTHER])
    assert f"{refused.value.code} {refused.value.message}" == TOO_MANY_CONNECTIONS
    assert exchange.peak_connections_of(MAILBOX) == exchange.peak_connections_of(OTHER) == 3
    await clients.pop().quit()  # one of OTHER's closes: room for another
    await asyncio.sleep(0.1)
    clients.append(await connect(exchange, ca_file, OTHER, tokens[OTHER]))
    for client in clients:
        await client.quit()


async def test_send_as_needs_a_grant_for_the_signed_in_mailbox(two_mailboxes, ca_file) -> None:
    exchange, tokens = two_mailboxes
    client = await connect(exchange, ca_file, OTHER, tokens[OTHER])
    with pytest.raises(aiosmtplib.SMTPDataError) as denied:
        await client.sendmail(SHARED, ["a@example.org"], make_message(sender=SHARED))
    assert denied.value.code == 554
    assert f"5.2.252 SendAsDenied; {OTHER} not allowed to send as {SHARED}" in denied.value.message
    exchange.grant_send_as(OTHER, SHARED)
    await client.sendmail(SHARED, ["a@example.org"], make_message(sender=SHARED))
    assert exchange.messages[-1].mailbox == OTHER and exchange.messages[-1].mail_from == SHARED
    assert not exchange.permitted(SHARED, MAILBOX)  # the grant is OTHER's alone
    exchange.send_as_check = "mail"
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.sendmail("ceo@contoso.example", ["a@example.org"], make_message())
    assert f"{refused.value.code} {refused.value.message}" == SEND_AS_DENIED_AT_MAIL
    await client.quit()


async def test_the_rate_is_per_mailbox_and_the_excess_delayed(two_mailboxes, ca_file) -> None:
    exchange, tokens = two_mailboxes
    exchange.mailboxes.rate_limit(OTHER, 2, per=0.5)
    fast = await connect(exchange, ca_file, MAILBOX, tokens[MAILBOX])
    slow = await connect(exchange, ca_file, OTHER, tokens[OTHER])
    for _ in range(5):
        await slow.sendmail(OTHER, ["a@example.org"], make_message(sender=OTHER))
    for _ in range(5):
        await fast.sendmail(MAILBOX, ["a@example.org"], make_message(sender=MAILBOX))
    assert exchange.mailboxes.max_in_window(OTHER, 0.5) == 2
    assert exchange.mailboxes.max_in_window(MAILBOX, 0.5) == 5
    # The 3rd and the 5th wait; the 4th too when it comes a hair before the 2nd's slot frees.
    assert exchange.mailboxes.rate_delayed[OTHER.lower()] in (2, 3)
    await fast.quit()
    await slow.quit()


async def test_refuse_mode_answers_421_and_counts(two_mailboxes, ca_file) -> None:
    exchange, tokens = two_mailboxes
    exchange.mailboxes.rate_limit(OTHER, 1, per=30, mode=REFUSE)
    client = await connect(exchange, ca_file, OTHER, tokens[OTHER])
    await client.sendmail(OTHER, ["a@example.org"], make_message(sender=OTHER))
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await client.sendmail(OTHER, ["a@example.org"], make_message(sender=OTHER))
    assert f"{refused.value.code} {refused.value.message}" == RATE_EXCEEDED
    assert exchange.mailboxes.rate_refused[OTHER.lower()] == 1 and len(exchange.messages) == 1


def settings_for(tmp_path: Path, entra: FakeEntra, ca_file: Path, mailbox: str):
    tmp_path.mkdir()
    overrides = deep_merge(
        auth_overrides(tmp_path, entra, ca_file), {"upstream": {"mailbox": mailbox}}
    )
    document = deep_merge(base_config(tmp_path), overrides)
    return config.from_mapping(document, str(tmp_path / "relayd.yaml"), environ={})


def test_sliding_window_slots() -> None:
    boxes = Mailboxes("a@x.example")
    boxes.rate_limit("A@x.example", 2, per=10)
    assert [boxes.admit("a@x.example", now=0) for _ in range(4)] == [0, 0, 10, 10]
    assert boxes.admit("a@x.example", now=15) == 5  # the 5th goes at 20 (3rd's slot + 10)


def test_login_hint_chooses_the_user_and_revocation_is_per_user(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    with FakeEntra(ca, users=(OTHER,)) as entra:
        # relayd's login_hint is the mailbox it signs in for
        assert sign_in(settings_for(tmp_path / "a", entra, ca_file, MAILBOX), ca_file).ok
        assert sign_in(settings_for(tmp_path / "b", entra, ca_file, OTHER), ca_file).ok
        assert entra.valid_refresh_tokens(OTHER) and entra.valid_refresh_tokens(MAILBOX)
        entra.revoke_sessions(OTHER, code=50173)
        assert not entra.valid_refresh_tokens(OTHER) and not entra.valid_access_tokens(OTHER)
        assert entra.valid_refresh_tokens(MAILBOX) and entra.valid_access_tokens(MAILBOX)
        entra.add_user("nobody.hinted@contoso.example")
        assert entra.user_for_hint(None) == MAILBOX
        assert entra.user_for_hint("unknown@contoso.example") == MAILBOX
        entra.signin_user = "someone.else@contoso.example"
        assert entra.user_for_hint(OTHER) == "someone.else@contoso.example"

"""A refreshed grant is never lost: the refresh path against the sandbox as TikTok,
on both stores (memory, and MongoDB over the wire with both drivers).

The sandbox enforces rotation: a refresh revokes the refresh token it was given, so
a grant that is not stored, or a refresh with a stale token, shows as
``invalid_grant``. ``record_refreshes`` keeps what the sandbox saw. MongoDB fails
by SecantusDB's ``failCommand`` failpoint; the memory store, which cannot fail,
through a wrapper that refuses its writes while "down".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tornado.curl_httpclient import CurlError
from tornado.httpclient import HTTPClientError
from tornado.simple_httpclient import HTTPTimeoutError

from core.errors import (
    Conflict,
    OutcomeUnknown,
    ProviderRejected,
    ProviderUnavailable,
    StoreUnavailable,
)
from server import build_gateway
from services.accounts import (
    LEASE_STORE_CALLS,
    AccessToken,
    AccountService,
    RefreshOutcome,
    refresh_lease_seconds,
)
from services.http_client import close_http_client, make_http_client, nothing_sent
from services.metrics import GatewayMetrics, InstrumentedStore
from services.tiktok import TikTokClient
from storage.base import Account, AccountStatus, AccountTokens, Store, TokenGrant
from storage.mongodb import APP_NAME, MongoStore
from tests.fixtures_mongo import mongo_failpoint
from tests.flow import RefreshLog, live_sandbox, record_refreshes, sandbox_grant, tiktok_for
from tests.processes import poll_until
from tests.support import free_port, make_config, utc_now

gen_test = pytest.mark.gen_test(timeout=60)
OWNER = "owner-1"
# The stored access token expires within the service's default 300 s skew: due.
DUE = timedelta(minutes=1)


@pytest.fixture
def sandbox(io_loop):
    with live_sandbox(io_loop, pkce="optional") as sandbox:
        yield sandbox


async def connect(store: Store, sandbox: Any) -> Account:
    grant = sandbox_grant(sandbox, expires_in=DUE)
    return await store.save_account_tokens(OWNER, grant, now=utc_now())


def refreshes(metrics: GatewayMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "tiktok_gateway_refreshes_total", {"outcome": outcome}
    )
    return value or 0.0


class SavesFail(InstrumentedStore):
    """The memory store's outage: its writes of refreshed tokens fail while ``down``."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner, GatewayMetrics())
        self.down = False

    async def save_refreshed_tokens(self, *args: Any, **kwargs: Any) -> bool:
        if self.down:
            raise StoreUnavailable(technical_message="the test took the store down")
        return await self.inner.save_refreshed_tokens(*args, **kwargs)


class Outage:
    """The store failing to write refreshed tokens, and coming back."""

    def __init__(self, store: Store, request: pytest.FixtureRequest) -> None:
        self.mongo_uri = None
        if isinstance(store, MongoStore):
            self.store: Store = store
            self.mongo_uri = request.getfixturevalue("mongo_server").uri
        else:
            self.store = SavesFail(store)  # type: ignore[abstract]  # methods generated

    @contextlib.contextmanager
    def saves_fail(self) -> Iterator[None]:
        if self.mongo_uri is not None:
            # Every update the gateway's client sends fails: the connection drops.
            with mongo_failpoint(self.mongo_uri, failCommands=["update"],
                                 closeConnection=True, appName=APP_NAME):
                yield
            return
        assert isinstance(self.store, SavesFail)
        self.store.down = True
        try:
            yield
        finally:
            self.store.down = False


@dataclass
class Connected:
    """An account connected through ``store``: its tokens as stored then, the sandbox's
    refreshes from then on, and an AccountService (with its metrics) on ``store``."""

    store: Store
    account: Account
    before: AccountTokens
    seen: RefreshLog
    metrics: GatewayMetrics
    accounts: AccountService

    async def access_token(self) -> AccessToken:
        return await self.accounts.access_token(OWNER, self.account.id)

    async def stored(self) -> AccountTokens | None:
        return await self.store.get_account_tokens(self.account.id)

    async def token_refused(self) -> None:
        """The access-token endpoint's 503: the store did not take TikTok's answer."""
        with pytest.raises(StoreUnavailable):
            await self.access_token()


async def connected(store: Store, sandbox: Any, tiktok: TikTokClient,
                    **service_options: Any) -> Connected:
    account = await connect(store, sandbox)
    before = await store.get_account_tokens(account.id)
    assert before is not None
    seen = record_refreshes(sandbox)
    metrics = GatewayMetrics()
    accounts = AccountService(store=store, tiktok=tiktok, metrics=metrics, **service_options)
    return Connected(store, account, before, seen, metrics, accounts)


@pytest.fixture
def staging(make_store, request, sandbox, tiktok):
    """``async with staging() as (outage, connected):`` an account connected through a
    fresh store behind its outage, and the service on the outage's store."""

    @contextlib.asynccontextmanager
    async def staged() -> AsyncIterator[tuple[Outage, Connected]]:
        async with make_store() as raw:
            outage = Outage(raw, request)
            yield outage, await connected(outage.store, sandbox, tiktok)

    return staged


# -- the store failing at the save -------------------------------------------------


@gen_test
async def test_a_grant_whose_save_failed_lands_and_is_handed_out_without_a_second_refresh(
    staging
):
    async with staging() as (outage, c):
        with outage.saves_fail():
            await c.token_refused()
            assert c.account.id in c.accounts.unsaved
            assert await c.stored() == c.before  # nothing written
            # Asked again while the store still fails: 503 again, TikTok not called again.
            await c.token_refused()
        [(presented, answer)] = c.seen.calls
        assert presented == c.before.refresh_token and answer is not None

        token = await c.access_token()
        stored = await c.stored()
        assert token.access_token == stored.access_token == answer["access_token"]
        assert stored.refresh_token == answer["refresh_token"]
        assert stored.version == c.before.version + 1
        assert len(c.seen.calls) == 1
        assert c.account.id not in c.accounts.unsaved
        # What was stored is TikTok's live refresh token: the next refresh is honoured.
        assert await c.accounts.refresh_account(c.account, force=True) is RefreshOutcome.REFRESHED
        assert c.seen.presented[-1] == answer["refresh_token"] and c.seen.answers[-1] is not None
        assert await c.accounts.close(timeout=1) == 0


@gen_test
async def test_a_grant_whose_save_failed_lands_in_the_background(staging):
    async with staging() as (outage, c):
        with outage.saves_fail():
            with pytest.raises(StoreUnavailable):
                await c.accounts.refresh_account(c.account)  # the background refresher's path
        # Nobody asks: the write is retried until it lands.
        stored = await poll_until(
            c.stored, lambda tokens: tokens.version == c.before.version + 1,
            timeout=20, what="the unsaved grant stored",
        )
        [(_, answer)] = c.seen.calls
        assert stored.refresh_token == answer["refresh_token"]
        assert c.account.id not in c.accounts.unsaved
        token = await c.access_token()
        assert token.access_token == answer["access_token"]
        assert len(c.seen.calls) == 1
        # Its background write (releasing the lease it landed with) ends before the store.
        assert await c.accounts.close(timeout=5) == 0


@gen_test
async def test_closing_the_service_waits_for_the_store_to_take_the_grant(staging):
    async with staging() as (outage, c):
        with outage.saves_fail():
            await c.token_refused()
            closing = asyncio.ensure_future(c.accounts.close(timeout=30))
            await asyncio.sleep(0.5)  # a few failed attempts
            assert not closing.done()
        assert await closing == 0
        [(_, answer)] = c.seen.calls
        assert (await c.stored()).refresh_token == answer["refresh_token"]


@gen_test
async def test_a_grant_still_unsaved_when_closing_runs_out_is_reported_lost(staging, caplog):
    async with staging() as (outage, c):
        with outage.saves_fail(), caplog.at_level(logging.INFO, logger="gateway.accounts"):
            await c.token_refused()
            assert await c.accounts.close(timeout=0.5) == 1
        [(_, answer)] = c.seen.calls
        lost = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(c.account.id in m and "lost" in m for m in lost), lost
        for token in (answer["access_token"], answer["refresh_token"]):
            assert token not in caplog.text


# -- newer tokens stored meanwhile ---------------------------------------------------


async def first_refresh_sent(sandbox: Any) -> None:
    """Until the sandbox has received one refresh (TikTok may still be answering it)."""

    async def refreshes_sent() -> int:
        return sandbox.stats["token_refresh"]

    await poll_until(refreshes_sent, lambda n: n == 1, timeout=10, interval=0.02,
                     what="the refresh sent to TikTok")


async def reconnect_during_refresh(
    c: Connected, sandbox: Any, *, refusal: bool
) -> tuple[Any, TokenGrant]:
    """A token request whose refresh TikTok answers late; the user connects again
    meanwhile. Returns the request's result and the reconnect's grant."""
    body = None
    if refusal:
        body = json.dumps({"error": "invalid_grant", "error_description": "revoked",
                           "log_id": "sandbox-log"})
    sandbox.add_fault("token", status=200, delay=1.0, body=body)
    request = asyncio.ensure_future(c.access_token())
    await first_refresh_sent(sandbox)
    fresh = sandbox_grant(sandbox, expires_in=timedelta(hours=2))
    await c.store.save_account_tokens(OWNER, fresh, now=utc_now())
    assert not request.done()
    return await request, fresh


@gen_test
async def test_a_reconnect_during_a_refresh_wins_and_is_handed_out(make_store, sandbox, tiktok):
    async with make_store() as store:
        c = await connected(store, sandbox, tiktok)
        token, fresh = await reconnect_during_refresh(c, sandbox, refusal=False)
        assert token.access_token == fresh.access_token
        stored = await c.stored()
        assert (stored.access_token, stored.refresh_token) == (fresh.access_token,
                                                               fresh.refresh_token)
        assert (await store.get_account(c.account.id)).status is AccountStatus.CONNECTED
        assert len(c.seen.calls) == 1 and c.seen.answers[0] is not None  # TikTok did refresh
        assert refreshes(c.metrics, "superseded") == 1


@gen_test
async def test_a_refusal_of_the_replaced_refresh_token_wipes_nothing(
    make_store, sandbox, tiktok
):
    async with make_store() as store:
        c = await connected(store, sandbox, tiktok)
        token, fresh = await reconnect_during_refresh(c, sandbox, refusal=True)
        assert token.access_token == fresh.access_token
        assert (await store.get_account(c.account.id)).status is AccountStatus.CONNECTED
        assert (await c.stored()).refresh_token == fresh.refresh_token
        assert refreshes(c.metrics, "reauthorization_required") == 0
        assert refreshes(c.metrics, "superseded") == 1


@gen_test
async def test_a_refusal_of_the_stored_refresh_token_needs_reauthorization(
    make_store, sandbox, tiktok
):
    async with make_store() as store:
        account = await connect(store, sandbox)
        sandbox.revoke_all_for(account.platform_account_id)
        accounts = AccountService(store=store, tiktok=tiktok)
        with pytest.raises(Conflict):
            await accounts.access_token(OWNER, account.id)
        refused = await store.get_account(account.id)
        assert refused.status is AccountStatus.REAUTHORIZATION_REQUIRED
        assert await store.get_account_tokens(account.id) is None


# -- rotation, one refresh after another -----------------------------------------------


@gen_test
async def test_ten_refreshes_in_a_row_each_use_the_last_rotated_token(
    make_store, sandbox, tiktok
):
    async with make_store() as store:
        # A skew longer than the sandbox's 24 h tokens: every request refreshes once.
        c = await connected(store, sandbox, tiktok, refresh_skew_seconds=90000)
        handed_out = [await c.access_token() for _ in range(10)]

        seen = c.seen
        assert len(seen.calls) == 10
        assert all(answer is not None for answer in seen.answers)  # none refused
        issued = [c.before.refresh_token] + [answer["refresh_token"] for answer in seen.answers]
        assert seen.presented == issued[:-1]  # each the one the refresh before issued
        assert [t.access_token for t in handed_out] == [a["access_token"] for a in seen.answers]
        stored = await c.stored()
        assert stored.refresh_token == issued[-1]
        assert stored.version == c.before.version + 10


# -- one clock for the lease -----------------------------------------------------------


@gen_test
async def test_a_process_whose_clock_runs_ahead_still_waits_for_the_lease(
    make_store, sandbox, tiktok
):
    """Lease expiry is judged by the store's clock, not by each process's."""
    async with make_store() as store:
        c = await connected(store, sandbox, tiktok)
        ahead = AccountService(store=store, tiktok=tiktok,
                               clock=lambda: utc_now() + timedelta(minutes=10))
        sandbox.add_fault("token", status=200, delay=1.0)  # TikTok answers late
        one = asyncio.ensure_future(c.access_token())
        await first_refresh_sent(sandbox)
        other = await ahead.access_token(OWNER, c.account.id)
        assert (await one).access_token == other.access_token
        assert len(c.seen.calls) == 1 and c.seen.answers[0] is not None
        assert other.access_token == c.seen.answers[0]["access_token"]


def test_the_lease_outlives_every_call_made_under_it():
    memory = make_config(TIKTOK_CONNECT_TIMEOUT_SECONDS="2", TIKTOK_REQUEST_TIMEOUT_SECONDS="20")
    assert refresh_lease_seconds(memory) > 22
    mongo = make_config(
        MONGODB_URI="mongodb://127.0.0.1:1/", MONGODB_TIMEOUT_MS="500",
        MONGODB_OPERATION_TIMEOUT_MS="5000", TIKTOK_CONNECT_TIMEOUT_SECONDS="2",
        TIKTOK_REQUEST_TIMEOUT_SECONDS="20",
    )
    assert refresh_lease_seconds(mongo) > 22 + LEASE_STORE_CALLS * 5.5
    assert build_gateway(mongo).accounts.lease_seconds == refresh_lease_seconds(mongo)
    with pytest.raises(ValueError, match="does not outlive a call to TikTok"):
        AccountService(store=build_gateway(memory).store, tiktok=tiktok_for("http://x.invalid"),
                       lease_seconds=5.0)


# -- what TikTok answers ---------------------------------------------------------------


def token_body(**fields: Any) -> str:
    body = {"access_token": "act.parsed", "refresh_token": "rft.parsed", "expires_in": 7200,
            "refresh_expires_in": 15552000, "scope": "user.info.basic",
            "token_type": "Bearer", "open_id": "sbx-open-id"}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None})


@gen_test
@pytest.mark.parametrize(
    "fields",
    [
        {"open_id": None},
        {"expires_in": "7200", "refresh_expires_in": "15552000"},
        {"open_id": None, "expires_in": "7200", "refresh_expires_in": "15552000"},
    ],
    ids=["no-open-id", "string-lifetimes", "both"],
)
async def test_a_refresh_answer_without_open_id_or_with_string_lifetimes_is_accepted(
    sandbox, tiktok, fields
):
    sandbox.add_fault("token", status=200, body=token_body(**fields))
    response = await tiktok.refresh("rft.any")
    assert (response.access_token, response.refresh_token) == ("act.parsed", "rft.parsed")
    assert (response.expires_in, response.refresh_expires_in) == (7200, 15552000)
    assert response.open_id == ("" if "open_id" in fields else "sbx-open-id")


@gen_test
@pytest.mark.parametrize(
    "fields",
    [
        {"access_token": None},
        {"refresh_token": None},
        {"access_token": ""},
        {"expires_in": "7200.5"},
        {"expires_in": "-7200"},
        {"expires_in": "0"},
        {"expires_in": True},
        {"refresh_expires_in": "soon"},
    ],
    ids=["no-access-token", "no-refresh-token", "empty-access-token", "fraction",
         "negative", "zero", "boolean", "words"],
)
async def test_a_refresh_answer_without_usable_tokens_is_refused(sandbox, tiktok, fields):
    sandbox.add_fault("token", status=200, body=token_body(**fields))
    with pytest.raises(ProviderUnavailable, match="unexpected token body"):
        await tiktok.refresh("rft.any")


@gen_test
async def test_an_error_key_refuses_a_refresh_answer_even_with_tokens(sandbox, tiktok):
    sandbox.add_fault("token", status=200, body=token_body(error="invalid_grant"))
    with pytest.raises(ProviderRejected) as refused:
        await tiktok.refresh("rft.any")
    assert refused.value.details["providerError"] == "invalid_grant"


@gen_test
async def test_a_code_exchange_still_needs_open_id(sandbox, tiktok):
    sandbox.add_fault("token", status=200, body=token_body(open_id=None))
    with pytest.raises(ProviderUnavailable, match="unexpected token body"):
        await tiktok.exchange_code("a-code", None)


@gen_test
async def test_string_lifetimes_become_the_stored_expiries(make_store, sandbox, tiktok):
    async with make_store() as store:
        c = await connected(store, sandbox, tiktok)
        sandbox.add_fault("token", status=200, body=token_body(
            open_id=None, expires_in="7200", refresh_expires_in="15552000"))
        before = utc_now()
        token = await c.access_token()
        after = datetime.now(UTC)
        assert token.access_token == "act.parsed"
        assert token.open_id == c.account.platform_account_id  # the stored identity
        assert before + timedelta(seconds=7200) <= token.expires_at
        assert token.expires_at <= after + timedelta(seconds=7200)
        stored = await c.stored()
        assert stored.refresh_token == "rft.parsed"
        assert before + timedelta(days=180) <= stored.refresh_token_expires_at


# -- an answer that never arrived ------------------------------------------------------


@gen_test
@pytest.mark.parametrize("client_kind", ["curl", "simple"])
async def test_a_refresh_whose_answer_never_arrived_keeps_the_tokens(
    make_store, sandbox, client_kind, caplog
):
    http = make_http_client(make_config(TIKTOK_HTTP_CLIENT=client_kind))
    try:
        tiktok = tiktok_for(sandbox.url, request_timeout=0.5, http=http)
        async with make_store() as store:
            c = await connected(store, sandbox, tiktok)
            # TikTok takes the refresh, and answers after the gateway stopped waiting.
            sandbox.add_fault("token", status=200, delay=1.5)
            with caplog.at_level(logging.WARNING, logger="gateway.accounts"):
                with pytest.raises(ProviderUnavailable) as raised:
                    await c.access_token()
            assert "never arrived" in raised.value.technical_message
            assert refreshes(c.metrics, "unknown") == 1
            assert refreshes(c.metrics, "unavailable") == 0
            assert "may have rotated the refresh token" in caplog.text
            assert await c.stored() == c.before  # kept, not wiped

            # TikTok did rotate: the next refresh is refused and says so.
            await poll_until(lambda: asyncio.sleep(0, c.seen.calls), bool, timeout=10,
                             what="TikTok done with the late refresh")
            assert c.seen.answers[0] is not None
            with pytest.raises(Conflict):
                await c.access_token()
    finally:
        close_http_client(http)


@gen_test
async def test_a_refresh_that_never_connected_is_unavailable_not_unknown(make_store, sandbox):
    tiktok = tiktok_for(f"http://127.0.0.1:{free_port()}")  # nothing listens: refused
    async with make_store() as store:
        c = await connected(store, sandbox, tiktok)
        with pytest.raises(ProviderUnavailable) as raised:
            await c.access_token()
        assert not isinstance(raised.value, OutcomeUnknown)
        assert refreshes(c.metrics, "unavailable") == 1
        assert refreshes(c.metrics, "unknown") == 0
        assert await c.stored() == c.before


@pytest.mark.parametrize(
    ("error", "unsent"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (HTTPTimeoutError("Timeout while connecting to 10.0.0.1:443"), True),
        (HTTPTimeoutError("Timeout in request queue"), True),
        (HTTPTimeoutError("Timeout during request"), False),
        (HTTPClientError(599, "Stream closed"), False),
        (ConnectionResetError(104, "Connection reset by peer"), False),
        (CurlError(7, "Failed to connect to 127.0.0.1 port 1: Connection refused"), True),
        (CurlError(6, "Could not resolve host: tiktok.invalid"), True),
        (CurlError(28, "Connection timed out after 2001 milliseconds"), True),
        (CurlError(28, "Resolving timed out after 2000 milliseconds"), True),
        (CurlError(28, "Operation timed out after 4001 milliseconds with 0 bytes received"),
         False),
        (CurlError(52, "Empty reply from server"), False),
    ],
)
def test_what_surely_never_reached_tiktok(error, unsent):
    assert nothing_sent(error) is unsent

"""Account events emitted by their real causes (issue 15), over real HTTP: the connection
flow against the live sandbox, the accounts API, TikTok's signed removal webhook, the
sandbox refusing a refresh, and the refresher's rounds with the clock pushed. Each event
is recorded in the same write as its change, relayed, pushed to a real receiver that
verifies it with the ``standardwebhooks`` package, and listed by ``GET /events`` in the
order it happened. Memory store and MongoDB over the wire (SecantusDB, motor and PyMongo).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from tornado.httpclient import HTTPResponse

from bench.mongo_scale import plan_stages
from server import make_app, start_event_workers
from services.event_types import (
    CONNECTED,
    REAUTHORIZATION_DUE,
    REAUTHORIZATION_REQUIRED,
    REVOKED,
)
from services.events import AccountEvents
from services.product_auth import TOKENS_SCOPE
from services.refresher import Refresher
from storage.base import Account, AccountStatus, Store, TokenGrant
from storage.mongodb import (
    ACCOUNTS_COLLECTION,
    APP_NAME,
    EXPIRY_NOTICE_INDEX,
    EXPIRY_NOTICE_KEYS,
    MongoStore,
    expiry_notice_query,
)
from tests import flow
from tests.fixtures_mongo import mongo_failpoint, open_mongo_store
from tests.flow import sandbox_settings
from tests.gateway_events import EVENTS_BEARER, SECRET, WAIT, serving
from tests.gateway_events import Running as DeliveryRunning
from tests.processes import poll_until
from tests.receiver import Receiver
from tests.support import assert_envelope, bearer, make_config

OWNER = "user-123"
# Every access token is due: the access-token endpoint always asks TikTok.
ALWAYS_DUE = "90000"
ACCOUNT_KEYS = {
    "id", "platform", "platformAccountId", "displayName", "avatarUrl", "username",
    "scopes", "status", "profileStatus", "accessTokenExpiresAt", "refreshTokenExpiresAt",
    "createdAt", "updatedAt",
}

gen_test = pytest.mark.gen_test(timeout=120)


class Running(DeliveryRunning):
    async def call(self, method: str, path: str, headers: dict[str, str]) -> HTTPResponse:
        return await self.client.fetch(
            self.url + path, method=method, headers=headers, raise_error=False,
            body=b"" if method == "POST" else None, allow_nonstandard_methods=True,
        )

    async def connect(self) -> dict[str, Any]:
        """The sandbox's user through the whole flow; the account as GET /accounts shows it."""
        await flow.connect(self.client, self.url, owner=OWNER)
        [account] = json.loads((await self.call("GET", "/accounts", bearer(OWNER))).body)[
            "accounts"]
        return dict(account)

    async def shown(self, account_id: str) -> dict[str, Any]:
        response = await self.call("GET", f"/accounts/{account_id}", bearer(OWNER))
        assert response.code == 200, response.body
        return dict(json.loads(response.body))

    async def recorded(self) -> list[dict[str, Any]]:
        """Every event of the pull feed, in its order."""
        response = await self.call("GET", "/events?limit=500", EVENTS_BEARER)
        assert response.code == 200, response.body
        return list(json.loads(response.body)["events"])

    async def tiktok_removes(self, sandbox: Any, open_id: str, reason: int) -> int:
        """TikTok's signed ``authorization.removed`` webhook for ``open_id``; our status."""
        return int(await sandbox.send_webhook(
            self.url + "/webhooks/tiktok", "authorization.removed", open_id, {"reason": reason}))

    def refresher(self) -> Refresher:
        # The gateway's own AccountService, as start_refresher hands it over.
        return Refresher(store=self.store, accounts=self.gateway.accounts, ahead_seconds=3600)


@contextlib.asynccontextmanager
async def running(
    store: Store, sandbox: Any, receiver: Receiver | None = None, **settings: str
) -> AsyncIterator[Running]:
    """The gateway's app on a free port against the sandbox, its event workers started
    and wired as ``serve()`` does them; push to ``receiver`` when one is given."""
    env = sandbox_settings(sandbox.url) | {"REFRESH_SKEW_SECONDS": ALWAYS_DUE} | settings
    if receiver is not None:
        env |= {"PRODUCT_WEBHOOK_URL": receiver.url, "PRODUCT_WEBHOOK_SECRET": SECRET}
    async with serving(make_app(make_config(**env), store=store), start_event_workers,
                       Running, {"request_timeout": 20}) as run:
        yield run


async def next_event(receiver: Receiver, count: int) -> dict[str, Any]:
    """The ``count``-th event the receiver accepted (verified), once it has."""

    async def accepted() -> int:
        return len(receiver.accepted)

    await poll_until(accepted, lambda n: n >= count, timeout=WAIT, interval=0.02,
                     what=f"event #{count} delivered")
    await asyncio.sleep(0.2)  # nothing more comes for the same change
    assert len(receiver.accepted) == count, [e["type"] for e in receiver.accepted]
    return receiver.accepted[-1]


def assert_event(event: dict[str, Any], event_type: str, account_id: str, **data: Any) -> None:
    assert event["type"] == event_type
    assert event["id"].startswith("evt_")
    assert set(event["data"]["account"]) == ACCOUNT_KEYS
    assert event["data"]["account"]["id"] == account_id
    assert {k: v for k, v in event["data"].items() if k != "account"} == data


async def next_change(
    run: Running, receiver: Receiver, count: int, event_type: str, account_id: str, **data: Any
) -> dict[str, Any]:
    """The ``count``-th event, of ``event_type`` with ``data``, carrying the account as
    the accounts API shows it after the change."""
    event = await next_event(receiver, count)
    assert_event(event, event_type, account_id, **data)
    assert event["data"]["account"] == await run.shown(account_id)
    return event


@gen_test
async def test_every_cause_emits_its_event_signed_and_in_order(make_store, sandbox):
    async with (
        Receiver(SECRET) as receiver,
        make_store() as store,
        running(store, sandbox, receiver) as run,
    ):
        # A first connection: the callback records it (the profile comes after).
        account = await run.connect()
        account_id = account["id"]
        first = await next_event(receiver, 1)
        assert_event(first, CONNECTED, account_id, reconnected=False)
        assert first["data"]["account"]["status"] == "connected"
        tokens = await run.store.get_account_tokens(account_id)
        # Never a token, in any delivery.
        for delivery in receiver.requests:
            for token in (tokens.access_token, tokens.refresh_token):
                assert token not in delivery.body.decode()

        # The same TikTok user connects again: the same account, reconnected.
        await run.connect()
        again = await next_event(receiver, 2)
        assert_event(again, CONNECTED, account_id, reconnected=True)
        assert again["data"]["account"]["displayName"] == "Sandbox Creator"

        # The product disconnects it.
        response = await run.call("DELETE", f"/accounts/{account_id}", bearer(OWNER))
        assert response.code == 200, response.body
        disconnected = await next_change(run, receiver, 3, REVOKED, account_id, source="product")
        assert disconnected["data"]["account"]["status"] == "revoked"

        # Connected again, then removed by the user in TikTok: its signed webhook.
        await run.connect()
        assert_event(await next_event(receiver, 4), CONNECTED, account_id,
                     reconnected=True)
        open_id = account["platformAccountId"]
        sandbox.revoke_all_for(open_id)
        assert await run.tiktok_removes(sandbox, open_id, reason=1) == 200
        await next_change(run, receiver, 5, REVOKED, account_id, source="tiktok", reason=1)
        # TikTok delivers it again: nothing changes, no second event.
        assert await run.tiktok_removes(sandbox, open_id, reason=1) == 200
        await asyncio.sleep(0.3)
        assert len(receiver.accepted) == 5

        # Connected again; the user removes the app without a webhook: TikTok refuses
        # the refresh the access-token endpoint asks for (invalid_grant).
        await run.connect()
        assert_event(await next_event(receiver, 6), CONNECTED, account_id,
                     reconnected=True)
        sandbox.revoke_all_for(open_id)
        path = f"/accounts/{account_id}/access-token"
        refused = await run.call("POST", path, bearer(OWNER, scope=TOKENS_SCOPE))
        assert_envelope(refused, 409, "CONFLICT")
        await next_change(run, receiver, 7, REAUTHORIZATION_REQUIRED, account_id,
                          reason="refresh_refused")
        # Asked again: already marked, so no second event.
        assert (await run.call("POST", path, bearer(OWNER, scope=TOKENS_SCOPE))).code == 409

        # Connected again; 180 days on, the refresher's sweep finds the refresh
        # token expired.
        fresh = await run.connect()
        assert_event(await next_event(receiver, 8), CONNECTED, account_id,
                     reconnected=True)
        expires = datetime.fromisoformat(fresh["refreshTokenExpiresAt"])
        refresher = run.refresher()
        swept = await refresher.run_once(now=expires + timedelta(seconds=1))
        assert swept.outcomes == {"refresh_token_expired": 1}
        await next_change(run, receiver, 9, REAUTHORIZATION_REQUIRED, account_id,
                          reason="refresh_token_expired")

        # Connected again; ten days before its refresh token expires, a round tells
        # the product once, and the next rounds do not again.
        fresh = await run.connect()
        assert_event(await next_event(receiver, 10), CONNECTED, account_id,
                     reconnected=True)
        expires = datetime.fromisoformat(fresh["refreshTokenExpiresAt"])
        assert (await refresher.run_once(now=expires - timedelta(days=15))
                ).expiry_notices == 0
        noticed = await refresher.run_once(now=expires - timedelta(days=10))
        assert noticed.expiry_notices == 1
        due = await next_event(receiver, 11)
        assert_event(due, REAUTHORIZATION_DUE, account_id)
        assert due["data"]["account"]["status"] == "connected"
        assert due["data"]["account"]["refreshTokenExpiresAt"] == (
            fresh["refreshTokenExpiresAt"])
        for days in (9, 1):
            later = await refresher.run_once(now=expires - timedelta(days=days))
            assert later.expiry_notices == 0
        await asyncio.sleep(0.3)
        assert len(receiver.accepted) == 11
        assert (await run.shown(account_id))["status"] == "connected"

        # Every delivery verified, each event once, in the order of its causes; the
        # pull feed lists the same events in the same order.
        assert receiver.refused == []
        assert len(receiver.requests) == 11
        assert [e["type"] for e in receiver.accepted] == [
            CONNECTED, CONNECTED, REVOKED, CONNECTED, REVOKED, CONNECTED,
            REAUTHORIZATION_REQUIRED, CONNECTED, REAUTHORIZATION_REQUIRED, CONNECTED,
            REAUTHORIZATION_DUE,
        ]
        recorded = await run.recorded()
        assert [e["id"] for e in recorded] == receiver.accepted_ids
        assert [{k: v for k, v in e.items() if k != "delivery"} for e in recorded] == (
            receiver.accepted)
        stamps = [e["timestamp"] for e in recorded]
        assert stamps == sorted(stamps)


@gen_test
async def test_events_are_recorded_for_pulling_when_push_is_off(make_store, sandbox):
    async with make_store() as store, running(store, sandbox) as run:
        account = await run.connect()
        response = await run.call("DELETE", f"/accounts/{account['id']}", bearer(OWNER))
        assert response.code == 200

        async def feed() -> list[dict[str, Any]]:
            return await run.recorded()

        recorded = await poll_until(feed, lambda events: len(events) == 2, timeout=WAIT,
                                    interval=0.05, what="both events relayed")
        assert [(e["type"], e["delivery"]["status"]) for e in recorded] == [
            (CONNECTED, "pull_only"), (REVOKED, "pull_only")]
        assert recorded[1]["data"]["account"] == await run.shown(account["id"])


# -- atomicity: the event exists if and only if the change does ---------------------------


async def outbox_and_log(store: Store, account_id: str) -> tuple[int, int]:
    """Events of the account still in its outbox, and in the event log."""
    assert isinstance(store, MongoStore)
    doc = await store.database[ACCOUNTS_COLLECTION].find_one({"_id": _oid(account_id)})
    logged = await store.database["account_events"].count_documents({"accountId": account_id})
    return len(doc.get("outbox") or []), logged


def _oid(account_id: str) -> ObjectId:
    return ObjectId(account_id)


@gen_test
async def test_a_failed_state_change_records_no_event_and_its_retry_records_one(
    mongo_server, mongo_database_name, mongo_driver, sandbox
):
    uri = mongo_server.uri
    async with (
        Receiver(SECRET) as receiver,
        open_mongo_store(uri, mongo_database_name, mongo_driver) as store,
        running(store, sandbox, receiver, REFRESH_SKEW_SECONDS="300") as run,
    ):
        account = await run.connect()
        account_id = account["id"]
        await next_event(receiver, 1)
        assert await outbox_and_log(store, account_id) == (0, 1)

        # MongoDB refuses the revocation's update: the disconnect answers 503, the
        # account stays connected, and no event exists, in the outbox or the log.
        with mongo_failpoint(uri, failCommands=["update"], errorCode=13,
                             appName=APP_NAME):
            failed = await run.call("DELETE", f"/accounts/{account_id}", bearer(OWNER))
            assert_envelope(failed, 503, "SERVICE_UNAVAILABLE")
        assert (await run.shown(account_id))["status"] == "connected"
        await asyncio.sleep(0.3)  # a relay round would have found one
        assert await outbox_and_log(store, account_id) == (0, 1)
        assert len(receiver.accepted) == 1

        # TikTok's removal webhook while MongoDB refuses updates: 503 (TikTok
        # retries it), nothing changed, nothing recorded.
        open_id = account["platformAccountId"]
        with mongo_failpoint(uri, failCommands=["update"], errorCode=13,
                             appName=APP_NAME):
            assert await run.tiktok_removes(sandbox, open_id, reason=2) == 503
        assert (await run.shown(account_id))["status"] == "connected"
        assert await outbox_and_log(store, account_id) == (0, 1)

        # TikTok's retry lands: the change and its one event.
        assert await run.tiktok_removes(sandbox, open_id, reason=2) == 200
        await next_change(run, receiver, 2, REVOKED, account_id, source="tiktok", reason=2)

        async def settled() -> tuple[int, int]:
            return await outbox_and_log(store, account_id)

        await poll_until(settled, lambda counts: counts == (0, 2), timeout=WAIT,
                         interval=0.05, what="relayed")
        assert [e["type"] for e in await run.recorded()] == [CONNECTED, REVOKED]


# -- the stores: one write, however they race ----------------------------------------------

NOW = datetime.now(UTC)


def grant(open_id: str, *, refresh_in: timedelta = timedelta(days=180)) -> TokenGrant:
    return TokenGrant(
        open_id=open_id,
        access_token=f"act.{open_id}.secret",
        refresh_token=f"rft.{open_id}.secret",
        access_token_expires_at=NOW + timedelta(hours=2),
        refresh_token_expires_at=NOW + refresh_in,
        scopes=["user.info.basic"],
    )


async def relayed(store: Store) -> list[dict[str, Any]]:
    """Relay every outbox (this test is the only relayer) and answer the log's events."""
    assert await store.acquire_relay_lease("test", seconds=30)
    while await store.relay_outbox("test", now=datetime.now(UTC), fence_seconds=1,
                                   push=False, limit=100):
        pass
    return [stored.event for stored in await store.list_events(after_seq=0, limit=500)]


@gen_test
async def test_racing_first_connections_make_one_account_and_one_event_each(make_store):
    events = AccountEvents()
    async with make_store() as store:
        saved = await asyncio.gather(*(
            store.save_account_tokens(OWNER, grant("open-race"), now=NOW,
                                      event_factory=events.connected())
            for _ in range(6)
        ))
        assert len({account.id for account in saved}) == 1
        assert len(await store.list_accounts(OWNER)) == 1
        logged = await relayed(store)
        # One write each, one event each: exactly one created the account.
        assert len(logged) == 6
        assert sorted(e["data"]["reconnected"] for e in logged) == [False] + [True] * 5
        assert {e["data"]["account"]["id"] for e in logged} == {saved[0].id}


@gen_test
async def test_a_factory_that_fails_changes_nothing(make_store):
    def broken(after: Account, before: Account | None) -> dict[str, Any]:
        raise RuntimeError("no event, no change")

    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("open-a"), now=NOW)
        with pytest.raises(RuntimeError):
            await store.revoke_account(account.id, now=NOW, reason="disconnected",
                                       revoked_at_tiktok=False, event_factory=broken)
        with pytest.raises(RuntimeError):
            await store.require_reauthorization(account.id, now=NOW, event_factory=broken)
        with pytest.raises(RuntimeError):
            await store.save_account_tokens(OWNER, grant("open-b"), now=NOW,
                                            event_factory=broken)
        assert (await store.get_account(account.id)).status is AccountStatus.CONNECTED
        assert await store.get_account_tokens(account.id) is not None
        assert [a.platform_account_id for a in await store.list_accounts(OWNER)] == ["open-a"]
        assert await relayed(store) == []


@gen_test
async def test_only_a_change_records_its_event(make_store):
    events = AccountEvents()
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("open-a"), now=NOW)
        required = events.reauthorization_required("refresh_refused")
        assert await store.require_reauthorization(account.id, now=NOW,
                                                   event_factory=required)
        # Already marked: the call succeeds and records nothing more.
        assert await store.require_reauthorization(account.id, now=NOW,
                                                   event_factory=required)
        revoked = events.revoked("product")
        await store.revoke_account(account.id, now=NOW, reason="disconnected",
                                   revoked_at_tiktok=False, event_factory=revoked)
        await store.revoke_account(account.id, now=NOW, reason="disconnected",
                                   revoked_at_tiktok=False, event_factory=revoked)
        # Never over a revoked account, and never for another generation of tokens.
        assert not await store.require_reauthorization(account.id, now=NOW,
                                                       event_factory=required)
        other = await store.save_account_tokens(OWNER, grant("open-b"), now=NOW)
        stale = (await store.get_account_tokens(other.id)).version - 1
        assert not await store.require_reauthorization(other.id, now=NOW, version=stale,
                                                       event_factory=required)
        assert await store.revoke_accounts_by_open_id(
            "open-b", now=NOW, reason=1, event_factory=events.revoked("tiktok", 1)) == 1
        assert await store.revoke_accounts_by_open_id(
            "open-b", now=NOW, reason=1, event_factory=events.revoked("tiktok", 1)) == 0
        logged = await relayed(store)
        assert [(e["type"], e["data"]["account"]["id"]) for e in logged] == [
            (REAUTHORIZATION_REQUIRED, account.id), (REVOKED, account.id),
            (REVOKED, other.id)]


@gen_test
async def test_the_expiry_sweep_and_notices_write_one_event_per_account(make_store):
    events = AccountEvents(expiry_notice_days=14)
    async with make_store() as store:
        soon = [await store.save_account_tokens(f"owner-{n}", grant("open-s",
                refresh_in=timedelta(days=3 + n)), now=NOW) for n in range(3)]
        late = await store.save_account_tokens(OWNER, grant("open-l"), now=NOW)
        gone = [await store.save_account_tokens(f"owner-{n}", grant("open-g",
                refresh_in=-timedelta(seconds=n)), now=NOW) for n in range(2)]
        due = events.reauthorization_due()
        noticed = await store.record_expiry_notices(
            now=NOW, expiring_by=NOW + events.expiry_notice, limit=2, event_factory=due)
        assert noticed == 2  # the limit, soonest first
        assert await store.record_expiry_notices(
            now=NOW, expiring_by=NOW + events.expiry_notice, limit=10, event_factory=due) == 1
        assert await store.record_expiry_notices(
            now=NOW, expiring_by=NOW + events.expiry_notice, limit=10, event_factory=due) == 0
        for account in soon:
            stored = await store.get_account(account.id)
            assert stored.expiry_notice_for == account.refresh_token_expires_at.replace(
                microsecond=stored.expiry_notice_for.microsecond)
        assert (await store.get_account(late.id)).expiry_notice_for is None
        swept = await store.expire_refresh_tokens(
            now=NOW, event_factory=events.reauthorization_required("refresh_token_expired"))
        assert swept == 2
        logged = await relayed(store)
        assert [e["data"]["account"]["id"] for e in logged if e["type"] == REAUTHORIZATION_DUE
                ] == [account.id for account in soon]
        assert sorted(e["data"]["account"]["id"] for e in logged
                      if e["type"] == REAUTHORIZATION_REQUIRED) == sorted(a.id for a in gone)
        # A new grant of a noticed account gets a notice of its own when it is due.
        again = await store.save_account_tokens("owner-0", grant("open-s",
                                                refresh_in=timedelta(days=5)), now=NOW)
        assert again.expiry_notice_for is None
        assert await store.record_expiry_notices(
            now=NOW, expiring_by=NOW + events.expiry_notice, limit=10, event_factory=due) == 1


@gen_test
async def test_a_change_landing_between_the_read_and_the_write_is_in_the_snapshot(
    mongo_server, mongo_database_name, mongo_driver
):
    """MongoDB: the event is built from the account as read; a concurrent write to what
    the snapshot shows makes the conditional write miss, and the account is read again."""
    events = AccountEvents()
    admin: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri)
    try:
        async with open_mongo_store(mongo_server.uri, mongo_database_name,
                                    mongo_driver) as store:
            account = await store.save_account_tokens(OWNER, grant("open-a"), now=NOW)
            accounts = admin[mongo_database_name][ACCOUNTS_COLLECTION]
            revoked = events.revoked("product")
            calls: list[str | None] = []

            def meanwhile(after: Account, before: Account | None) -> dict[str, Any] | None:
                calls.append(after.display_name)
                if len(calls) == 1:  # the profile lands after the read
                    accounts.update_one({"_id": _oid(account.id)},
                                        {"$set": {"displayName": "Renamed Meanwhile"}})
                return revoked(after, before)

            await store.revoke_account(account.id, now=NOW, reason="disconnected",
                                       revoked_at_tiktok=False, event_factory=meanwhile)
            assert calls == [None, "Renamed Meanwhile"]
            [event] = await relayed(store)
            assert event["data"]["account"]["displayName"] == "Renamed Meanwhile"
            assert event["data"]["account"]["status"] == "revoked"
    finally:
        admin.close()


@gen_test
async def test_the_expiry_notice_query_is_served_by_its_index(
    mongo_server, mongo_database_name, mongo_driver
):
    async with open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver) as store:
        for n in range(6):
            await store.save_account_tokens(f"owner-{n}", grant(f"open-{n}",
                                            refresh_in=timedelta(days=5 * n)), now=NOW)
        indexes = await store.database[ACCOUNTS_COLLECTION].index_information()
        assert indexes[EXPIRY_NOTICE_INDEX]["key"] == EXPIRY_NOTICE_KEYS
        cursor = store.expiry_notice_cursor(NOW, NOW + timedelta(days=14), limit=100)
        stages = plan_stages((await cursor.explain())["queryPlanner"]["winningPlan"])
        names = [stage["stage"] for stage in stages]
        assert "COLLSCAN" not in names, names
        assert names[-1] == "IXSCAN" and stages[-1]["indexName"] == EXPIRY_NOTICE_INDEX
        again = store.expiry_notice_cursor(NOW, NOW + timedelta(days=14), limit=100)
        found = [doc["_id"] async for doc in again]
        assert len(found) == 2  # in 5 and 10 days; not the expired one, not the later ones
        assert found == [
            doc["_id"] async for doc in store.database[ACCOUNTS_COLLECTION].find(
                expiry_notice_query(NOW, NOW + timedelta(days=14))).sort(
                "refreshTokenExpiresAt")]

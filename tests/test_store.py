"""The store contract, against MemoryStore and MongoStore (motor and pymongo).

MongoStore runs over the real wire protocol against SecantusDB; no driver is
mocked. Clients are created inside each test's event loop (``open_mongo_store``)
and closed at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from bench.mongo_scale import plan_stages
from core.errors import StoreUnavailable
from services.events import AccountEvents
from storage.base import (
    CLEARED_BY_NEW_GRANT,
    TOKEN_USE_RESOLUTION,
    AccountStatus,
    ClaimResult,
    PendingFailure,
    PendingStatus,
)
from storage.crypto import TokenCipher, TokenIntegrityError
from storage.mongodb import (
    ACCOUNT_KEY_INDEX,
    PENDING_TTL_INDEX,
    PLATFORM_ACCOUNT_INDEX,
    REFRESH_DUE_INDEX,
    REFRESH_EXPIRY_INDEX,
    MongoStore,
    connect_mongo,
    expired_refresh_query,
)
from tests.fixtures_mongo import (
    mongo_failpoint,
    open_mongo_store,
    saved_account,
    saved_pending,
)
from tests.support import fake_grant, fake_pending, free_port, utc_now

gen_test = pytest.mark.gen_test(timeout=30)


@pytest.fixture
def make_mongo_store(
    mongo_server: Any, mongo_database_name: str, mongo_driver: str
) -> Callable[..., contextlib.AbstractAsyncContextManager[MongoStore]]:
    return functools.partial(open_mongo_store, mongo_server.uri, mongo_database_name, mongo_driver)


# -- pending authorizations -------------------------------------------------------


@gen_test
async def test_pending_round_trip_and_exactly_one_concurrent_claim(make_store):
    async with saved_pending(make_store) as (store, pending, now):
        outcomes = await asyncio.gather(
            *(store.claim_pending(pending.jti, callback_digest=f"d{i}", now=now) for i in range(20))
        )
    results = [o.result for o in outcomes]
    assert results.count(ClaimResult.CLAIMED) == 1
    assert results.count(ClaimResult.IN_PROGRESS) == 19
    winner = next(o for o in outcomes if o.result is ClaimResult.CLAIMED)
    assert winner.pending is not None
    claimed = winner.pending
    assert claimed.status is PendingStatus.IN_PROGRESS
    assert claimed.callback_digest is not None
    assert (claimed.jti, claimed.owner_id, claimed.redirect_uri, claimed.scopes) == (
        pending.jti,
        pending.owner_id,
        pending.redirect_uri,
        pending.scopes,
    )
    assert claimed.code_verifier == pending.code_verifier
    assert (claimed.created_at, claimed.expires_at) == (pending.created_at, pending.expires_at)
    for loser in outcomes:
        if loser is not winner:
            assert loser.pending is not None
            assert loser.pending.callback_digest == claimed.callback_digest


@gen_test
async def test_expired_pending_is_not_claimed(make_store):
    async with saved_pending(make_store, ttl=timedelta(minutes=10)) as (store, pending, now):
        at_expiry = await store.claim_pending(
            pending.jti, callback_digest="d", now=pending.expires_at
        )
        later = await store.claim_pending(
            pending.jti, callback_digest="d", now=pending.expires_at + timedelta(seconds=1)
        )
    assert at_expiry.result is ClaimResult.EXPIRED
    assert later.result is ClaimResult.EXPIRED
    assert later.pending is not None
    assert later.pending.status is PendingStatus.PENDING


@gen_test
async def test_unknown_pending(make_store):
    async with make_store() as store:
        outcome = await store.claim_pending("no-such-jti", callback_digest="d", now=utc_now())
        # Finishing an unknown record is a no-op, as in memory.
        await store.finish_pending("no-such-jti", status=PendingStatus.FAILED)
    assert outcome.result is ClaimResult.UNKNOWN
    assert outcome.pending is None


@gen_test
async def test_completed_pending_reports_final_redirect_and_drops_verifier(make_store):
    async with saved_pending(make_store) as (store, pending, now):
        first = await store.claim_pending(pending.jti, callback_digest="digest-1", now=now)
        await store.finish_pending(
            pending.jti,
            status=PendingStatus.COMPLETED,
            final_redirect="https://app.example.test/connected?ok=1",
        )
        again = await store.claim_pending(pending.jti, callback_digest="digest-1", now=now)
        # Completed wins over expiry, as in memory.
        late = await store.claim_pending(
            pending.jti, callback_digest="digest-1", now=now + timedelta(days=1)
        )
    assert first.result is ClaimResult.CLAIMED
    assert again.result is ClaimResult.ALREADY_COMPLETED
    assert late.result is ClaimResult.ALREADY_COMPLETED
    assert again.pending is not None
    assert again.pending.status is PendingStatus.COMPLETED
    assert again.pending.final_redirect == "https://app.example.test/connected?ok=1"
    assert again.pending.callback_digest == "digest-1"
    assert again.pending.code_verifier is None


@gen_test
async def test_failed_pending(make_store):
    async with saved_pending(make_store) as (store, pending, now):
        await store.claim_pending(pending.jti, callback_digest="d", now=now)
        await store.finish_pending(
            pending.jti, status=PendingStatus.FAILED, final_redirect="https://app.example.test/e"
        )
        outcome = await store.claim_pending(pending.jti, callback_digest="d", now=now)
    assert outcome.result is ClaimResult.FAILED
    assert outcome.pending is not None
    assert outcome.pending.code_verifier is None
    assert outcome.pending.final_redirect == "https://app.example.test/e"


@gen_test
async def test_failed_pending_keeps_what_the_callback_answered(make_store):
    failure = PendingFailure(
        status=503,
        code="SERVICE_UNAVAILABLE",
        message="TikTok is not responding right now. Please try again in a moment.",
        technical_message="token endpoint answered 500",
        details={"dependency": "tiktok", "logId": "log-1"},
        retry_after=9,
    )
    async with saved_pending(make_store) as (store, pending, now):
        await store.claim_pending(pending.jti, callback_digest="d", now=now)
        in_progress = await store.get_pending(pending.jti)
        await store.finish_pending(pending.jti, status=PendingStatus.FAILED, failure=failure)
        outcome = await store.claim_pending(pending.jti, callback_digest="d", now=now)
        read = await store.get_pending(pending.jti)
        missing = await store.get_pending("no-such-jti")
    assert in_progress is not None and in_progress.status is PendingStatus.IN_PROGRESS
    assert in_progress.failure is None and in_progress.callback_digest == "d"
    assert outcome.result is ClaimResult.FAILED
    assert outcome.pending is not None and outcome.pending.failure == failure
    assert read is not None and read.status is PendingStatus.FAILED
    assert read.failure == failure and read.code_verifier is None
    assert missing is None


# -- accounts -----------------------------------------------------------------------


@gen_test
async def test_reconnecting_updates_the_same_account(make_store):
    created = utc_now()
    first = fake_grant(now=created, scopes=["user.info.basic", "user.info.profile"])
    second = fake_grant(first.open_id, now=created + timedelta(minutes=5))
    second.scopes = ["user.info.basic"]
    async with make_store() as store:
        a1 = await store.save_account_tokens("owner-1", first, now=created)
        a2 = await store.save_account_tokens("owner-1", second, now=created + timedelta(minutes=5))
        accounts = await store.list_accounts("owner-1")
        tokens = await store.get_account_tokens(a1.id)
    assert a1.id == a2.id
    assert [a.id for a in accounts] == [a1.id]
    assert a1.profile_pending is True
    assert a1.status is AccountStatus.CONNECTED
    assert a2.created_at == created
    assert a2.updated_at == created + timedelta(minutes=5)
    assert a2.scopes == ["user.info.basic"]
    assert a2.access_token_expires_at == second.access_token_expires_at
    assert tokens is not None
    assert tokens.access_token == second.access_token
    assert tokens.refresh_token == second.refresh_token


@gen_test
async def test_same_open_id_for_two_owners_is_two_accounts(make_store):
    async with saved_account(make_store, "owner-a") as (store, mine, grant, now):
        theirs = await store.save_account_tokens("owner-b", grant, now=now)
        listed_a = await store.list_accounts("owner-a")
        listed_b = await store.list_accounts("owner-b")
    assert mine.id != theirs.id
    assert [a.id for a in listed_a] == [mine.id]
    assert [a.id for a in listed_b] == [theirs.id]


@gen_test
async def test_concurrent_saves_of_one_account_make_one_account(make_store):
    now = utc_now()
    open_id = f"open-id-test-{secrets.token_hex(6)}"
    grants = [fake_grant(open_id, now=now) for _ in range(20)]
    async with make_store() as store:
        accounts = await asyncio.gather(
            *(store.save_account_tokens("owner-c", g, now=now) for g in grants)
        )
        listed = await store.list_accounts("owner-c")
        tokens = await store.get_account_tokens(accounts[0].id)
    assert len({a.id for a in accounts}) == 1
    assert len(listed) == 1
    assert tokens is not None
    assert tokens.access_token in {g.access_token for g in grants}


@gen_test
async def test_a_reconnect_clears_what_the_earlier_grant_left(make_store):
    """Every store clears the same attributes on a new grant: CLEARED_BY_NEW_GRANT."""
    now = utc_now()
    grant = fake_grant(now=now)
    async with make_store() as store:
        account = await store.save_account_tokens("owner-c", grant, now=now)
        await store.defer_refresh(account.id, retry_at=now + timedelta(minutes=5), failures=2)
        assert await store.record_expiry_notices(
            now=now, expiring_by=grant.refresh_token_expires_at, limit=1,
            event_factory=AccountEvents().reauthorization_due()) == 1
        await store.revoke_account(account.id, now=now, reason="disconnected",
                                   revoked_at_tiktok=True)
        left = await store.get_account(account.id)
        reconnected = await store.save_account_tokens(
            "owner-c", fake_grant(grant.open_id, now=now), now=now + timedelta(minutes=1))
    for name, default in CLEARED_BY_NEW_GRANT.items():
        assert getattr(left, name) != default, name  # each was really set before
        assert getattr(reconnected, name) == default, name
    assert reconnected.status is AccountStatus.CONNECTED


@gen_test
async def test_profile_is_saved_and_survives_reconnect(make_store):
    now = utc_now()
    grant = fake_grant(now=now)
    profile = {
        "open_id": grant.open_id,
        "union_id": "union-test-1",
        "display_name": "Test Creator",
        "avatar_url": "https://p16.example.test/avatar.jpeg",
        "username": "test.creator",
        "follower_count": 12,
    }
    async with make_store() as store:
        account = await store.save_account_tokens("owner-p", grant, now=now)
        saved = await store.save_account_profile(
            account.id, profile, now=now + timedelta(seconds=1)
        )
        fetched = await store.get_account(account.id)
        reconnected = await store.save_account_tokens(
            "owner-p", fake_grant(grant.open_id, now=now), now=now + timedelta(seconds=2)
        )
        with pytest.raises(KeyError):
            await store.save_account_profile(str(ObjectId()), profile, now=now)
    assert saved == fetched
    assert fetched is not None
    assert fetched.union_id == "union-test-1"
    assert fetched.display_name == "Test Creator"
    assert fetched.avatar_url == "https://p16.example.test/avatar.jpeg"
    assert fetched.username == "test.creator"
    assert fetched.profile == profile
    assert fetched.profile_pending is False
    assert fetched.updated_at == now + timedelta(seconds=1)
    assert reconnected.display_name == "Test Creator"
    assert reconnected.profile_pending is False


@gen_test
async def test_list_accounts_in_creation_order(make_store):
    now = utc_now()
    async with make_store() as store:
        ids = []
        for offset in range(3):
            account = await store.save_account_tokens(
                "owner-l", fake_grant(now=now), now=now + timedelta(seconds=offset)
            )
            ids.append(account.id)
        await store.save_account_tokens("owner-other", fake_grant(now=now), now=now)
        listed = await store.list_accounts("owner-l")
        nobody = await store.list_accounts("owner-nobody")
    assert [a.id for a in listed] == ids
    assert all(a.owner_id == "owner-l" for a in listed)
    assert nobody == []


@gen_test
async def test_tokens_round_trip_and_unknown_ids(make_store):
    async with saved_account(make_store, "owner-t") as (store, account, grant, now):
        tokens = await store.get_account_tokens(account.id)
        fetched = await store.get_account(account.id)
        assert await store.get_account(str(ObjectId())) is None
        assert await store.get_account("not-an-object-id") is None
        assert await store.get_account_tokens(str(ObjectId())) is None
        assert await store.get_account_tokens("not-an-object-id") is None
    assert tokens is not None
    assert tokens.access_token == grant.access_token
    assert tokens.refresh_token == grant.refresh_token
    assert tokens.access_token_expires_at == grant.access_token_expires_at
    assert tokens.refresh_token_expires_at == grant.refresh_token_expires_at
    assert fetched == account
    assert fetched.platform == "tiktok"
    assert fetched.platform_account_id == grant.open_id
    # The account record the product sees never carries a token.
    assert grant.access_token not in repr(fetched)
    assert grant.refresh_token not in repr(fetched)


# -- the refresh policy: keep-warm, backoff, expired refresh tokens -----------------


async def connected(
    store: Any, owner: str, now: datetime, *, access: timedelta, refresh: timedelta
) -> str:
    grant = fake_grant(now=now, access_ttl=access, refresh_ttl=refresh)
    return (await store.save_account_tokens(owner, grant, now=now)).id


@gen_test
async def test_due_accounts_by_last_use_and_backoff(make_store):
    now = utc_now()
    hour = timedelta(hours=1)
    async with make_store() as store:
        ids = {
            name: await connected(store, name, now, access=timedelta(minutes=minutes),
                                  refresh=timedelta(days=100))
            for name, minutes in (("recent", 20), ("recent-later", 40), ("old", 10),
                                  ("never", 5), ("waiting", 15), ("not-due", 120))
        }
        await store.mark_token_used(ids["recent"], now=now - timedelta(minutes=5))
        await store.mark_token_used(ids["recent-later"], now=now - hour)  # the boundary
        await store.mark_token_used(ids["old"], now=now - hour - timedelta(seconds=1))
        await store.mark_token_used(ids["waiting"], now=now)
        await store.mark_token_used(ids["not-due"], now=now)
        await store.defer_refresh(ids["waiting"], retry_at=now + timedelta(seconds=1),
                                  failures=2)

        async def due(**filters: Any) -> list[str]:
            names = {v: k for k, v in ids.items()}
            found = await store.accounts_due_for_refresh(now + hour, limit=10, **filters)
            return [names[a.id] for a in found]

        # Soonest expiry first; "waiting" is left out until its retry time.
        assert await due(now=now, used_since=now - hour) == ["recent", "recent-later"]
        assert await due(now=now + timedelta(seconds=1), used_since=now - hour) == [
            "waiting", "recent", "recent-later"]
        # Every account (keep all warm), waiting ones included when ``now`` is not given.
        assert await due(now=now) == ["never", "old", "recent", "recent-later"]
        assert await due() == ["never", "old", "waiting", "recent", "recent-later"]
        assert len(await store.accounts_due_for_refresh(now + hour, limit=2, now=now)) == 2

        waiting = await store.get_account(ids["waiting"])
        assert (waiting.refresh_retry_at, waiting.refresh_failures) == (
            now + timedelta(seconds=1), 2)
        assert waiting.token_used_at == now
        await store.clear_refresh_retry(ids["waiting"])
        cleared = await store.get_account(ids["waiting"])
        assert (cleared.refresh_retry_at, cleared.refresh_failures) == (None, 0)
        assert await due(now=now, used_since=now - hour) == ["waiting", "recent", "recent-later"]
        # Unknown ids are no-ops.
        for account_id in (str(ObjectId()), "not-an-object-id"):
            await store.mark_token_used(account_id, now=now)
            await store.defer_refresh(account_id, retry_at=now, failures=1)
            await store.clear_refresh_retry(account_id)


@gen_test
async def test_a_token_use_is_written_at_most_once_a_minute(make_store):
    now = utc_now()
    async with make_store() as store:
        account_id = await connected(store, "owner-u", now, access=timedelta(hours=2),
                                     refresh=timedelta(days=100))
        assert (await store.get_account(account_id)).token_used_at is None
        await store.mark_token_used(account_id, now=now)
        await store.mark_token_used(account_id, now=now + TOKEN_USE_RESOLUTION / 2)
        assert (await store.get_account(account_id)).token_used_at == now
        later = now + TOKEN_USE_RESOLUTION
        await store.mark_token_used(account_id, now=later)
        assert (await store.get_account(account_id)).token_used_at == later
        # A clock behind the recorded use never moves it back.
        await store.mark_token_used(account_id, now=now)
        assert (await store.get_account(account_id)).token_used_at == later


@gen_test
async def test_expired_refresh_tokens_need_reauthorization(make_store):
    now = utc_now()
    async with make_store() as store:
        expired = await connected(store, "owner-x", now, access=timedelta(hours=2),
                                  refresh=-timedelta(seconds=1))
        boundary = await connected(store, "owner-y", now, access=-timedelta(hours=1),
                                   refresh=timedelta(0))
        live = await connected(store, "owner-z", now, access=timedelta(hours=2),
                               refresh=timedelta(seconds=1))
        revoked = await connected(store, "owner-r", now, access=timedelta(hours=2),
                                  refresh=-timedelta(days=1))
        await store.revoke_account(revoked, now=now, reason="disconnected",
                                   revoked_at_tiktok=True)
        later = now + timedelta(minutes=1)

        assert await store.expire_refresh_tokens(now=now) == 2
        for account_id in (expired, boundary):
            account = await store.get_account(account_id)
            assert account.status is AccountStatus.REAUTHORIZATION_REQUIRED
            assert account.updated_at == now
            assert await store.get_account_tokens(account_id) is None
        assert (await store.get_account(live)).status is AccountStatus.CONNECTED
        assert await store.get_account_tokens(live) is not None
        assert (await store.get_account(revoked)).status is AccountStatus.REVOKED
        # Done once: the next sweep finds nothing more until another one expires.
        assert await store.expire_refresh_tokens(now=now) == 0
        assert await store.expire_refresh_tokens(now=later) == 1
        assert (await store.get_account(live)).status is AccountStatus.REAUTHORIZATION_REQUIRED
        assert await store.accounts_due_for_refresh(later + timedelta(days=1), limit=10) == []


@gen_test
async def test_refresh_queries_are_served_by_their_indexes(make_mongo_store):
    now = utc_now()
    async with make_mongo_store() as store:
        for n in range(6):
            account_id = await connected(store, f"owner-{n}", now,
                                         access=timedelta(minutes=10 * n),
                                         refresh=timedelta(days=n - 3))
            await store.mark_token_used(account_id, now=now - timedelta(minutes=15 * n))
        indexes = await store.database["social_accounts"].index_information()
        assert indexes[REFRESH_DUE_INDEX]["key"] == [
            ("status", 1), ("tokenUsedAt", 1), ("accessTokenExpiresAt", 1)]
        assert indexes[REFRESH_EXPIRY_INDEX]["key"] == [("status", 1),
                                                        ("refreshTokenExpiresAt", 1)]

        for used_since in (now - timedelta(hours=1), None):  # keep-warm, keep-all
            cursor = store.due_for_refresh_cursor(now + timedelta(hours=1), limit=300,
                                                  now=now, used_since=used_since)
            stages = plan_stages((await cursor.explain())["queryPlanner"]["winningPlan"])
            names = [stage["stage"] for stage in stages]
            assert "COLLSCAN" not in names, names
            assert names[-1] == "IXSCAN" and stages[-1]["indexName"] == REFRESH_DUE_INDEX
            # Only the backoff is checked on the documents; the rest is in the index keys.
            [fetch] = [stage for stage in stages if stage["stage"] == "FETCH"]
            assert set(fetch.get("filter", {})) == {"refreshRetryAt"}

        expired = store.database["social_accounts"].find(expired_refresh_query(now))
        stages = plan_stages((await expired.explain())["queryPlanner"]["winningPlan"])
        assert [stage["stage"] for stage in stages] == ["FETCH", "IXSCAN"]
        assert stages[-1]["indexName"] == REFRESH_EXPIRY_INDEX
        assert "filter" not in stages[0]  # the index answers all of it
        # And the store's sweep answers what the query finds.
        assert await store.expire_refresh_tokens(now=now) == 4


# -- MongoDB only: what is on disk ------------------------------------------------


@gen_test
async def test_raw_documents_hold_ciphertext_only(make_mongo_store):
    async with saved_account(make_mongo_store, "owner-raw") as (store, account, grant, now):
        doc = await store.database["social_accounts"].find_one({"_id": ObjectId(account.id)})
    assert doc is not None
    assert grant.access_token not in repr(doc)
    assert grant.refresh_token not in repr(doc)
    assert grant.access_token.split("-", 1)[1] not in repr(doc)
    assert doc["accessToken"].startswith("v1:")
    assert doc["refreshToken"].startswith("v1:")
    assert {
        "ownerId": "owner-raw",
        "platform": "tiktok",
        "platformAccountId": grant.open_id,
        "status": "connected",
        "profilePending": True,
        "scopes": grant.scopes,
        "createdAt": now,
        "updatedAt": now,
        "accessTokenExpiresAt": grant.access_token_expires_at,
        "refreshTokenExpiresAt": grant.refresh_token_expires_at,
    }.items() <= doc.items()
    assert doc["createdAt"].tzinfo is not None


@gen_test
async def test_tampered_ciphertext_is_refused(make_mongo_store):
    async with saved_account(make_mongo_store, "owner-tamper") as (store, account, _, _):
        accounts = store.database["social_accounts"]
        doc = await accounts.find_one({"_id": ObjectId(account.id)})
        ciphertext = doc["accessToken"]
        flipped = ciphertext[:-2] + ("A" if ciphertext[-2] != "A" else "B") + ciphertext[-1]
        await accounts.update_one({"_id": doc["_id"]}, {"$set": {"accessToken": flipped}})
        with pytest.raises(TokenIntegrityError):
            await store.get_account_tokens(account.id)
        # A valid ciphertext moved to another field does not open either.
        await accounts.update_one(
            {"_id": doc["_id"]},
            {"$set": {"accessToken": doc["refreshToken"], "refreshToken": ciphertext}},
        )
        with pytest.raises(TokenIntegrityError):
            await store.get_account_tokens(account.id)


@gen_test
async def test_pending_document_shape_and_verifier_removal(make_mongo_store):
    async with saved_pending(make_mongo_store) as (store, pending, now):
        states = store.database["oauth_states"]
        saved = await states.find_one({"_id": pending.jti})
        await store.claim_pending(pending.jti, callback_digest="digest", now=now)
        await store.finish_pending(
            pending.jti, status=PendingStatus.COMPLETED, final_redirect="https://x.test/done"
        )
        finished = await states.find_one({"_id": pending.jti})
    assert saved is not None
    assert {
        "ownerId": pending.owner_id,
        "redirectUri": pending.redirect_uri,
        "scopes": pending.scopes,
        "codeVerifier": pending.code_verifier,
        "status": "pending",
        "createdAt": pending.created_at,
        "expiresAt": pending.expires_at,
    }.items() <= saved.items()
    assert finished is not None
    assert "codeVerifier" not in finished
    assert finished["status"] == "completed"
    assert finished["finalRedirect"] == "https://x.test/done"
    assert finished["callbackDigest"] == "digest"


@gen_test
async def test_initialize_creates_indexes_and_is_repeatable(make_mongo_store):
    async with make_mongo_store() as store:
        await store.initialize()  # a second start-up must not fail
        account_indexes = await store.database["social_accounts"].index_information()
        state_indexes = await store.database["oauth_states"].index_information()
    unique = account_indexes[ACCOUNT_KEY_INDEX]
    assert unique["key"] == [("ownerId", 1), ("platform", 1), ("platformAccountId", 1)]
    assert unique.get("unique") is True
    by_open_id = account_indexes[PLATFORM_ACCOUNT_INDEX]
    assert by_open_id["key"] == [("platformAccountId", 1)]
    assert not by_open_id.get("unique")
    ttl = state_indexes[PENDING_TTL_INDEX]
    assert ttl["key"] == [("expiresAt", 1)]
    assert ttl["expireAfterSeconds"] == 0


@gen_test
async def test_unique_index_enforced_by_server(make_mongo_store):
    now = utc_now()
    async with make_mongo_store() as store:
        accounts = store.database["social_accounts"]
        key = {"ownerId": "o", "platform": "tiktok", "platformAccountId": "x", "createdAt": now}
        await accounts.insert_one(dict(key))
        with pytest.raises(Exception) as caught:
            await accounts.insert_one(dict(key))
    assert type(caught.value).__name__ == "DuplicateKeyError"


class _UpsertRaceDatabase:
    """The real database, except that ``social_accounts`` loses upsert races.

    On mongod two concurrent upserts of a new key can both miss the document
    and one then fails with E11000. SecantusDB serialises the upsert under a
    collection lock, so the race never happens there, and its ``failCommand``
    refuses to inject code 11000 (40671, as mongod does). So the first
    ``lost_races`` upserts here really write a competitor's document through
    the driver and then raise the ``DuplicateKeyError`` the loser would see.
    Every read and write still goes over the wire to the real server.
    """

    def __init__(self, database: Any, competitor: dict[str, Any], lost_races: int) -> None:
        self._database = database
        self.client = database.client
        self.accounts = _UpsertRaceCollection(database["social_accounts"], competitor, lost_races)

    def __getitem__(self, name: str) -> Any:
        return self.accounts if name == "social_accounts" else self._database[name]

    def command(self, *args: Any, **kwargs: Any) -> Any:
        return self._database.command(*args, **kwargs)


class _UpsertRaceCollection:
    def __init__(self, real: Any, competitor: dict[str, Any], lost_races: int) -> None:
        self._real = real
        self._competitor = competitor
        self.lost_races = lost_races
        self.upserts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def find_one_and_update(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        if kwargs.get("upsert"):
            self.upserts += 1
            if self.lost_races:
                self.lost_races -= 1
                await self._real.update_one(
                    filter, {"$setOnInsert": {**filter, **self._competitor}}, upsert=True
                )
                raise DuplicateKeyError("E11000 duplicate key error (upsert race)", code=11000)
        return await self._real.find_one_and_update(filter, update, **kwargs)


@gen_test
async def test_duplicate_key_upsert_race_is_retried_once(
    mongo_server, mongo_database_name, mongo_driver
):
    now = utc_now()
    grant = fake_grant(now=now)
    competitor = {"createdAt": now - timedelta(seconds=1), "profilePending": True}
    client, database = connect_mongo(mongo_server.uri, mongo_database_name, driver=mongo_driver)
    cipher = TokenCipher.ephemeral()
    racing = _UpsertRaceDatabase(database, competitor, lost_races=1)
    store = MongoStore(racing, cipher, client=client)
    try:
        await store.initialize()
        account = await store.save_account_tokens("owner-dup", grant, now=now)
        assert racing.accounts.upserts == 2  # lost once, retried once
        docs = await database["social_accounts"].find({"ownerId": "owner-dup"}).to_list(None)
        assert [str(d["_id"]) for d in docs] == [account.id]
        assert account.created_at == competitor["createdAt"]  # the winner's document
        tokens = await store.get_account_tokens(account.id)
        assert tokens is not None
        assert tokens.access_token == grant.access_token

        # Losing twice in a row is not retried again.
        twice = _UpsertRaceDatabase(database, competitor, lost_races=2)
        store_twice = MongoStore(twice, cipher, client=client)
        with pytest.raises(StoreUnavailable) as caught:
            await store_twice.save_account_tokens("owner-dup-2", fake_grant(now=now), now=now)
        assert twice.accounts.upserts == 2
    finally:
        await store.close()
    assert caught.value.details == {"dependency": "mongodb"}
    assert caught.value.technical_message == (
        "MongoDB write conflict persisted after retry: DuplicateKeyError"
    )


@gen_test
async def test_server_errors_become_store_unavailable(make_mongo_store, mongo_server):
    now = utc_now()
    async with make_mongo_store() as store:
        account = await store.save_account_tokens("owner-err", fake_grant(now=now), now=now)
        with mongo_failpoint(
            mongo_server.uri, failCommands=["find"], errorCode=13, appName="tiktok-gateway"
        ):
            with pytest.raises(StoreUnavailable) as failed:
                await store.get_account(account.id)
        # Dropped connections on every attempt (the driver retries reads once).
        with mongo_failpoint(
            mongo_server.uri,
            failCommands=["find"],
            closeConnection=True,
            appName="tiktok-gateway",
        ):
            with pytest.raises(StoreUnavailable) as dropped:
                await store.get_account(account.id)
        assert await store.get_account(account.id) == account
    assert failed.value.technical_message == "MongoDB operation failed: OperationFailure (code 13)"
    assert dropped.value.technical_message == "MongoDB unreachable: AutoReconnect"
    assert dropped.value.details == {"dependency": "mongodb"}


# -- MongoDB unreachable -----------------------------------------------------------


def test_connect_mongo_rejects_unknown_driver():
    with pytest.raises(ValueError, match="unknown MongoDB driver"):
        connect_mongo("mongodb://127.0.0.1:1/", "db", driver="mongoose")


@gen_test
async def test_connect_mongo_does_no_io(mongo_driver):
    uri = f"mongodb://127.0.0.1:{free_port()}/"
    client, database = connect_mongo(uri, "gateway", driver=mongo_driver)
    try:
        assert database.name == "gateway"
    finally:
        result = client.close()
        if asyncio.iscoroutine(result):
            await result


@gen_test(timeout=60)
async def test_unreachable_mongodb_raises_store_unavailable(mongo_driver):
    # A closed port, and credentials that must never reach an error message.
    uri = f"mongodb://gateway:s3cret-pw-{secrets.token_hex(4)}@127.0.0.1:{free_port()}/"
    now = utc_now()
    grant = fake_grant(now=now)
    pending = fake_pending(now=now)
    client, database = connect_mongo(
        uri, "gateway", driver=mongo_driver, server_selection_timeout_ms=300
    )
    store = MongoStore(database, TokenCipher.ephemeral(), client=client)
    account_id = str(ObjectId())
    operations = {
        "ping": store.ping,
        "initialize": store.initialize,
        "save_pending": lambda: store.save_pending(pending),
        "claim_pending": lambda: store.claim_pending(pending.jti, callback_digest="d", now=now),
        "finish_pending": lambda: store.finish_pending(pending.jti, status=PendingStatus.FAILED),
        "get_pending": lambda: store.get_pending(pending.jti),
        "save_account_tokens": lambda: store.save_account_tokens("o", grant, now=now),
        "save_account_profile": lambda: store.save_account_profile(account_id, {}, now=now),
        "get_account": lambda: store.get_account(account_id),
        "list_accounts": lambda: store.list_accounts("o"),
        "get_account_tokens": lambda: store.get_account_tokens(account_id),
    }
    try:
        for name, operation in operations.items():
            with pytest.raises(StoreUnavailable) as caught:
                await operation()
            error = caught.value
            assert error.details == {"dependency": "mongodb"}, name
            assert error.technical_message == (
                "MongoDB unreachable: ServerSelectionTimeoutError"
            ), name
            assert error.status == 503
            for text in (error.technical_message, str(error), error.message):
                assert uri not in text
                assert "s3cret" not in text
            # Chained for the logs; the driver's message names host:port only.
            assert "s3cret" not in repr(error.__cause__)
    finally:
        await store.close()


# -- MongoDB in its own process: outage and restart ---------------------------------


@gen_test(timeout=90)
async def test_data_survives_a_mongodb_restart_and_outage_is_reported(
    mongo_process, mongo_database_name, mongo_driver
):
    now = utc_now()
    grant = fake_grant(now=now)
    async with open_mongo_store(
        mongo_process.uri, mongo_database_name, mongo_driver, server_selection_timeout_ms=500
    ) as store:
        account = await store.save_account_tokens("owner-restart", grant, now=now)
        mongo_process.stop()
        with pytest.raises(StoreUnavailable) as caught:
            await store.get_account(account.id)
        assert caught.value.details == {"dependency": "mongodb"}
        mongo_process.start()
        # The same client recovers once the server is back.
        for _ in range(40):
            try:
                await store.ping()
                break
            except StoreUnavailable:
                await asyncio.sleep(0.25)
        assert await store.get_account(account.id) == account
        tokens = await store.get_account_tokens(account.id)
    assert tokens is not None
    assert tokens.access_token == grant.access_token

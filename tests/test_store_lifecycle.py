"""The token-lifecycle store methods, on MemoryStore and on MongoStore over the wire.

MongoStore runs against SecantusDB with both drivers (motor, PyMongo's
AsyncMongoClient); where it matters the stored document itself is read back, so
"wiped" means the ciphertext is gone from MongoDB, not only that the store says so.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from storage.base import AccountStatus, Store, TokenGrant
from storage.mongodb import ACCOUNTS_COLLECTION, MongoStore
from tests.fixtures_mongo import open_mongo_store
from tests.support import fake_grant

# Whole seconds: MongoDB keeps milliseconds, so these survive a round trip unchanged.
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
# Long enough never to run out during a test, unless a test means it to.
LEASE_SECONDS = 60.0
OWNER = "owner-1"
OPEN_ID = "open-id-1"
TOKEN_FIELDS = ("accessToken", "refreshToken")

gen_test = pytest.mark.gen_test(timeout=30)


def grant(
    tag: str,
    *,
    open_id: str = OPEN_ID,
    at: datetime = NOW,
    access_ttl: timedelta = timedelta(hours=24),
    scopes: tuple[str, ...] = ("user.info.basic",),
) -> TokenGrant:
    """``act.<tag>`` / ``rft.<tag>``, issued ``at``."""
    return fake_grant(open_id, now=at, tag=tag, access_ttl=access_ttl, scopes=scopes)


async def raw_document(store: Store, account_id: str) -> dict[str, Any] | None:
    """The stored MongoDB document (None for the memory store, which has none)."""
    if not isinstance(store, MongoStore):
        return None
    doc: dict[str, Any] | None = await store.database[ACCOUNTS_COLLECTION].find_one(
        {"_id": ObjectId(account_id)}
    )
    assert doc is not None
    return doc


async def assert_tokens_wiped(store: Store, account_id: str) -> None:
    assert await store.get_account_tokens(account_id) is None
    doc = await raw_document(store, account_id)
    if doc is not None:
        assert not set(TOKEN_FIELDS) & doc.keys(), sorted(doc)
        assert "refreshLease" not in doc


async def assert_tokens(store: Store, account_id: str, expected: TokenGrant) -> None:
    tokens = await store.get_account_tokens(account_id)
    assert tokens is not None
    assert (tokens.access_token, tokens.refresh_token) == (
        expected.access_token,
        expected.refresh_token,
    )
    assert tokens.access_token_expires_at == expected.access_token_expires_at
    assert tokens.refresh_token_expires_at == expected.refresh_token_expires_at
    doc = await raw_document(store, account_id)
    if doc is not None:
        # Ciphertext only, and the expiries are plain fields next to it.
        assert expected.access_token not in str(doc[TOKEN_FIELDS[0]])
        assert expected.refresh_token not in str(doc[TOKEN_FIELDS[1]])
        assert doc["accessTokenExpiresAt"] == expected.access_token_expires_at
        assert doc["refreshTokenExpiresAt"] == expected.refresh_token_expires_at


# -- the refresh lease ---------------------------------------------------------------


async def wait_for_lease(store: Store, account_id: str, holder: str) -> None:
    """Until ``holder`` gets the lease (another's short one has run out); bounded."""
    for _ in range(200):
        if await store.acquire_refresh_lease(account_id, holder, seconds=LEASE_SECONDS):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{holder} never got the lease")


@gen_test
async def test_lease_is_exclusive_among_concurrent_acquirers(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        holders = [f"holder-{n}" for n in range(20)]
        won = await asyncio.gather(
            *(store.acquire_refresh_lease(account.id, h, seconds=LEASE_SECONDS) for h in holders)
        )
        assert sum(won) == 1, won
        for holder in holders:
            assert not await store.acquire_refresh_lease(account.id, holder,
                                                         seconds=LEASE_SECONDS)


@gen_test
async def test_an_expired_lease_can_be_taken_over(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        # Expiry is the store's own clock (MongoDB's $$NOW): a short lease runs out.
        assert await store.acquire_refresh_lease(account.id, "crashed", seconds=0.2)
        await wait_for_lease(store, account.id, "second")
        # The first holder woke up late: it cannot free the new lease.
        await store.release_refresh_lease(account.id, "crashed")
        assert not await store.acquire_refresh_lease(account.id, "third", seconds=LEASE_SECONDS)
        doc = await raw_document(store, account.id)
        if doc is not None:
            assert doc["refreshLease"]["holder"] == "second"


@gen_test
async def test_only_the_holder_releases_the_lease(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        assert await store.acquire_refresh_lease(account.id, "one", seconds=LEASE_SECONDS)
        await store.release_refresh_lease(account.id, "two")
        assert not await store.acquire_refresh_lease(account.id, "two", seconds=LEASE_SECONDS)
        await store.release_refresh_lease(account.id, "one")
        assert await store.acquire_refresh_lease(account.id, "two", seconds=LEASE_SECONDS)
        # Releasing what one does not hold, or on an unknown account, is harmless.
        await store.release_refresh_lease(account.id, "one")
        await store.release_refresh_lease(str(ObjectId()), "one")


@gen_test
async def test_refreshed_tokens_are_saved_over_the_generation_read_and_atomically(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        read = await store.get_account_tokens(account.id)
        assert read is not None and read.version == 1
        later = NOW + timedelta(hours=23)
        rotated = grant("b", at=later, scopes=("user.info.basic", "user.info.profile"))

        # Not the generation stored: refused, nothing written.
        for stale in (0, 2):
            assert not await store.save_refreshed_tokens(
                account.id, rotated, version=stale, now=later
            )
        await assert_tokens(store, account.id, grant("a"))
        unchanged = await store.get_account(account.id)
        assert unchanged.updated_at == NOW

        # Whoever holds the lease (here: somebody else) does not matter.
        assert await store.acquire_refresh_lease(account.id, "other", seconds=LEASE_SECONDS)
        assert await store.save_refreshed_tokens(account.id, rotated, version=1, now=later)
        # Both tokens, both expiries and the scopes moved together, one generation on.
        await assert_tokens(store, account.id, rotated)
        assert (await store.get_account_tokens(account.id)).version == 2
        saved = await store.get_account(account.id)
        assert saved.access_token_expires_at == rotated.access_token_expires_at
        assert saved.refresh_token_expires_at == rotated.refresh_token_expires_at
        assert saved.scopes == ["user.info.basic", "user.info.profile"]
        assert saved.updated_at == later
        assert saved.status is AccountStatus.CONNECTED
        doc = await raw_document(store, account.id)
        assert doc is None or doc["tokenVersion"] == 2
        # The same generation cannot be replaced twice: the second answer is superseded.
        assert not await store.save_refreshed_tokens(account.id, grant("c"), version=1, now=later)
        await assert_tokens(store, account.id, rotated)


@gen_test
async def test_every_grant_stored_moves_the_generation_on(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        versions = [(await store.get_account_tokens(account.id)).version]
        await store.save_refreshed_tokens(account.id, grant("b"), version=versions[-1], now=NOW)
        versions.append((await store.get_account_tokens(account.id)).version)
        await store.save_account_tokens(OWNER, grant("reconnected"), now=NOW)  # a reconnect
        versions.append((await store.get_account_tokens(account.id)).version)
        await store.revoke_account(account.id, now=NOW, reason="disconnected",
                                   revoked_at_tiktok=True)
        await store.save_account_tokens(OWNER, grant("again"), now=NOW)
        versions.append((await store.get_account_tokens(account.id)).version)
        assert versions == [1, 2, 3, 4]


@gen_test
async def test_a_document_from_before_the_generation_counter_is_generation_0(
    mongo_server, mongo_database_name, mongo_driver
):
    async with open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver) as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        await store.database[ACCOUNTS_COLLECTION].update_one(
            {"_id": ObjectId(account.id)}, {"$unset": {"tokenVersion": ""}}
        )
        assert (await store.get_account_tokens(account.id)).version == 0
        assert await store.save_refreshed_tokens(account.id, grant("b"), version=0, now=NOW)
        assert (await store.get_account_tokens(account.id)).version == 1
        await assert_tokens(store, account.id, grant("b"))


@gen_test
async def test_no_lease_on_an_account_that_is_not_connected_or_unknown(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        await store.require_reauthorization(account.id, now=NOW)
        assert not await store.acquire_refresh_lease(account.id, "h", seconds=LEASE_SECONDS)
        for unknown in (str(ObjectId()), "not-an-id"):
            assert not await store.acquire_refresh_lease(unknown, "h", seconds=LEASE_SECONDS)
            assert not await store.save_refreshed_tokens(unknown, grant("b"), version=1, now=NOW)
            assert not await store.require_reauthorization(unknown, now=NOW)


# -- refused and revoked -------------------------------------------------------------


@gen_test
async def test_require_reauthorization_wipes_both_tokens_and_the_lease(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        assert await store.acquire_refresh_lease(account.id, "holder", seconds=LEASE_SECONDS)
        later = NOW + timedelta(minutes=1)
        assert await store.require_reauthorization(account.id, now=later)
        refused = await store.get_account(account.id)
        assert refused.status is AccountStatus.REAUTHORIZATION_REQUIRED
        assert refused.updated_at == later
        await assert_tokens_wiped(store, account.id)


@gen_test
async def test_a_refusal_of_replaced_tokens_wipes_nothing(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        read = await store.get_account_tokens(account.id)
        # Newer tokens land (a refresh elsewhere, a reconnect) before TikTok refuses the
        # refresh token that was read.
        await store.save_account_tokens(OWNER, grant("reconnected"), now=NOW)
        assert not await store.require_reauthorization(account.id, now=NOW,
                                                       version=read.version)
        assert (await store.get_account(account.id)).status is AccountStatus.CONNECTED
        await assert_tokens(store, account.id, grant("reconnected"))
        # Still the refused generation: marked.
        current = await store.get_account_tokens(account.id)
        assert await store.require_reauthorization(account.id, now=NOW,
                                                   version=current.version)
        await assert_tokens_wiped(store, account.id)


@gen_test
async def test_a_grant_from_the_refused_generation_still_lands(make_store):
    """Another process refreshed with a token this one had already rotated, and its
    refusal marked the account: the rotated grant, stored late, is the live one."""
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        read = await store.get_account_tokens(account.id)
        assert await store.require_reauthorization(account.id, now=NOW, version=read.version)
        assert await store.save_refreshed_tokens(account.id, grant("b"), version=read.version,
                                                 now=NOW)
        assert (await store.get_account(account.id)).status is AccountStatus.CONNECTED
        await assert_tokens(store, account.id, grant("b"))


@gen_test
async def test_require_reauthorization_leaves_a_revoked_account_revoked(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        await store.revoke_account(account.id, now=NOW, reason="disconnected",
                                   revoked_at_tiktok=True)
        await store.require_reauthorization(account.id, now=NOW + timedelta(minutes=1))
        assert (await store.get_account(account.id)).status is AccountStatus.REVOKED


@gen_test
async def test_revoke_account_is_idempotent_and_keeps_the_first_revocation(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        first = await store.revoke_account(
            account.id, now=NOW, reason="disconnected", revoked_at_tiktok=True
        )
        assert first.status is AccountStatus.REVOKED
        assert (first.revoked_at, first.revocation_reason, first.revoked_at_tiktok) == (
            NOW,
            "disconnected",
            True,
        )
        await assert_tokens_wiped(store, account.id)

        again = await store.revoke_account(
            account.id, now=NOW + timedelta(hours=1), reason=2, revoked_at_tiktok=False
        )
        assert (again.revoked_at, again.revocation_reason, again.revoked_at_tiktok) == (
            NOW,
            "disconnected",
            True,
        )
        assert again.updated_at == NOW
        for unknown in (str(ObjectId()), "not-an-id"):
            assert await store.revoke_account(
                unknown, now=NOW, reason="disconnected", revoked_at_tiktok=False
            ) is None


@gen_test
async def test_revoke_by_open_id_reaches_every_owner_and_counts_changes(make_store):
    async with make_store() as store:
        alice = await store.save_account_tokens("alice", grant("a"), now=NOW)
        bob = await store.save_account_tokens("bob", grant("b"), now=NOW)
        carol = await store.save_account_tokens("carol", grant("c"), now=NOW)
        other = await store.save_account_tokens("alice", grant("o", open_id="open-id-2"), now=NOW)
        refused = await store.save_account_tokens("dave", grant("d"), now=NOW)
        await store.revoke_account(carol.id, now=NOW, reason="disconnected",
                                   revoked_at_tiktok=False)
        await store.require_reauthorization(refused.id, now=NOW)

        later = NOW + timedelta(minutes=5)
        assert await store.revoke_accounts_by_open_id(OPEN_ID, now=later, reason=1) == 3
        for account_id in (alice.id, bob.id, refused.id):
            revoked = await store.get_account(account_id)
            assert revoked.status is AccountStatus.REVOKED
            assert (revoked.revoked_at, revoked.revocation_reason) == (later, 1)
            assert revoked.revoked_at_tiktok is True
            await assert_tokens_wiped(store, account_id)
        # Already revoked: its first revocation stays; another TikTok user: untouched.
        kept = await store.get_account(carol.id)
        assert (kept.revoked_at, kept.revocation_reason, kept.revoked_at_tiktok) == (
            NOW,
            "disconnected",
            False,
        )
        assert (await store.get_account(other.id)).status is AccountStatus.CONNECTED
        await assert_tokens(store, other.id, grant("o", open_id="open-id-2"))
        # A webhook delivered twice changes nothing the second time.
        assert await store.revoke_accounts_by_open_id(OPEN_ID, now=later, reason=1) == 0


@gen_test
async def test_accounts_due_for_refresh_soonest_first_connected_only(make_store):
    async with make_store() as store:
        ids = {}
        for name, minutes in (("m30", 30), ("m5", 5), ("m90", 90), ("m10", 10), ("m20", 20)):
            account = await store.save_account_tokens(
                OWNER,
                grant(name, open_id=f"open-{name}", access_ttl=timedelta(minutes=minutes)),
                now=NOW,
            )
            ids[name] = account.id
        await store.require_reauthorization(ids["m5"], now=NOW)
        await store.revoke_account(ids["m10"], now=NOW, reason="disconnected",
                                   revoked_at_tiktok=True)

        before = NOW + timedelta(minutes=60)
        due = await store.accounts_due_for_refresh(before, limit=10)
        assert [a.id for a in due] == [ids["m20"], ids["m30"]]
        assert all(a.status is AccountStatus.CONNECTED for a in due)
        assert [a.id for a in await store.accounts_due_for_refresh(before, limit=1)] == [
            ids["m20"]
        ]
        everything = await store.accounts_due_for_refresh(NOW + timedelta(days=1), limit=10)
        assert [a.id for a in everything] == [ids["m20"], ids["m30"], ids["m90"]]
        assert await store.accounts_due_for_refresh(NOW + timedelta(minutes=15), limit=10) == []


# -- reconnecting --------------------------------------------------------------------


@gen_test
async def test_reconnect_after_revoke_restores_connected_and_clears_the_revocation(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        await store.revoke_account(account.id, now=NOW, reason=4, revoked_at_tiktok=True)
        later = NOW + timedelta(days=2)
        fresh = grant("b", at=later, scopes=("user.info.basic", "video.list"))
        again = await store.save_account_tokens(OWNER, fresh, now=later)
        assert again.id == account.id
        assert again.status is AccountStatus.CONNECTED
        assert (again.revoked_at, again.revocation_reason, again.revoked_at_tiktok) == (
            None,
            None,
            None,
        )
        assert again.scopes == ["user.info.basic", "video.list"]
        assert again.created_at == NOW and again.updated_at == later
        assert (await store.get_account(account.id)).revoked_at is None
        await assert_tokens(store, account.id, fresh)
        doc = await raw_document(store, account.id)
        if doc is not None:
            assert not {"revokedAt", "revocationReason", "revokedAtTikTok"} & doc.keys()
        assert [a.id for a in await store.accounts_due_for_refresh(later + timedelta(days=2),
                                                                     limit=5)] == [account.id]


@gen_test
async def test_a_reconnect_during_a_refresh_wins_over_it(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        assert await store.acquire_refresh_lease(account.id, "holder", seconds=LEASE_SECONDS)
        read = await store.get_account_tokens(account.id)
        # The user connects again while a refresh of the old grant is in flight.
        fresh = grant("reconnected", scopes=("user.info.basic", "video.list"))
        await store.save_account_tokens(OWNER, fresh, now=NOW)
        assert not await store.save_refreshed_tokens(account.id, grant("old"),
                                                     version=read.version, now=NOW)
        await assert_tokens(store, account.id, fresh)
        # The reconnect also dropped the lease: its own tokens may be refreshed at once.
        assert await store.acquire_refresh_lease(account.id, "next", seconds=LEASE_SECONDS)


@gen_test
async def test_a_refresh_never_brings_tokens_back_to_a_revoked_account(make_store):
    async with make_store() as store:
        account = await store.save_account_tokens(OWNER, grant("a"), now=NOW)
        read = await store.get_account_tokens(account.id)
        await store.revoke_account(account.id, now=NOW, reason="disconnected",
                                   revoked_at_tiktok=True)
        assert not await store.save_refreshed_tokens(account.id, grant("b"),
                                                     version=read.version, now=NOW)
        assert (await store.get_account(account.id)).status is AccountStatus.REVOKED
        await assert_tokens_wiped(store, account.id)


@gen_test
async def test_an_old_removal_spares_a_grant_obtained_after_it(make_store):
    async with make_store() as store:
        removed_at = NOW + timedelta(minutes=1)
        before = await store.save_account_tokens("alice", grant("a"), now=NOW)
        reconnected = await store.save_account_tokens(
            "bob", grant("b"), now=removed_at + timedelta(seconds=1)
        )
        assert reconnected.connected_at == removed_at + timedelta(seconds=1)
        changed = await store.revoke_accounts_by_open_id(
            OPEN_ID, now=NOW + timedelta(hours=2), reason=1, connected_before=removed_at
        )
        assert changed == 1
        assert (await store.get_account(before.id)).status is AccountStatus.REVOKED
        assert (await store.get_account(reconnected.id)).status is AccountStatus.CONNECTED
        await assert_tokens(store, reconnected.id, grant("b"))

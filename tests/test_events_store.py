"""The account-event store methods (issue 15), on MemoryStore and on MongoStore over
the wire (SecantusDB, motor and PyMongo): outbox, fenced relay, event log, delivery
claims, redelivery, retention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId

from services.event_types import CONNECTED, REVOKED
from services.events import new_event
from storage.base import Account, AccountStatus, EventStatus, Store, TokenGrant
from storage.mongodb import (
    ACCOUNTS_COLLECTION,
    EVENT_TTL_INDEX,
    EVENTS_COLLECTION,
    MongoStore,
)
from tests.fixtures_mongo import open_mongo_store
from tests.support import fake_grant

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
LEASE_S = 20.0
FENCE_S = 10.0
# A lease short enough to wait out (leases run on the store's clock, not NOW).
SHORT_S = 0.2

gen_test = pytest.mark.gen_test(timeout=30)


def grant(open_id: str) -> TokenGrant:
    return fake_grant(open_id, now=NOW, tag=open_id, refresh_ttl=timedelta(days=180))


async def account(store: Store, open_id: str = "open-1", owner: str = "owner-1") -> Account:
    return await store.save_account_tokens(owner, grant(open_id), now=NOW)


def event_at(account: Account, seconds: float, event_type: str = CONNECTED) -> dict[str, Any]:
    return new_event(event_type, account, now=NOW + timedelta(seconds=seconds), reconnected=False)


async def one_appended(store: Store) -> tuple[Account, dict[str, Any]]:
    """An account with one event in its outbox."""
    alice = await account(store)
    event = event_at(alice, 0)
    await store.append_account_event(alice.id, event)
    return alice, event


async def relay_all(store: Store, holder: str = "relay-a", *, push: bool = True,
                    now: datetime = NOW) -> list[Any]:
    assert await store.acquire_relay_lease(holder, seconds=LEASE_S)
    return await store.relay_outbox(
        holder, now=now, fence_seconds=FENCE_S, push=push, limit=100)


async def until_true(probe: Any, what: str) -> None:
    """Poll ``probe()`` until it answers true (a short lease running out)."""
    for _ in range(200):
        if await probe():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not within 4 s")


async def outbox_of(store: Store, account_id: str) -> list[dict[str, Any]] | None:
    """The stored outbox (MongoDB only: the memory store keeps it in a dict)."""
    if not isinstance(store, MongoStore):
        return None
    doc = await store.database[ACCOUNTS_COLLECTION].find_one({"_id": ObjectId(account_id)})
    assert doc is not None
    return list(doc.get("outbox") or [])


@gen_test
async def test_append_needs_a_known_account_and_its_conditions(make_store):
    async with make_store() as store:
        alice = await account(store)
        assert not await store.append_account_event("0" * 24, event_at(alice, 0))
        assert not await store.append_account_event("not-an-id", event_at(alice, 0))
        refused = event_at(alice, 1)
        assert not await store.append_account_event(
            alice.id, refused, only_if={"status": AccountStatus.REVOKED}
        )
        assert not await store.append_account_event(
            alice.id, refused, only_if={"refresh_token_expires_at": NOW}
        )
        kept = event_at(alice, 2)
        assert await store.append_account_event(
            alice.id,
            kept,
            only_if={
                "status": AccountStatus.CONNECTED,
                "refresh_token_expires_at": NOW + timedelta(days=180),
            },
        )
        with pytest.raises(ValueError, match="only_if cannot name"):
            await store.append_account_event(alice.id, kept, only_if={"access_token": "x"})
        with pytest.raises(ValueError, match="needs"):
            await store.append_account_event(alice.id, {"id": "evt_x"})
        outbox = await outbox_of(store, alice.id)
        if outbox is not None:
            assert [e["id"] for e in outbox] == [kept["id"]]
        logged = await relay_all(store)
        assert [s.id for s in logged] == [kept["id"]]


@gen_test
async def test_relay_logs_oldest_first_keeps_each_outbox_order_and_empties_it(make_store):
    async with make_store() as store:
        alice, bob = await account(store, "open-a"), await account(store, "open-b", "owner-2")
        # Alice's second event carries an earlier timestamp (another process's clock):
        # her outbox order still wins.
        a1, a2 = event_at(alice, 10), event_at(alice, 5, REVOKED)
        b1, b2 = event_at(bob, 1), event_at(bob, 20)
        for owner, event in ((alice, a1), (bob, b1), (alice, a2), (bob, b2)):
            assert await store.append_account_event(owner.id, event)
        assert await store.oldest_undelivered() == NOW + timedelta(seconds=1)
        logged = await relay_all(store)
        assert [s.id for s in logged] == [b1["id"], a1["id"], a2["id"], b2["id"]]
        seqs = [s.seq for s in logged]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
        assert {s.id: (s.account_id, s.owner_id) for s in logged}[a2["id"]] == (
            alice.id, "owner-1")
        assert all(s.status is EventStatus.PENDING and s.next_attempt_at == NOW for s in logged)
        assert logged[1].event == a1  # exactly what was recorded
        assert await outbox_of(store, alice.id) in (None, [])
        assert await relay_all(store) == []  # nothing left
        listed = await store.list_events(after_seq=0, limit=10)
        assert [s.id for s in listed] == [s.id for s in logged]


@gen_test
async def test_without_push_events_are_pull_only(make_store):
    async with make_store() as store:
        alice = await account(store)
        await store.append_account_event(alice.id, event_at(alice, 0))
        (logged,) = await relay_all(store, push=False)
        assert logged.status is EventStatus.PULL_ONLY
        assert await store.due_events(now=NOW + timedelta(hours=1), limit=10) == []
        assert await store.oldest_undelivered() is None


@gen_test
async def test_a_relayer_that_lost_its_lease_logs_nothing(make_store):
    async with make_store() as store:
        _, event = await one_appended(store)
        assert await store.acquire_relay_lease("relay-a", seconds=LEASE_S)
        assert await store.acquire_relay_lease("relay-a", seconds=LEASE_S)  # renew
        assert not await store.acquire_relay_lease("relay-b", seconds=LEASE_S)
        # Its lease does not last beyond the fence: not one seq allocated.
        assert await store.relay_outbox(
            "relay-a", now=NOW, fence_seconds=LEASE_S + 5, push=True, limit=10) == []
        # It stops renewing; once the lease runs out, another relayer takes over.
        assert await store.acquire_relay_lease("relay-a", seconds=SHORT_S)
        await until_true(lambda: store.acquire_relay_lease("relay-b", seconds=LEASE_S),
                         "relay-b takes the lease over")
        assert await store.relay_outbox(
            "relay-a", now=NOW, fence_seconds=0, push=True, limit=10) == []
        assert await store.list_events(after_seq=0, limit=10) == []
        logged = await store.relay_outbox(
            "relay-b", now=NOW, fence_seconds=FENCE_S, push=True, limit=10)
        assert [s.id for s in logged] == [event["id"]]
        # Released: anyone may take it at once.
        await store.release_relay_lease("relay-a")  # not the holder: no effect
        assert not await store.acquire_relay_lease("relay-a", seconds=LEASE_S)
        await store.release_relay_lease("relay-b")
        assert await store.acquire_relay_lease("relay-a", seconds=LEASE_S)


@gen_test
async def test_an_event_logged_before_a_crash_is_only_removed_from_the_outbox(make_store):
    async with make_store() as store:
        alice, event = await one_appended(store)
        await store.append_account_event(alice.id, event)  # as if its $pull never ran
        logged = await relay_all(store)
        assert [s.id for s in logged] == [event["id"]]
        assert len(await store.list_events(after_seq=0, limit=10)) == 1
        assert await outbox_of(store, alice.id) in (None, [])
        assert await relay_all(store) == []


@gen_test
async def test_seq_keeps_growing_across_relayers(make_store):
    async with make_store() as store:
        alice = await account(store)
        seqs = []
        for index, holder in enumerate(("relay-a", "relay-b", "relay-c")):
            await store.append_account_event(alice.id, event_at(alice, index))
            seqs += [s.seq for s in await relay_all(store, holder)]
            await store.release_relay_lease(holder)
        assert seqs == sorted(seqs) and len(set(seqs)) == 3


@gen_test
async def test_pages_by_seq_and_status(make_store):
    async with make_store() as store:
        alice = await account(store)
        events = [event_at(alice, i) for i in range(5)]
        for event in events:
            await store.append_account_event(alice.id, event)
        logged = await relay_all(store)
        first = await store.list_events(after_seq=0, limit=2)
        second = await store.list_events(after_seq=first[-1].seq, limit=2)
        third = await store.list_events(after_seq=second[-1].seq, limit=2)
        assert [s.id for s in first + second + third] == [e["id"] for e in events]
        assert await store.list_events(after_seq=logged[-1].seq, limit=2) == []
        assert await store.list_events(after_seq=0, limit=10, status=EventStatus.FAILED) == []
        claimed = await store.claim_event_for_delivery(
            logged[0].id, "worker", now=NOW, seconds=LEASE_S)
        assert claimed is not None
        await store.mark_attempt_failed(
            logged[0].id, "worker", now=NOW, failure="http 500", next_attempt_at=None)
        failed = await store.list_events(after_seq=0, limit=10, status=EventStatus.FAILED)
        assert [(s.id, s.attempts, s.last_failure) for s in failed] == [
            (logged[0].id, 1, "http 500")]
        assert (await store.get_event(logged[0].id)).status is EventStatus.FAILED
        assert await store.get_event("evt_unknown") is None


@gen_test
async def test_delivery_goes_in_order_per_account_one_claim_at_a_time(make_store):
    async with make_store() as store:
        alice, bob = await account(store, "open-a"), await account(store, "open-b")
        a1, a2, b1 = event_at(alice, 0), event_at(alice, 1), event_at(bob, 2)
        for owner, event in ((alice, a1), (alice, a2), (bob, b1)):
            await store.append_account_event(owner.id, event)
        await relay_all(store)
        due = await store.due_events(now=NOW, limit=10)
        assert [s.id for s in due] == [a1["id"], b1["id"]]  # a2 waits for a1
        assert [s.id for s in await store.due_events(now=NOW, limit=1)] == [a1["id"]]
        # Two workers race for a1: one claim wins.
        claims = await asyncio.gather(
            store.claim_event_for_delivery(a1["id"], "w1", now=NOW, seconds=LEASE_S),
            store.claim_event_for_delivery(a1["id"], "w2", now=NOW, seconds=LEASE_S),
        )
        assert sum(c is not None for c in claims) == 1
        winner = "w1" if claims[0] is not None else "w2"
        # In flight: neither a1 nor a2 is due.
        assert [s.id for s in await store.due_events(now=NOW, limit=10)] == [b1["id"]]
        assert not await store.mark_delivered(a1["id"], "someone-else", now=NOW)
        # It failed; retried in 30 s: a2 still waits.
        retry_at = NOW + timedelta(seconds=30)
        assert await store.mark_attempt_failed(
            a1["id"], winner, now=NOW, failure="timeout", next_attempt_at=retry_at)
        assert [s.id for s in await store.due_events(now=NOW, limit=10)] == [b1["id"]]
        assert await store.claim_event_for_delivery(
            a1["id"], "w3", now=NOW, seconds=LEASE_S) is None
        due = await store.due_events(now=retry_at, limit=10)
        assert [s.id for s in due] == [a1["id"], b1["id"]]
        again = await store.claim_event_for_delivery(
            a1["id"], "w3", now=retry_at, seconds=LEASE_S)
        assert again is not None and again.attempts == 1 and again.last_failure == "timeout"
        assert again.first_attempt_at == NOW  # the first claim's time stays
        assert await store.mark_delivered(a1["id"], "w3", now=retry_at)
        delivered = await store.get_event(a1["id"])
        assert delivered.status is EventStatus.DELIVERED and delivered.attempts == 2
        assert delivered.delivered_at == retry_at and delivered.last_failure is None
        assert [s.id for s in await store.due_events(now=retry_at, limit=10)] == [
            a2["id"], b1["id"]]


@gen_test
async def test_a_failed_event_lets_the_next_one_go_and_can_be_redelivered(make_store):
    async with make_store() as store:
        alice = await account(store)
        a1, a2 = event_at(alice, 0), event_at(alice, 1)
        await store.append_account_event(alice.id, a1)
        await store.append_account_event(alice.id, a2)
        await relay_all(store)
        assert await store.claim_event_for_delivery(a1["id"], "w", now=NOW, seconds=LEASE_S)
        assert await store.mark_attempt_failed(
            a1["id"], "w", now=NOW, failure="connection refused", next_attempt_at=None)
        assert [s.id for s in await store.due_events(now=NOW, limit=10)] == [a2["id"]]
        assert await store.oldest_undelivered() == NOW + timedelta(seconds=1)
        later = NOW + timedelta(hours=1)
        again = await store.redeliver_event(a1["id"], now=later)
        assert again.status is EventStatus.PENDING
        assert (again.attempts, again.next_attempt_at, again.first_attempt_at,
                again.last_failure) == (0, later, None, None)
        assert [s.id for s in await store.due_events(now=later, limit=10)] == [a1["id"]]
        assert await store.redeliver_event("evt_unknown", now=later) is None
        # Only a failed event changes.
        claimed = await store.claim_event_for_delivery(
            a1["id"], "w", now=later, seconds=LEASE_S)
        assert claimed is not None and claimed.first_attempt_at == later
        await store.mark_delivered(a1["id"], "w", now=later)
        assert (await store.redeliver_event(a1["id"], now=later)).status is (
            EventStatus.DELIVERED)


@gen_test
async def test_an_expired_claim_can_be_taken_over(make_store):
    async with make_store() as store:
        _, event = await one_appended(store)
        await relay_all(store)
        claimed = await store.claim_event_for_delivery(
            event["id"], "stalled", now=NOW, seconds=SHORT_S)
        assert claimed is not None and claimed.lease_holder == "stalled"
        assert await store.due_events(now=NOW, limit=10) == []

        async def due_again() -> bool:
            return [s.id for s in await store.due_events(now=NOW, limit=10)] == [event["id"]]

        await until_true(due_again, "the stalled claim runs out")
        assert await store.claim_event_for_delivery(
            event["id"], "fresh", now=NOW, seconds=LEASE_S)
        # The stalled worker's outcome no longer counts.
        assert not await store.mark_attempt_failed(
            event["id"], "stalled", now=NOW, failure="timeout", next_attempt_at=None)
        assert await store.mark_delivered(event["id"], "fresh", now=NOW)


@gen_test
async def test_a_backlog_on_one_account_does_not_hide_the_others(make_store):
    async with make_store() as store:
        alice, bob = await account(store, "open-a"), await account(store, "open-b")
        backlog = [event_at(alice, i) for i in range(6)]
        for event in backlog:
            await store.append_account_event(alice.id, event)
        await store.append_account_event(bob.id, event_at(bob, 10))
        await relay_all(store)
        await store.claim_event_for_delivery(backlog[0]["id"], "w", now=NOW, seconds=LEASE_S)
        due = await store.due_events(now=NOW, limit=2)
        assert [s.account_id for s in due] == [bob.id]


@gen_test
async def test_memory_store_drops_events_past_retention():
    from storage.memory import MemoryStore

    store = MemoryStore(events_retention_seconds=3600)
    alice = await account(store)
    await store.append_account_event(alice.id, event_at(alice, 0))
    (old,) = await relay_all(store)
    later = NOW + timedelta(hours=2)
    await store.append_account_event(alice.id, event_at(alice, 7200))
    (new,) = await relay_all(store, now=later)
    assert [s.id for s in await store.list_events(after_seq=0, limit=10)] == [new.id]
    assert await store.get_event(old.id) is None


@gen_test
async def test_mongo_event_indexes_and_retention(mongo_server, mongo_database_name, mongo_driver):
    uri = mongo_server.uri
    async with open_mongo_store(uri, mongo_database_name, mongo_driver) as store:
        indexes = {i["name"]: i async for i in await _list_indexes(store, EVENTS_COLLECTION)}
        assert indexes[EVENT_TTL_INDEX]["expireAfterSeconds"] == 7 * 86400
        assert indexes["seq_unique"]["unique"] is True
        accounts = {i["name"]: i async for i in await _list_indexes(store, ACCOUNTS_COLLECTION)}
        assert accounts["outbox_id"]["sparse"] is True
    # A changed EVENTS_RETENTION_DAYS changes the index at the next start.
    from storage.crypto import TokenCipher
    from storage.mongodb import connect_mongo

    client, database = connect_mongo(uri, mongo_database_name, driver=mongo_driver)
    store = MongoStore(database, TokenCipher.ephemeral(), client=client,
                       events_retention_seconds=2 * 86400)
    try:
        await store.initialize()
        indexes = {i["name"]: i async for i in await _list_indexes(store, EVENTS_COLLECTION)}
        assert indexes[EVENT_TTL_INDEX]["expireAfterSeconds"] == 2 * 86400
    finally:
        await store.close()


async def _list_indexes(store: MongoStore, collection: str) -> Any:
    cursor = store.database[collection].list_indexes()
    if asyncio.iscoroutine(cursor):  # PyMongo's async API returns a coroutine
        cursor = await cursor
    return cursor

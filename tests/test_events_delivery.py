"""Account events end to end in one process (issue 15): appended to an account's outbox,
relayed, pushed to a real receiver that verifies every delivery with the
``standardwebhooks`` package, and pulled over HTTP from ``GET /events``. Memory store
and MongoDB over the wire (SecantusDB, motor and PyMongo).

Events are appended with ``Store.append_account_event``, so that delivery is tested on
its own; tests/test_events_emission.py has the state changes themselves emit them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from scripts.cassette_scenarios import serving as listening
from services.event_delivery import Signer
from services.event_types import CONNECTED, REAUTHORIZATION_REQUIRED, REVOKED
from services.events import new_event
from storage.base import EventStatus
from tests.fixtures_mongo import mongo_failpoint, open_memory_store, open_mongo_store
from tests.gateway_events import (
    SECRET,
    WAIT,
    connect,
    record,
    running,
    until_accepted,
    until_status,
)
from tests.processes import poll_until
from tests.receiver import ANSWER_MARKER, Receiver
from tests.support import assert_envelope, bearer

OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()

gen_test = pytest.mark.gen_test(timeout=60)


# -- push -------------------------------------------------------------------------------


@gen_test
async def test_events_are_relayed_and_delivered_signed_in_order_per_account(make_store):
    async with Receiver(SECRET) as receiver, make_store() as store, running(store, receiver) as run:
        alice, bob = await connect(run.store, "open-a"), await connect(run.store, "open-b")
        sent = [
            await record(run, alice),
            await record(run, bob),
            await record(run, alice, REAUTHORIZATION_REQUIRED, reason="refresh_refused"),
            await record(run, bob, REVOKED, source="product"),
        ]
        await until_accepted(receiver, [e["id"] for e in sent])
        assert receiver.refused == []
        assert receiver.accepted_counts() == {e["id"]: 1 for e in sent}
        assert receiver.for_account(alice.id) == [sent[0]["id"], sent[2]["id"]]
        assert receiver.for_account(bob.id) == [sent[1]["id"], sent[3]["id"]]
        by_id = {e["id"]: e for e in receiver.accepted}
        assert [by_id[e["id"]] for e in sent] == sent  # the body is the event, as recorded
        first = receiver.requests[0]
        assert first.headers["Webhook-Id"] == receiver.accepted[0]["id"]
        assert first.headers["Content-Type"] == "application/json"
        sent_at = int(first.headers["Webhook-Timestamp"])
        assert abs(sent_at - datetime.now(UTC).timestamp()) < 300
        # The account as the accounts API shows it: never a token.
        assert '"accessToken"' not in first.body.decode()
        assert "act.open-a" not in first.body.decode() and "rft." not in first.body.decode()
        for event in sent:
            await until_status(run.store, event["id"], EventStatus.DELIVERED)
        assert run.metric("tiktok_gateway_events_delivered_total") == 4
        assert run.metric("tiktok_gateway_events_recorded_total", type=CONNECTED) == 2
        assert run.metric("tiktok_gateway_events_recorded_total", type=REVOKED) == 1
        assert run.metric("tiktok_gateway_event_delivery_retries_total") == 0


@gen_test
async def test_receiver_down_then_up_gets_every_event_in_order(make_store):
    receiver = Receiver(SECRET)  # not listening yet: connections are refused
    try:
        async with make_store() as store, running(
            store, receiver, schedule=",".join(["0.2"] * 40)
        ) as run:
            alice, bob = await connect(run.store, "open-a"), await connect(run.store, "open-b")
            sent = []
            for account in (alice, bob, alice, bob, alice, bob):
                sent.append(await record(run, account))
            await until_status(run.store, sent[0]["id"], EventStatus.PENDING)

            async def refused() -> Any:
                return await run.store.get_event(sent[0]["id"])

            first = await poll_until(refused, lambda s: s.attempts >= 2, timeout=WAIT,
                                     interval=0.05, what="retried while down")
            assert first.last_failure == "connection refused"
            # A later event of the account waits behind the first.
            assert (await run.store.get_event(sent[2]["id"])).attempts == 0
            receiver.start()
            await until_accepted(receiver, [e["id"] for e in sent])
            assert receiver.for_account(alice.id) == [sent[i]["id"] for i in (0, 2, 4)]
            assert receiver.for_account(bob.id) == [sent[i]["id"] for i in (1, 3, 5)]
            assert receiver.accepted_counts() == {e["id"]: 1 for e in sent}
            assert run.metric("tiktok_gateway_event_delivery_retries_total") >= 2
    finally:
        await receiver.stop()


@gen_test
async def test_three_500s_then_ok_and_the_answer_body_is_kept_nowhere(make_store, caplog):
    caplog.set_level(logging.DEBUG)
    async with (
        Receiver(SECRET, script=["500", "500", "500"]) as receiver,
        make_store() as store,
        running(store, receiver) as run,
    ):
        alice = await connect(run.store, "open-a")
        event = await record(run, alice)

        async def failing() -> Any:
            return await run.store.get_event(event["id"])

        retried = await poll_until(failing, lambda s: s is not None and s.attempts >= 1,
                                   timeout=WAIT, interval=0.02, what="first attempt")
        assert retried.last_failure == "http 500"
        await until_accepted(receiver, [event["id"]])
        delivered = await until_status(run.store, event["id"], EventStatus.DELIVERED)
        assert delivered.attempts == 4
        assert [d.headers["Webhook-Id"] for d in receiver.requests] == [event["id"]] * 4
        assert run.metric("tiktok_gateway_event_delivery_retries_total") == 3
        assert run.metric("tiktok_gateway_events_delivered_total") == 1
        gateway_log = "\n".join(
            r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
        assert ANSWER_MARKER not in gateway_log
        assert "failed: http 500" in gateway_log
        assert "token=in-the-query" not in gateway_log
        assert ANSWER_MARKER not in repr(delivered)


@gen_test
async def test_too_slow_is_a_timeout_then_a_retry(make_store, caplog):
    caplog.set_level(logging.INFO, logger="gateway.events")
    async with (
        Receiver(SECRET, script=["slow"], slow_seconds=1.5) as receiver,
        make_store() as store,
        running(store, receiver, request_timeout=0.3) as run,
    ):
        alice = await connect(run.store, "open-a")
        event = await record(run, alice)
        delivered = await until_status(run.store, event["id"], EventStatus.DELIVERED)
        assert delivered.attempts >= 2
        assert "failed: timeout" in caplog.text
        # The slow answer may still have been processed: at least once, so the
        # receiver sees the same webhook-id again and deduplicates on it.
        assert [d.headers["Webhook-Id"] for d in receiver.requests][:2] == [event["id"]] * 2


@gen_test
async def test_redirect_is_a_failure_schedule_runs_out_then_listed_and_redelivered(make_store):
    async with (
        Receiver(SECRET, script=["redirect", "redirect", "redirect"]) as receiver,
        make_store() as store,
        running(store, receiver, schedule="0.1,0.1") as run,
    ):
        alice = await connect(run.store, "open-a")
        doomed, behind = await record(run, alice), await record(run, alice)
        failed = await until_status(run.store, doomed["id"], EventStatus.FAILED)
        assert (failed.attempts, failed.last_failure) == (3, "http 302")
        assert receiver.elsewhere_hits == 0  # never followed
        # The next event of the account went once the first failed.
        await until_accepted(receiver, [behind["id"]])
        assert run.metric("tiktok_gateway_events_failed_total") == 1

        listed = await run.get("/events?status=failed")
        assert listed.code == 200
        body = json.loads(listed.body)
        assert [e["id"] for e in body["events"]] == [doomed["id"]]
        assert body["events"][0]["delivery"] == {
            "status": "failed", "attempts": 3, "lastFailure": "http 302",
            "nextAttemptAt": None, "deliveredAt": None,
        }
        again = await run.post(f"/events/{doomed['id']}/redeliver")
        assert again.code == 202, again.body
        assert json.loads(again.body)["delivery"]["status"] == "pending"
        await until_accepted(receiver, [doomed["id"]])
        delivered = await until_status(run.store, doomed["id"], EventStatus.DELIVERED)
        assert delivered.attempts == 1
        assert json.loads((await run.get("/events?status=failed")).body)["events"] == []
        # Delivered: nothing to redeliver; unknown: not found.
        assert_envelope(await run.post(f"/events/{doomed['id']}/redeliver"), 409, "CONFLICT")
        assert_envelope(await run.post("/events/evt_nope/redeliver"), 404, "NOT_FOUND")


@gen_test
async def test_forged_tampered_and_replayed_deliveries_fail_the_receivers_check():
    async with (
        Receiver(SECRET) as receiver,
        open_memory_store() as store,
        running(store, receiver) as run,
    ):
        alice = await connect(run.store, "open-a")
        event = await record(run, alice)
        await until_accepted(receiver, [event["id"]])
        genuine = receiver.requests[0]
        headers = {k: v for k, v in genuine.headers.items() if k.lower().startswith("webhook")}
        headers["Content-Type"] = "application/json"
        # Tampered body, same signature.
        tampered = genuine.body.replace(b"open-a", b"open-z")
        assert await receiver.post(tampered, headers) == 400
        # Signed with a key the product does not have.
        forged = Signer([OTHER_SECRET]).headers(event["id"], genuine.body.decode(),
                                                datetime.now(UTC))
        assert await receiver.post(genuine.body, forged) == 400
        # A genuine signature replayed after the 5-minute tolerance.
        stale = Signer([SECRET]).headers(event["id"], genuine.body.decode(),
                                         datetime.now(UTC) - timedelta(minutes=10))
        assert await receiver.post(genuine.body, stale) == 400
        assert receiver.refused == [
            "No matching signature found",
            "No matching signature found",
            "Message timestamp too old",
        ]
        assert receiver.accepted_ids == [event["id"]]


@gen_test
async def test_every_secret_signs_during_a_key_change_over():
    new_side = Webhook(OTHER_SECRET)
    async with (
        Receiver(SECRET) as old_side,
        open_memory_store() as store,
        running(store, old_side, secrets=f"{OTHER_SECRET},{SECRET}") as run,
    ):
        alice = await connect(run.store, "open-a")
        event = await record(run, alice)
        await until_accepted(old_side, [event["id"]])
        delivery = old_side.requests[0]
        assert delivery.headers["Webhook-Signature"].count("v1,") == 2
        assert new_side.verify(delivery.body, delivery.headers)["id"] == event["id"]


@gen_test
async def test_stopping_lets_a_delivery_in_flight_finish():
    async with (
        Receiver(SECRET, script=["slow"], slow_seconds=0.5) as receiver,
        open_memory_store() as store,
        running(store, receiver) as run,
    ):
        alice = await connect(run.store, "open-a")
        event = await record(run, alice)

        async def arrived() -> int:
            return len(receiver.requests)

        await poll_until(arrived, lambda n: n == 1, timeout=WAIT, interval=0.02,
                         what="delivery in flight")
        await run.workers.stop(grace_seconds=5)
        assert (await run.store.get_event(event["id"])).status is EventStatus.DELIVERED
        assert receiver.accepted_ids == [event["id"]]


@gen_test
async def test_two_delivery_workers_on_one_mongodb_deliver_each_event_once(
    mongo_server, mongo_database_name, mongo_driver
):
    uri = mongo_server.uri
    async with (
        Receiver(SECRET) as receiver,
        open_mongo_store(uri, mongo_database_name, mongo_driver) as first,
        open_mongo_store(uri, mongo_database_name, mongo_driver) as second,
        running(first, receiver) as one,
        running(second, receiver) as two,
    ):
        accounts = [await connect(one.store, f"open-{i}") for i in range(4)]
        sent = []
        for round_ in range(3):
            for index, account in enumerate(accounts):
                run = one if (round_ + index) % 2 else two
                sent.append(await record(run, account))
        await until_accepted(receiver, [e["id"] for e in sent])
        for event in sent:
            await until_status(one.store, event["id"], EventStatus.DELIVERED)
        assert receiver.accepted_counts() == {e["id"]: 1 for e in sent}
        assert len(receiver.requests) == len(sent)
        for account in accounts:
            assert receiver.for_account(account.id) == [
                e["id"] for e in sent if e["data"]["account"]["id"] == account.id
            ]
        delivered = one.metric("tiktok_gateway_events_delivered_total") + two.metric(
            "tiktok_gateway_events_delivered_total")
        assert delivered == len(sent)


@gen_test
async def test_oldest_undelivered_age_is_a_metric():
    receiver = Receiver(SECRET)  # down
    async with open_memory_store() as store, running(store, receiver, schedule="60") as run:
        alice = await connect(run.store, "open-a")
        old = new_event(CONNECTED, alice, now=datetime.now(UTC) - timedelta(minutes=5),
                        reconnected=True)
        assert await run.store.append_account_event(alice.id, old)
        await run.workers.update_gauge()
        age = run.metric("tiktok_gateway_oldest_undelivered_event_age_seconds")
        assert 300 <= age < 3600
        scraped = await run.client.fetch(run.url + "/metrics")
        assert b"tiktok_gateway_oldest_undelivered_event_age_seconds" in scraped.body
        assert b'tiktok_gateway_events_recorded_total{type="tiktok.account.revoked"} 0.0' in (
            scraped.body)


# -- pull -------------------------------------------------------------------------------


@gen_test
async def test_pull_feed_pages_without_gap_or_duplicate(make_store):
    async with make_store() as store, running(store) as run:  # push off
        alice, bob = await connect(run.store, "open-a"), await connect(run.store, "open-b", "u2")
        sent = [await record(run, alice if i % 3 else bob) for i in range(7)]
        await run.workers.relay.run_once()
        seen: list[dict[str, Any]] = []
        cursor = ""
        for _ in range(5):
            page = json.loads((await run.get(f"/events?after={cursor}&limit=3")).body)
            seen += page["events"]
            assert isinstance(page["nextCursor"], str)
            if not page["events"]:
                assert page["nextCursor"] == cursor
                break
            cursor = page["nextCursor"]
        # Every user's, each once, in recorded order: per account exactly, across
        # accounts by timestamp (events of one millisecond may come either way).
        ids = [e["id"] for e in seen]
        assert sorted(ids) == sorted(e["id"] for e in sent) and len(set(ids)) == len(sent)
        for account in (alice, bob):
            assert [e["id"] for e in seen if e["data"]["account"]["id"] == account.id] == [
                e["id"] for e in sent if e["data"]["account"]["id"] == account.id]
        stamps = [e["timestamp"] for e in seen]
        assert stamps == sorted(stamps)
        by_id = {e["id"]: e for e in sent}
        assert {k: v for k, v in seen[0].items() if k != "delivery"} == by_id[seen[0]["id"]]
        assert seen[0]["delivery"]["status"] == "pull_only"
        # Later events come after the cursor a product kept.
        later = [await record(run, bob), await record(run, alice)]
        await run.workers.relay.run_once()
        page = json.loads((await run.get(f"/events?after={cursor}&limit=3")).body)
        assert [e["id"] for e in page["events"]] == [e["id"] for e in later]
        # Push is off: nothing to redeliver.
        assert_envelope(await run.post(f"/events/{sent[0]['id']}/redeliver"), 409, "CONFLICT")


@gen_test
async def test_pull_feed_refuses_bad_requests_with_the_envelope():
    async with open_memory_store() as store, running(store) as run:
        assert_envelope(await run.get("/events", headers={}), 401, "UNAUTHORIZED")
        body = assert_envelope(
            await run.get("/events", headers=bearer("user-1", scope="tiktok.tokens")),
            403, "PERMISSION_DENIED",
        )
        assert body["details"] == {"requiredScope": "tiktok.events"}
        for query, parameter in (
            ("after=abc", "after"),
            ("after=-1", "after"),
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=ten", "limit"),
            ("status=lost", "status"),
            ("limit=1&limit=2", "limit"),
            ("cursor=12", "cursor"),
        ):
            body = assert_envelope(await run.get(f"/events?{query}"), 400, "VALIDATION_ERROR")
            assert body["details"] == {"parameter": parameter}, query
        ok = json.loads((await run.get("/events")).body)
        assert ok == {"events": [], "nextCursor": "0"}
        refused = await run.client.fetch(run.url + "/events/evt_x/redeliver", method="POST",
                                         body=b"", raise_error=False)
        assert_envelope(refused, 401, "UNAUTHORIZED")


def test_receiver_helper_is_a_real_check():
    """The receiver's check is the package's: a body signed with our Signer verifies."""
    body = json.dumps({"id": "evt_1"})
    headers = Signer([SECRET]).headers("evt_1", body, datetime.now(UTC))
    assert Webhook(SECRET).verify(body, headers) == {"id": "evt_1"}


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_receiver() -> str:
    """The receiver README.md gives products, as it stands there."""
    text = README.read_text()
    after = text[text.index("<!-- events-receiver-example"):]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@gen_test
async def test_the_readme_receiver_verifies_real_deliveries_and_skips_repeats(monkeypatch):
    monkeypatch.setenv("PRODUCT_WEBHOOK_SECRET", SECRET)
    example: dict[str, Any] = {"__name__": "readme_receiver"}
    exec(compile(readme_receiver(), "README.md", "exec"), example)  # noqa: S102 - our README
    handled: list[dict[str, Any]] = []
    example["handle"] = handled.append  # the product's own code, called once per event
    async with listening(example["make_app"]()) as base:
        url = base + "/hooks/tiktok"
        async with open_memory_store() as store, running(store, url=url) as run:
            alice = await connect(run.store, "open-a")
            sent = [await record(run, alice), await record(run, alice, REVOKED, source="tiktok",
                                                           reason=1)]
            for event in sent:
                await until_status(run.store, event["id"], EventStatus.DELIVERED)
            assert handled == sent
            # The same event again (an answer lost on the way back): acknowledged, not
            # handled twice.
            stored = await run.store.get_event(sent[0]["id"])
            assert run.workers.delivery is not None
            assert await run.workers.delivery.deliver(stored) is None
            assert handled == sent
            # Not from the gateway: refused.
            forged = Signer([OTHER_SECRET]).headers(sent[0]["id"], json.dumps(sent[0]),
                                                    datetime.now(UTC))
            answer = await run.client.fetch(url, method="POST", body=json.dumps(sent[0]),
                                            headers=forged, raise_error=False)
            assert answer.code == 400
            assert handled == sent


@gen_test
async def test_a_store_outage_pauses_the_relay_with_one_warning(
    mongo_server, mongo_database_name, caplog
):
    caplog.set_level(logging.INFO, logger="gateway.events")
    uri = mongo_server.uri
    async with open_mongo_store(uri, mongo_database_name, "motor") as store, running(
        store
    ) as run:
        alice = await connect(run.store, "open-a")
        # Every lease round fails for a while (13: Unauthorized, as a revoked role would).
        with mongo_failpoint(uri, failCommands=["findAndModify"], errorCode=13,
                             appName="tiktok-gateway"):
            event = await record(run, alice)

            async def paused() -> list[str]:
                return [r.getMessage() for r in caplog.records if "paused" in r.getMessage()]

            await poll_until(paused, bool, timeout=WAIT, interval=0.05, what="relay paused")
            await asyncio.sleep(0.5)  # several failing rounds, backing off
        await until_status(run.store, event["id"], EventStatus.PULL_ONLY)

        async def resumed() -> list[str]:
            return [r.getMessage() for r in caplog.records if "resumed after" in r.getMessage()]

        # The event is stored as relayed a moment before that round logs its recovery.
        await poll_until(resumed, bool, timeout=WAIT, interval=0.05, what="relay resumed")
        messages = [r.getMessage() for r in caplog.records if r.name == "gateway.events"]
        assert len([m for m in messages if "paused" in m]) == 1, messages
        assert len([m for m in messages if "resumed after" in m]) == 1, messages

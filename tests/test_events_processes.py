"""Account events across gateway processes (``python server.py``) sharing one MongoDB
(the session's SecantusDB, a fresh database per test), pushed to a real receiver in the
test's event loop that verifies every delivery with the ``standardwebhooks`` package.

The test appends events through a store of its own, as a state change will.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from services.event_types import CONNECTED
from services.events import new_event
from storage.base import Account, EventStatus, Store
from storage.crypto import TokenCipher
from tests.fixtures_mongo import open_mongo_store
from tests.gateway_events import connect
from tests.processes import GatewayProcess, gateway_settings, poll_until
from tests.receiver import Receiver
from tests.support import LOOPBACK, TOKEN_KEY, free_port

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
TIMEOUT_S = 30.0

gen_test = pytest.mark.gen_test(timeout=120)


def settings(uri: str, database: str, receiver: Receiver, schedule: str) -> dict[str, str]:
    return gateway_settings(
        uri,
        database,
        f"http://{LOOPBACK}:{free_port()}",  # TikTok is never called here
        REFRESH_INTERVAL_SECONDS="0",
        PRODUCT_WEBHOOK_URL=receiver.url,
        PRODUCT_WEBHOOK_SECRET=SECRET,
        PRODUCT_WEBHOOK_RETRY_SCHEDULE=schedule,
    )


def cipher() -> TokenCipher:
    return TokenCipher(TokenCipher.parse_keys(TOKEN_KEY))


async def record(store: Store, account: Account) -> dict[str, Any]:
    event = new_event(CONNECTED, account, reconnected=False)
    assert await store.append_account_event(account.id, event)
    return event


async def until(store: Store, ids: list[str], accept: Any, what: str) -> list[Any]:
    async def events() -> list[Any]:
        return [await store.get_event(event_id) for event_id in ids]

    return await poll_until(events, lambda found: all(e is not None and accept(e)
                                                      for e in found),
                            timeout=TIMEOUT_S, what=what)


def assert_in_order_once(receiver: Receiver, accounts: list[Account],
                         sent: list[dict[str, Any]]) -> None:
    assert receiver.refused == []
    assert receiver.accepted_counts() == {e["id"]: 1 for e in sent}
    for account in accounts:
        assert receiver.for_account(account.id) == [
            e["id"] for e in sent if e["data"]["account"]["id"] == account.id
        ]


@gen_test
async def test_pending_events_survive_a_gateway_restart(
    client, tmp_path: Path, mongo_server, mongo_database_name
):
    uri = mongo_server.uri
    receiver = Receiver(SECRET)  # down until the second gateway runs
    env = settings(uri, mongo_database_name, receiver, ",".join(["0.5"] * 200))
    try:
        async with open_mongo_store(uri, mongo_database_name, "motor", cipher()) as store:
            accounts = [await connect(store, f"open-{i}") for i in range(3)]
            with GatewayProcess(tmp_path / "first.log", **env) as first:
                await first.wait_ready(client)
                sent = [await record(store, a) for a in accounts + accounts]
                ids = [e["id"] for e in sent]
                # Relayed, and the head of each account tried at least once.
                await until(store, ids, lambda e: e.status is EventStatus.PENDING,
                            "relayed by the first gateway")
                await until(store, ids[:3], lambda e: e.attempts >= 1, "attempted")
                assert first.stop() == 0, first.log_tail()
            stored = [await store.get_event(i) for i in ids]
            assert all(e is not None and e.status is EventStatus.PENDING for e in stored)
            assert {e.last_failure for e in stored[:3] if e} == {"connection refused"}
            receiver.start()
            with GatewayProcess(tmp_path / "second.log", **env) as second:
                await second.wait_ready(client)
                await until(store, ids, lambda e: e.status is EventStatus.DELIVERED,
                            "delivered by the second gateway")
                assert second.running, second.log_tail()
            assert_in_order_once(receiver, accounts, sent)
    finally:
        await receiver.stop()


@gen_test
async def test_two_gateway_processes_deliver_each_event_once(
    client, tmp_path: Path, mongo_server, mongo_database_name
):
    uri = mongo_server.uri
    receiver = Receiver(SECRET)
    env = settings(uri, mongo_database_name, receiver, "0.5,0.5,0.5")
    async with (
        receiver,
        open_mongo_store(uri, mongo_database_name, "pymongo", cipher()) as store,
    ):
        accounts = [await connect(store, f"open-{i}") for i in range(4)]
        with (
            GatewayProcess(tmp_path / "one.log", **env) as one,
            GatewayProcess(tmp_path / "two.log", **env) as two,
        ):
            await one.wait_ready(client)
            await two.wait_ready(client)
            sent = []
            for _ in range(3):
                sent += [await record(store, a) for a in accounts]
            ids = [e["id"] for e in sent]
            await until(store, ids, lambda e: e.status is EventStatus.DELIVERED,
                        "delivered")
            assert one.running and two.running
        assert_in_order_once(receiver, accounts, sent)
        assert len(receiver.requests) == len(sent)  # not one sent twice
        for name in ("one.log", "two.log"):
            log = (tmp_path / name).read_text()
            assert "Traceback" not in log, log[-3000:]

"""MongoDB outages and several gateway processes, over real processes.

Gateways run as ``python server.py`` (``tests.processes.GatewayProcess``) against a
SecantusDB that the test stops and starts (``mongo_process``); TikTok is the
in-process sandbox, served on the test's event loop and called by the gateways over
loopback. Blocking calls (starting or stopping MongoDB) are made only while no
gateway request needs the sandbox. Every wait is a bounded poll; every child
process is stopped in ``finally`` (the context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from server import make_app
from storage.mongodb import (
    ACCOUNT_KEY_INDEX,
    ACCOUNTS_COLLECTION,
    PENDING_COLLECTION,
)
from tests.fixtures_mongo import raw_database
from tests.flow import (
    assert_one_state_connected_once,
    authorize,
    connect,
    consent,
    follow,
    location,
    start,
)
from tests.processes import GatewayProcess, gateway_settings, wait_for_indexes
from tests.support import (
    CONNECTED,
    assert_envelope,
    forged_state,
    free_port,
    make_config,
)

DRIVERS = ["motor", "pymongo"]
# The gateway retries index creation every STORE_RETRY_SECONDS (5 s) plus a 500 ms
# server-selection timeout; these bounds leave room for a few rounds on a slow machine.
READY_TIMEOUT_S = 20.0


def assert_store_unavailable(response: Any) -> dict[str, Any]:
    body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["dependency"] == "mongodb", body
    return body


# -- MongoDB down at start-up ------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_gateway_started_while_mongodb_is_down_recovers_without_restart(
    tmp_path, mongo_process, mongo_database_name, sandbox, client, driver
):
    mongo_process.stop()
    settings = gateway_settings(
        mongo_process.uri, mongo_database_name, sandbox.url, driver=driver
    )
    with GatewayProcess(tmp_path / "gateway.log", **settings) as gateway:
        await gateway.wait_healthy(client)
        health = await gateway.get(client, "/healthz")
        assert health is not None and health.code == 200
        assert json.loads(health.body) == {"status": "ok"}
        assert_store_unavailable(await gateway.get(client, "/readyz"))
        assert_store_unavailable(await authorize(client, gateway.url))
        assert gateway.running, gateway.log_tail()

        mongo_process.start()
        await gateway.wait_ready(client, READY_TIMEOUT_S)
        # The index creation that failed at start-up is retried in the background.
        indexes = await wait_for_indexes(mongo_process.uri, mongo_database_name)
        unique = indexes["accounts"][ACCOUNT_KEY_INDEX]
        assert unique["key"] == [("ownerId", 1), ("platform", 1), ("platformAccountId", 1)]
        assert unique.get("unique") is True
        await connect(client, gateway.url)
        assert sandbox.stats["token"] == 1
        assert gateway.running, gateway.log_tail()
        assert gateway.stop() == 0, gateway.log_tail()  # SIGTERM: a clean shutdown


# -- MongoDB down in the middle of a flow --------------------------------------------


@pytest.mark.gen_test(timeout=90)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_mongodb_stopped_mid_flow_answers_503_then_recovers(
    tmp_path, mongo_process, mongo_database_name, sandbox, client, driver
):
    settings = gateway_settings(
        mongo_process.uri, mongo_database_name, sandbox.url, driver=driver
    )
    with GatewayProcess(tmp_path / "gateway.log", **settings) as gateway:
        await gateway.wait_ready(client, READY_TIMEOUT_S)
        await wait_for_indexes(mongo_process.uri, mongo_database_name)
        started = await start(client, gateway.url)
        old_callback = await consent(client, gateway.url, started["authorizationUrl"])

        mongo_process.stop()
        # Bounded by the client's 10 s request timeout: a hang fails here, not later.
        response = await follow(client, old_callback)
        assert_store_unavailable(response)
        assert sandbox.stats["token"] == 0  # the claim failed before TikTok was called
        assert_store_unavailable(await gateway.get(client, "/readyz"))
        assert gateway.running, gateway.log_tail()

        mongo_process.start()
        await gateway.wait_ready(client, READY_TIMEOUT_S)
        await connect(client, gateway.url)
        assert sandbox.stats["token"] == 1

        # The old state: its claim never reached MongoDB (the store failed inside
        # claim_pending, before ConnectionService.complete records any outcome), so
        # the pending record is still "pending" and TikTok's code is still unused.
        # The same callback URL therefore completes now; this is what the code
        # guarantees when the outage hits before the claim. (After the claim, the
        # same URL answers what the first one did if its failure could be recorded,
        # else 503 while the state stays "in_progress", until it expires.)
        assert location(await follow(client, old_callback)) == CONNECTED
        assert sandbox.stats["token"] == 2

        with raw_database(mongo_process.uri, mongo_database_name) as database:
            accounts = list(database[ACCOUNTS_COLLECTION].find({}))
            states = {d["status"] for d in database[PENDING_COLLECTION].find({})}
        assert len(accounts) == 1  # the same TikTok user reconnected: one document
        assert states == {"completed"}
        assert gateway.stop() == 0, gateway.log_tail()


# -- two gateway processes on one MongoDB ------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_two_gateway_processes_complete_one_state_once(
    tmp_path, mongo_server, mongo_database_name, sandbox, client
):
    # One on each driver: the claim is MongoDB's atomic update, whichever client sends it.
    gateways = [
        GatewayProcess(
            tmp_path / f"gateway-{driver}.log",
            **gateway_settings(mongo_server.uri, mongo_database_name, sandbox.url, driver=driver),
        )
        for driver in DRIVERS
    ]
    try:
        for gateway in gateways:
            gateway.start()
        for gateway in gateways:
            await gateway.wait_ready(client, READY_TIMEOUT_S)
        await wait_for_indexes(mongo_server.uri, mongo_database_name)
        first, second = gateways
        started = await start(client, first.url)
        callback_url = await consent(client, first.url, started["authorizationUrl"])
        query = callback_url.split("?", 1)[1]
        urls = [f"{gateways[i % 2].url}/oauth/tiktok/callback?{query}" for i in range(20)]
        responses = await asyncio.gather(*(follow(client, url) for url in urls))

        assert_one_state_connected_once(responses, CONNECTED)
        assert sandbox.stats["token"] == 1
        assert sandbox.stats["userinfo"] == 1
        with raw_database(mongo_server.uri, mongo_database_name) as database:
            assert database[ACCOUNTS_COLLECTION].count_documents({}) == 1
            [state] = list(database[PENDING_COLLECTION].find({}))
        assert state["status"] == "completed"
        assert all(gateway.running for gateway in gateways)
    finally:
        for gateway in gateways:
            gateway.stop()


# -- the store unreachable, in-process -----------------------------------------------


class TestStoreUnreachableInProcess:
    PASSWORD = "s3cret-" + secrets.token_hex(4)

    @pytest.fixture
    def app(self, io_loop, mongo_driver):
        closed = f"http://127.0.0.1:{free_port()}"  # TikTok must not be reached either
        app = make_app(
            make_config(
                MONGODB_URI=f"mongodb://gateway:{self.PASSWORD}@127.0.0.1:{free_port()}/",
                MONGODB_DRIVER=mongo_driver,
                MONGODB_TIMEOUT_MS="300",
                TIKTOK_API_BASE_URL=closed,
                TIKTOK_AUTHORIZE_URL=f"{closed}/v2/auth/authorize/",
            )
        )
        yield app
        io_loop.run_sync(app.settings["gateway"].store.close)

    @pytest.mark.gen_test(timeout=30)
    async def test_every_store_path_answers_503(self, app, http_client, base_url):
        responses = {
            "authorize": await authorize(http_client, base_url),
            "callback": await follow(
                http_client,
                f"{base_url}/oauth/tiktok/callback?code=abc&state={forged_state(jti=uuid.uuid4().hex)}",
            ),
            "readyz": await http_client.fetch(f"{base_url}/readyz", raise_error=False),
        }
        for name, response in responses.items():
            body = assert_store_unavailable(response)
            assert self.PASSWORD not in response.body.decode(), name
            assert body["requestId"], name
        health = await http_client.fetch(f"{base_url}/healthz", raise_error=False)
        assert health.code == 200


SOCKET_TIMEOUT_MS = 500


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and return once every thread of it has stopped: the signal is
    asynchronous, and a thread still running can answer one more request."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        states = set()
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                # "pid (comm) S ...": the state follows the last ")".
                states.add((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states <= {"T", "t"}:
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop: thread states {states}")


# The bound is the point: without a socket timeout the call waits for the driver's
# next heartbeat (about 10 s) and the test times out.
@pytest.mark.gen_test(timeout=8)
async def test_a_stalled_mongodb_fails_a_store_call_at_the_socket_timeout(
    mongo_process, mongo_driver
):
    """Reachable but frozen: the socket timeout, not the driver's heartbeat, decides."""
    from core.errors import StoreUnavailable
    from storage.crypto import TokenCipher
    from storage.mongodb import MongoStore, connect_mongo

    client, database = connect_mongo(
        mongo_process.uri,
        f"stall_{uuid.uuid4().hex}",
        driver=mongo_driver,
        server_selection_timeout_ms=500,
        connect_timeout_ms=500,
        socket_timeout_ms=SOCKET_TIMEOUT_MS,
    )
    store = MongoStore(database, TokenCipher.ephemeral(), client=client)
    try:
        await store.initialize()
        assert await store.list_accounts("owner") == []
        freeze(mongo_process.pid)
        try:
            with pytest.raises(StoreUnavailable) as caught:
                await store.list_accounts("owner")
            assert caught.value.details == {"dependency": "mongodb"}
        finally:
            os.kill(mongo_process.pid, signal.SIGCONT)
    finally:
        await store.close()

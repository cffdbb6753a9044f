"""Ready means ready: ``/readyz`` answers 200 only once the store's indexes exist.

The gateway is the standalone application (``make_app``) on SecantusDB over the wire,
set up by ``server.initialize_store`` as ``python server.py`` does at start-up, or
``python server.py`` itself. Conflicting indexes and duplicate documents are made in
the database beforehand with a plain PyMongo client, as an earlier deployment or an
operator would have left them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pymongo import ASCENDING

from server import initialize_store, make_app
from storage.base import Store
from storage.mongodb import (
    ACCOUNT_KEY_INDEX,
    ACCOUNTS_COLLECTION,
    PENDING_COLLECTION,
    PENDING_TTL_INDEX,
    PLATFORM_ACCOUNT_INDEX,
)
from tests.fixtures_mongo import collect_leaked_driver_sockets, mongo_settings, raw_database
from tests.flow import authorize
from tests.processes import GatewayProcess, gateway_settings, poll_until
from tests.support import assert_envelope, make_config

RETRY_S = 0.5  # initialize_store's pause between attempts while MongoDB is down
TIMEOUT_S = 20.0
ACCOUNT_KEYS = [("ownerId", ASCENDING), ("platform", ASCENDING),
                ("platformAccountId", ASCENDING)]


def index_names(uri: str, name: str) -> dict[str, set[str]]:
    with raw_database(uri, name) as database:
        return {
            collection: set(database[collection].index_information())
            for collection in (ACCOUNTS_COLLECTION, PENDING_COLLECTION)
        }


@contextlib.asynccontextmanager
async def starting(store: Store) -> AsyncIterator[asyncio.Task[bool]]:
    """``initialize_store`` in the background, as ``serve`` runs it."""
    task = asyncio.create_task(initialize_store(store, retry_seconds=RETRY_S))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def readyz(http_client: Any, base_url: str) -> Any:
    return await http_client.fetch(f"{base_url}/readyz", raise_error=False)


def assert_not_ready(response: Any) -> dict[str, Any]:
    body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["dependency"] == "mongodb", body
    return body


@pytest.fixture
def gateway_app(io_loop, mongo_server, mongo_database_name, mongo_driver):
    app = make_app(make_config(**mongo_settings(mongo_server.uri, mongo_database_name,
                                                mongo_driver)))
    yield app
    io_loop.run_sync(app.settings["gateway"].store.close)


class TestNormalStart:
    @pytest.fixture
    def app(self, gateway_app):
        return gateway_app

    @pytest.mark.gen_test(timeout=30)
    async def test_not_ready_until_the_indexes_exist_then_ready(self, http_client, base_url,
                                                                app):
        store = app.settings["gateway"].store
        # MongoDB answers, but start-up has not created the indexes yet.
        body = assert_not_ready(await readyz(http_client, base_url))
        assert "indexes not created yet" in body["technicalMessage"], body
        # Nor is store traffic served before them (a write racing the index creation).
        assert_not_ready(await authorize(http_client, base_url))

        async with starting(store) as init:
            assert await asyncio.wait_for(init, TIMEOUT_S) is True
        ready = await readyz(http_client, base_url)
        assert ready.code == 200, ready.body
        assert json.loads(ready.body) == {"status": "ready"}
        assert (await authorize(http_client, base_url)).code == 200


# -- an index that can never be created ------------------------------------------------


def conflicting_key_index(database: Any) -> None:
    """Same name as the gateway's unique index, other keys (IndexKeySpecsConflict)."""
    database[ACCOUNTS_COLLECTION].create_index([("ownerId", ASCENDING)], name=ACCOUNT_KEY_INDEX)


def same_keys_other_name(database: Any) -> None:
    """The gateway's keys under another name (IndexOptionsConflict)."""
    database[ACCOUNTS_COLLECTION].create_index(ACCOUNT_KEYS, unique=True, name="legacy_unique")


def duplicate_accounts(database: Any) -> None:
    """Two documents for one (owner, platform, open_id): the unique index cannot hold."""
    key = {"ownerId": "dup-owner", "platform": "tiktok", "platformAccountId": "dup-open-id"}
    database[ACCOUNTS_COLLECTION].insert_many([dict(key), dict(key)])


@pytest.mark.parametrize(
    ("prepare", "code"),
    [
        (conflicting_key_index, "IndexKeySpecsConflict, code 86"),
        (same_keys_other_name, "IndexOptionsConflict, code 85"),
        (duplicate_accounts, "DuplicateKey, code 11000"),
    ],
    ids=["same-name-other-keys", "same-keys-other-name", "duplicate-documents"],
)
class TestIndexThatCannotBeCreated:
    @pytest.fixture
    def app(self, gateway_app, mongo_server, mongo_database_name,
            prepare: Callable[[Any], None]):
        with raw_database(mongo_server.uri, mongo_database_name) as database:
            prepare(database)
        return gateway_app

    @pytest.mark.gen_test(timeout=30)
    async def test_logged_as_an_error_and_readyz_stays_503(
        self, http_client, base_url, app, mongo_server, mongo_database_name, caplog, code
    ):
        caplog.set_level(logging.INFO, logger="gateway")
        async with starting(app.settings["gateway"].store) as init:
            # Not retried: it gives up at once, where a retry loop would never end.
            assert await asyncio.wait_for(init, TIMEOUT_S) is False
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        named = [m for m in errors if ACCOUNT_KEY_INDEX in m]
        assert len(named) == 1, errors
        assert code in named[0] and ACCOUNTS_COLLECTION in named[0], named
        assert "store ready" not in caplog.text

        body = assert_not_ready(await readyz(http_client, base_url))
        technical = body["technicalMessage"]
        assert ACCOUNT_KEY_INDEX in technical and code in technical, body
        # Nothing of the connection string nor of the stored documents.
        text = json.dumps(body)
        for secret in (mongo_server.uri, "mongodb://", "dup-owner", "dup-open-id"):
            assert secret not in text, body
        assert_not_ready(await authorize(http_client, base_url))
        # Each index is tried: those that can be created are.
        names = index_names(mongo_server.uri, mongo_database_name)
        assert PLATFORM_ACCOUNT_INDEX in names[ACCOUNTS_COLLECTION]
        assert PENDING_TTL_INDEX in names[PENDING_COLLECTION]


class TestEveryIndexIsReported:
    @pytest.fixture
    def app(self, gateway_app, mongo_server, mongo_database_name):
        with raw_database(mongo_server.uri, mongo_database_name) as database:
            duplicate_accounts(database)
            database[PENDING_COLLECTION].create_index(
                [("expiresAt", ASCENDING)], expireAfterSeconds=3600, name=PENDING_TTL_INDEX
            )
        return gateway_app

    @pytest.mark.gen_test(timeout=30)
    async def test_two_broken_indexes_two_errors(self, http_client, base_url, app, caplog):
        caplog.set_level(logging.INFO, logger="gateway")
        async with starting(app.settings["gateway"].store) as init:
            assert await asyncio.wait_for(init, TIMEOUT_S) is False
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(ACCOUNT_KEY_INDEX in m and "code 11000" in m for m in errors), errors
        assert any(PENDING_TTL_INDEX in m and "code 86" in m for m in errors), errors
        technical = assert_not_ready(await readyz(http_client, base_url))["technicalMessage"]
        assert ACCOUNT_KEY_INDEX in technical and PENDING_TTL_INDEX in technical


# -- MongoDB down at start-up ------------------------------------------------------------


class TestMongoDBDownAtStart:
    @pytest.fixture
    def app(self, io_loop, mongo_process, mongo_database_name, mongo_driver):
        mongo_process.stop()
        app = make_app(make_config(**mongo_settings(mongo_process.uri, mongo_database_name,
                                                    mongo_driver), MONGODB_TIMEOUT_MS="300"))
        yield app
        io_loop.run_sync(app.settings["gateway"].store.close)
        if mongo_driver == "pymongo":
            collect_leaked_driver_sockets()

    @pytest.mark.gen_test(timeout=60)
    async def test_503_while_down_then_200_once_the_retry_created_the_indexes(
        self, http_client, base_url, app, mongo_process, mongo_database_name, caplog
    ):
        caplog.set_level(logging.INFO, logger="gateway")
        async with starting(app.settings["gateway"].store) as init:
            await poll_until(lambda: asyncio.sleep(0, caplog.text),
                             lambda text: "store not reachable yet" in text,
                             timeout=TIMEOUT_S, what="a failed first attempt")
            assert_not_ready(await readyz(http_client, base_url))
            assert not init.done()

            mongo_process.start()
            ready = await poll_until(lambda: readyz(http_client, base_url),
                                     lambda r: r.code == 200, timeout=TIMEOUT_S,
                                     interval=0.05, what="/readyz 200")
            # Ready only with every index in place, not as soon as MongoDB answers.
            names = index_names(mongo_process.uri, mongo_database_name)
            assert json.loads(ready.body) == {"status": "ready"}
            assert await asyncio.wait_for(init, TIMEOUT_S) is True
        assert {ACCOUNT_KEY_INDEX, PLATFORM_ACCOUNT_INDEX} <= names[ACCOUNTS_COLLECTION]
        assert PENDING_TTL_INDEX in names[PENDING_COLLECTION]
        # (gateway.access logs each 503 as an ERROR: those are the requests, not the start.)
        assert not [r for r in caplog.records if r.name == "gateway" and r.levelno >= logging.ERROR]
        assert (await authorize(http_client, base_url)).code == 200


# -- python server.py ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_the_server_logs_the_index_and_stays_not_ready(
    tmp_path, mongo_server, mongo_database_name, sandbox, client
):
    with raw_database(mongo_server.uri, mongo_database_name) as database:
        duplicate_accounts(database)
    settings = gateway_settings(mongo_server.uri, mongo_database_name, sandbox.url)
    with GatewayProcess(tmp_path / "gateway.log", **settings) as gateway:
        await gateway.wait_healthy(client)

        async def log_text() -> str:
            return gateway.log_path.read_text(errors="replace")

        log = await poll_until(log_text, lambda text: "will not be" in text,
                               timeout=TIMEOUT_S, what="the start-up gave up")
        [line] = [line for line in log.splitlines() if ACCOUNT_KEY_INDEX in line]
        assert " ERROR " in line and "DuplicateKey, code 11000" in line, line
        body = assert_not_ready(await gateway.get(client, "/readyz"))
        assert ACCOUNT_KEY_INDEX in body["technicalMessage"]
        assert gateway.running, gateway.log_tail()
        assert gateway.stop() == 0, gateway.log_tail()
        assert "Traceback" not in gateway.log_tail()

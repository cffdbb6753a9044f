"""Whole flows with the MongoDB store over the wire (SecantusDB), on both drivers.

The gateway is the standalone application (``make_app`` with ``MONGODB_URI``); the
test calls ``store.initialize()`` as ``python server.py`` does at start-up. What
landed in MongoDB is read back with a separate (synchronous PyMongo) client, so the
assertions are about the stored documents, not about what the store says of them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from tornado.httpclient import AsyncHTTPClient

from server import make_app
from storage.mongodb import ACCOUNTS_COLLECTION, PENDING_COLLECTION
from tests.fixtures_mongo import mongo_settings, raw_database
from tests.flow import (
    assert_one_state_connected_once,
    connect,
    consent,
    consented,
    follow,
    location,
    sandbox_settings,
    start,
)
from tests.support import (
    CONNECTED,
    initialized_store,
    jti_of,
    make_config,
)

OWNER = "user-123"
ACCOUNT_FIELDS = {
    "ownerId",
    "platform",
    "platformAccountId",
    "unionId",
    "displayName",
    "avatarUrl",
    "scopes",
    "status",
    "accessToken",
    "refreshToken",
    "accessTokenExpiresAt",
    "refreshTokenExpiresAt",
    "createdAt",
    "updatedAt",
}

gen_test = pytest.mark.gen_test(timeout=30)


@pytest.fixture
def app(io_loop, sandbox, mongo_server, mongo_database_name, mongo_driver):
    app = make_app(
        make_config(
            TIKTOK_REQUEST_TIMEOUT_SECONDS="2",
            **mongo_settings(mongo_server.uri, mongo_database_name, mongo_driver),
            **sandbox_settings(sandbox.url),
        )
    )
    yield app
    # Before mongo_driver's teardown, which collects what a closed pymongo client leaks.
    io_loop.run_sync(app.settings["gateway"].store.close)


@pytest.fixture
def raw_db(mongo_server, mongo_database_name) -> Iterator[Any]:
    """The gateway's database through a client of its own."""
    with raw_database(mongo_server.uri, mongo_database_name) as database:
        yield database


@pytest.fixture
def wide_client(io_loop, http_server) -> Iterator[AsyncHTTPClient]:
    """An HTTP client that really sends 20 requests at once (the default queues after 10).

    Requests ``http_server``: pytest-tornado starts the app's server only for a client.
    """
    client = AsyncHTTPClient(force_instance=True, max_clients=50)
    yield client
    client.close()


@gen_test
async def test_flow_stores_encrypted_tokens_and_completes_state(
    http_client, base_url, app, sandbox, raw_db
):
    store = await initialized_store(app)
    started = await start(
        http_client, base_url, scopes=["user.info.basic", "user.info.profile"]
    )
    jti = jti_of(started["state"])
    pending = raw_db[PENDING_COLLECTION].find_one({"_id": jti})
    assert pending is not None and pending["status"] == "pending"
    assert pending["ownerId"] == OWNER and pending["codeVerifier"]

    callback_url = await consent(http_client, base_url, started["authorizationUrl"])
    response = await follow(http_client, callback_url)
    assert location(response) == CONNECTED

    [doc] = list(raw_db[ACCOUNTS_COLLECTION].find({}))
    assert ACCOUNT_FIELDS <= doc.keys(), ACCOUNT_FIELDS - doc.keys()
    user = sandbox.users[0]
    assert doc["ownerId"] == OWNER
    assert doc["platform"] == "tiktok"
    assert doc["platformAccountId"] == user.open_id
    assert doc["unionId"] == user.union_id
    assert doc["displayName"] == user.display_name
    assert doc["avatarUrl"] == user.avatar_url
    assert doc["scopes"] == ["user.info.basic", "user.info.profile"]
    assert doc["status"] == "connected"
    for field in ("accessTokenExpiresAt", "refreshTokenExpiresAt", "createdAt", "updatedAt"):
        assert isinstance(doc[field], datetime), field
    assert doc["createdAt"] < doc["accessTokenExpiresAt"] < doc["refreshTokenExpiresAt"]

    # The real tokens: decrypted by the store, and genuine (the sandbox accepts them).
    tokens = await store.get_account_tokens(str(doc["_id"]))
    assert tokens is not None
    granted, token_user = sandbox.state.check_access(tokens.access_token)
    assert token_user.open_id == user.open_id and "user.info.basic" in granted
    assert tokens.refresh_token.startswith("rft.")
    # ...appear nowhere in the bytes MongoDB holds, whole or without their prefix.
    raw = (
        raw_db.get_collection(
            ACCOUNTS_COLLECTION, codec_options=CodecOptions(document_class=RawBSONDocument)
        )
        .find_one({"_id": doc["_id"]})
        .raw
    )
    for secret in (tokens.access_token, tokens.refresh_token):
        assert secret.encode() not in raw
        assert secret.split(".", 1)[1].encode() not in raw
    for field in ("accessToken", "refreshToken"):
        assert isinstance(doc[field], str) and doc[field].startswith("v1:"), field

    completed = raw_db[PENDING_COLLECTION].find_one({"_id": jti})
    assert completed["status"] == "completed"
    assert "codeVerifier" not in completed
    assert completed["finalRedirect"] == CONNECTED


@gen_test
async def test_repeated_callback_answers_same_redirect(http_client, base_url, app, sandbox):
    await initialized_store(app)
    callback_url = await consented(http_client, base_url)
    first = await follow(http_client, callback_url)
    second = await follow(http_client, callback_url)
    assert location(first) == location(second) == CONNECTED
    assert sandbox.stats["token"] == 1
    assert sandbox.stats["userinfo"] == 1


@gen_test
async def test_concurrent_callbacks_exchange_the_code_once(
    wide_client, base_url, app, sandbox, raw_db
):
    await initialized_store(app)
    callback_url = await consented(wide_client, base_url)
    responses = await asyncio.gather(*(follow(wide_client, callback_url) for _ in range(20)))
    assert_one_state_connected_once(responses, CONNECTED)
    assert sandbox.stats["token"] == 1
    assert raw_db[ACCOUNTS_COLLECTION].count_documents({}) == 1


@gen_test
async def test_reconnect_updates_the_same_document(
    http_client, base_url, app, sandbox, raw_db
):
    store = await initialized_store(app)
    accounts = raw_db[ACCOUNTS_COLLECTION]
    await connect(http_client, base_url, scopes=["user.info.basic", "user.info.profile"])
    [first] = list(accounts.find({}))
    first_tokens = await store.get_account_tokens(str(first["_id"]))

    await connect(http_client, base_url, scopes=["user.info.basic", "user.info.profile"])
    [second] = list(accounts.find({}))
    second_tokens = await store.get_account_tokens(str(second["_id"]))

    assert second["_id"] == first["_id"]
    assert second["createdAt"] == first["createdAt"]
    assert second["updatedAt"] > first["updatedAt"]
    assert sandbox.stats["token"] == 2
    # The new grant replaced the old one, still as ciphertext.
    assert second["accessToken"] != first["accessToken"]
    assert second_tokens.access_token != first_tokens.access_token
    sandbox.state.check_access(second_tokens.access_token)


@gen_test
async def test_readyz_with_mongodb(http_client, base_url, app):
    await initialized_store(app)
    response = await http_client.fetch(f"{base_url}/readyz", raise_error=False)
    assert response.code == 200, response.body
    assert json.loads(response.body) == {"status": "ready"}

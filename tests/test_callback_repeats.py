"""The callback repeated (a double click, a reload) and the callback of an expired state,
over real HTTP against the live sandbox, on the memory store and on MongoDB (SecantusDB,
both drivers).

A repeat of the same callback URL waits for the first one's outcome and answers the
same; another callback of a claimed state is refused; a state past its expiry is
``400 VALIDATION_ERROR`` whoever notices it first.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from tornado.httpclient import HTTPResponse

from core.errors import InvalidState
from server import make_app
from services.connect import STILL_CONNECTING, CallbackParams
from storage.base import PendingAuthorization, PendingStatus, Store
from storage.memory import MemoryStore
from storage.mongodb import MongoStore, connect_mongo
from tests.fixtures_mongo import mongo_settings
from tests.flow import consent, follow, location, sandbox_settings, start
from tests.support import (
    CONNECTED,
    PRODUCT_REDIRECT,
    REDIRECT_URI,
    STATE_SECRET,
    assert_envelope,
    forged_state,
    initialized_store,
    jti_of,
    make_config,
    query_of,
)

OWNER = "user-123"
# Long enough for the test to send its repeat while TikTok holds the first one,
# short of the gateway's TikTok timeout below.
HELD_SECONDS = 1.0

gen_test = pytest.mark.gen_test(timeout=30)


class ProfileBug:
    """A store with a bug (not a GatewayError) once the tokens are saved."""

    async def save_account_profile(self, account_id: str, profile: Any, *, now: Any) -> Any:
        raise RuntimeError("a bug below the service")


class BuggyMemoryStore(ProfileBug, MemoryStore):
    pass


class BuggyMongoStore(ProfileBug, MongoStore):
    pass


@pytest.fixture
def profile_bug() -> bool:
    return False


@pytest.fixture
def gateway_settings(sandbox) -> dict[str, str]:
    return sandbox_settings(sandbox.url) | {"TIKTOK_REQUEST_TIMEOUT_SECONDS": "3"}


@pytest.fixture
def app(io_loop, request, backend, profile_bug, gateway_settings):
    settings = dict(gateway_settings)
    if backend != "memory":
        settings |= mongo_settings(
            request.getfixturevalue("mongo_server").uri,
            request.getfixturevalue("mongo_database_name"),
            backend,
        )
    config = make_config(**settings)
    store: Store | None = None
    if profile_bug and backend == "memory":
        store = BuggyMemoryStore(config.cipher())
    elif profile_bug:
        client, database = connect_mongo(
            config.mongodb_uri, config.mongodb_database, driver=backend
        )
        store = BuggyMongoStore(database, config.cipher(), client=client)
    app = make_app(config, store=store)
    yield app
    io_loop.run_sync(app.settings["gateway"].store.close)


async def started_callback(http_client, base_url) -> tuple[str, str]:
    """A started authorization and the callback URL TikTok sends the browser to."""
    started = await start(http_client, base_url)
    return started["state"], await consent(http_client, base_url, started["authorizationUrl"])


async def while_held(sandbox, http_client, url: str) -> tuple[HTTPResponse, HTTPResponse]:
    """The callback, then the same URL again once the first one is at TikTok's token
    endpoint (its state claimed, TikTok holding the answer): a double click."""
    first = asyncio.ensure_future(follow(http_client, url))
    while sandbox.stats["token"] == 0 and not first.done():
        await asyncio.sleep(0.01)
    assert not first.done(), first.result().body
    second = await follow(http_client, url)
    return await first, second


def same_envelope(first: HTTPResponse, second: HTTPResponse) -> None:
    a, b = json.loads(first.body), json.loads(second.body)
    assert second.code == first.code
    for key in ("error", "message", "technicalMessage", "details"):
        assert a.get(key) == b.get(key), key
    assert second.headers.get("Retry-After") == first.headers.get("Retry-After")


def forged_code(url: str) -> str:
    return url.replace("code=", "code=X", 1)


# -- deliverable 1: the same callback twice ----------------------------------------


@gen_test
async def test_double_click_answers_both_with_the_redirect(http_client, base_url, app, sandbox):
    store = await initialized_store(app)
    state, url = await started_callback(http_client, base_url)
    sandbox.add_fault("token", status=200, delay=HELD_SECONDS)
    first, second = await while_held(sandbox, http_client, url)
    assert location(first) == location(second) == CONNECTED
    assert sandbox.stats["token"] == 1 and sandbox.stats["userinfo"] == 1
    pending = await store.get_pending(jti_of(state))
    assert pending is not None and pending.status is PendingStatus.COMPLETED
    assert len(await store.list_accounts(OWNER)) == 1


@gen_test
async def test_another_code_while_in_progress_is_refused_at_once(
    http_client, base_url, app, sandbox
):
    await initialized_store(app)
    _, url = await started_callback(http_client, base_url)
    sandbox.add_fault("token", status=200, delay=HELD_SECONDS)
    first = asyncio.ensure_future(follow(http_client, url))
    while sandbox.stats["token"] == 0:
        await asyncio.sleep(0.01)
    forged = await follow(http_client, forged_code(url))
    # Answered while the first one is still held at TikTok: it did not wait.
    assert not first.done()
    body = assert_envelope(forged, 400, "CONFLICT")
    assert body["technicalMessage"] == "state cannot be used: in_progress with another code"
    assert location(await first) == CONNECTED
    assert sandbox.stats["token"] == 1


@gen_test
async def test_double_click_after_a_failure_answers_the_same_error(
    http_client, base_url, app, sandbox
):
    store = await initialized_store(app)
    state, url = await started_callback(http_client, base_url)
    sandbox.add_fault("token", status=429, retry_after=7, delay=HELD_SECONDS)
    first, second = await while_held(sandbox, http_client, url)
    body = assert_envelope(first, 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["dependency"] == "tiktok"
    assert first.headers["Retry-After"] == "7"
    same_envelope(first, second)
    # Later, a reload: the same answer again, and TikTok is not asked again.
    same_envelope(first, await follow(http_client, url))
    assert sandbox.stats["token"] == 1
    pending = await store.get_pending(jti_of(state))
    assert pending is not None and pending.status is PendingStatus.FAILED
    assert pending.failure is not None and pending.failure.code == "SERVICE_UNAVAILABLE"
    # Another code for the failed state is still refused.
    assert_envelope(await follow(http_client, forged_code(url)), 400, "CONFLICT")


@gen_test
async def test_repeat_after_tiktok_refused_the_code_answers_the_same(
    http_client, base_url, app, sandbox
):
    await initialized_store(app)
    _, url = await started_callback(http_client, base_url)
    sandbox.add_fault(
        "token",
        status=400,
        body=json.dumps({"error": "invalid_grant", "error_description": "Code expired."}),
    )
    first = await follow(http_client, url)
    body = assert_envelope(first, 400, "VALIDATION_ERROR")
    assert body["details"]["providerError"] == "invalid_grant"
    same_envelope(first, await follow(http_client, url))
    assert sandbox.stats["token"] == 1


class TestRepeatOutlastingTheBudget:
    @pytest.fixture
    def gateway_settings(self, sandbox):
        return sandbox_settings(sandbox.url) | {
            "TIKTOK_REQUEST_TIMEOUT_SECONDS": "5",
            "TIKTOK_CALLBACK_BUDGET_SECONDS": "0.5",
        }

    @gen_test
    async def test_repeat_gives_up_with_503_then_gets_the_redirect(
        self, http_client, base_url, app, sandbox
    ):
        await initialized_store(app)
        _, url = await started_callback(http_client, base_url)
        # TikTok holds the first one well past the repeat's 0.5 s budget.
        sandbox.add_fault("token", status=200, delay=3.0)
        first, second = await while_held(sandbox, http_client, url)
        body = assert_envelope(second, 503, "SERVICE_UNAVAILABLE")
        assert body["message"] == STILL_CONNECTING
        assert location(first) == CONNECTED
        # Reloaded once the first one is done: its redirect.
        assert location(await follow(http_client, url)) == CONNECTED
        assert sandbox.stats["token"] == 1


class TestBugAfterTheClaim:
    @pytest.fixture
    def profile_bug(self) -> bool:
        return True

    @gen_test
    async def test_bug_marks_the_state_failed_and_repeats_get_the_same_500(
        self, http_client, base_url, app, sandbox
    ):
        store = await initialized_store(app)
        state, url = await started_callback(http_client, base_url)
        sandbox.add_fault("token", status=200, delay=HELD_SECONDS)
        first, second = await while_held(sandbox, http_client, url)
        body = assert_envelope(first, 500, "INTERNAL_SERVER_ERROR")
        assert "technicalMessage" not in body and "details" not in body
        assert "a bug below" not in first.body.decode()
        same_envelope(first, second)
        same_envelope(first, await follow(http_client, url))
        pending = await store.get_pending(jti_of(state))
        assert pending is not None and pending.status is PendingStatus.FAILED
        assert sandbox.stats["token"] == 1


@gen_test
async def test_cancelled_callback_marks_the_state_failed(http_client, base_url, app, sandbox):
    store = await initialized_store(app)
    state, url = await started_callback(http_client, base_url)
    query = query_of(url)
    params = CallbackParams(
        state=state,
        code=query["code"][0],
        error=None,
        error_description=None,
        granted_scopes=query["scopes"][0],
    )
    sandbox.add_fault("token", status=200, delay=HELD_SECONDS)
    # E.g. a host application cancelling the request's task at shutdown.
    task = asyncio.ensure_future(app.settings["gateway"].service.complete(params))
    while sandbox.stats["token"] == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pending = await store.get_pending(jti_of(state))
    assert pending is not None and pending.status is PendingStatus.FAILED
    # The browser's repeat is not left waiting for an outcome that never comes.
    assert_envelope(await follow(http_client, url), 503, "SERVICE_UNAVAILABLE")


# -- deliverable 2: an expired state says so ------------------------------------------


@gen_test
@pytest.mark.parametrize(
    ("state_exp", "record_exp"),
    [(-10, -10), (600, -10), (-10, 600)],
    ids=["both-expired", "record-expired", "jwt-expired"],
)
async def test_expired_state_is_validation_error(
    http_client, base_url, app, state_exp, record_exp
):
    store = await initialized_store(app)
    now = datetime.now(UTC).replace(microsecond=0)
    jti = f"expiring-{time.monotonic_ns()}"
    await store.save_pending(
        PendingAuthorization(
            jti=jti,
            owner_id=OWNER,
            redirect_uri=PRODUCT_REDIRECT,
            scopes=["user.info.basic"],
            code_verifier="v" * 64,
            created_at=now - timedelta(seconds=610),
            expires_at=now + timedelta(seconds=record_exp),
        )
    )
    state = forged_state(
        jti=jti,
        iat=int(now.timestamp()) - 610,
        exp=int(now.timestamp()) + state_exp,
    )
    response = await follow(
        http_client, f"{base_url}/oauth/tiktok/callback?code=abc&state={state}"
    )
    body = assert_envelope(response, 400, "VALIDATION_ERROR")
    assert body["message"] == InvalidState.default_message
    assert body["technicalMessage"] == "state expired"


@gen_test
async def test_repeat_of_a_completed_callback_after_expiry_is_expired(
    http_client, base_url, app, sandbox
):
    """The state's expiry is one moment for every use, a completed one included."""
    await initialized_store(app)
    state, url = await started_callback(http_client, base_url)
    assert location(await follow(http_client, url)) == CONNECTED
    claims = jwt.decode(state, STATE_SECRET, algorithms=["HS256"], audience=REDIRECT_URI)
    now = int(time.time())
    expired = forged_state(**(claims | {"iat": now - 610, "exp": now - 10}))
    query = urlencode({"code": query_of(url)["code"][0], "state": expired})
    response = await follow(http_client, f"{base_url}/oauth/tiktok/callback?{query}")
    body = assert_envelope(response, 400, "VALIDATION_ERROR")
    assert body["message"] == InvalidState.default_message
    assert sandbox.stats["token"] == 1

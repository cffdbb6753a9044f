"""A connection never fails because of the profile, and bursts queue for connections.

Over real HTTP against the live sandbox, on the memory store and on MongoDB
(SecantusDB, both drivers): TikTok answering the profile call with 429, 5xx or not
in time once the tokens are stored still connects (302), the account shows
``profileStatus: "pending"``, and one round of the background profile filler loads
it. A failure before the tokens are stored is still a 503. The store's queue of
pending profiles (oldest first, one holder at a time, backoff) is tested on every
backend, and its MongoDB query is served by its index. Calls beyond
``TIKTOK_MAX_CONNECTIONS`` wait within the callback's budget instead of failing.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
import tornado.web
from bson import ObjectId
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from sandbox import Sandbox
from server import make_app
from services.profile_filler import ProfileFiller
from storage.base import PROFILE_FIRST_FILL_DELAY, Store
from storage.mongodb import PROFILE_FILL_INDEX
from tests.fixtures_mongo import open_mongo_store
from tests.flow import (
    consented,
    follow,
    live_sandbox,
    location,
    sandbox_clients,
    sandbox_settings,
)
from tests.processes import gateway_settings, poll_until, started_gateway
from tests.support import (
    CONNECTED,
    assert_envelope,
    bearer,
    fake_grant,
    make_config,
    scrape,
    utc_now,
)

OWNER = "user-123"
SCOPES = ["user.info.basic", "user.info.profile"]
MINUTE = timedelta(minutes=1)

gen_test = pytest.mark.gen_test(timeout=60)


@pytest.fixture
def gateway_settings_(sandbox) -> dict[str, str]:
    return sandbox_settings(sandbox.url) | {
        "TIKTOK_REQUEST_TIMEOUT_SECONDS": "1",
        "TIKTOK_CALLBACK_BUDGET_SECONDS": "2.8",
    }


@pytest.fixture
def app(io_loop, request, backend, gateway_settings_):
    settings = dict(gateway_settings_)
    if backend != "memory":
        settings |= {
            "MONGODB_URI": request.getfixturevalue("mongo_server").uri,
            "MONGODB_DATABASE": request.getfixturevalue("mongo_database_name"),
            "MONGODB_DRIVER": backend,
        }
    app = make_app(make_config(**settings))
    yield app
    io_loop.run_sync(app.settings["gateway"].store.close)


async def ready_store(app: tornado.web.Application) -> Store:
    store: Store = app.settings["gateway"].store
    await store.initialize()  # what ``python server.py`` runs at start-up
    return store


def filler_of(app: tornado.web.Application, **kwargs: Any) -> ProfileFiller:
    gateway = app.settings["gateway"]
    return ProfileFiller(store=gateway.store, tiktok=gateway.tiktok, metrics=gateway.metrics,
                         **kwargs)


async def callback_url(http_client: AsyncHTTPClient, base_url: str, owner: str = OWNER) -> str:
    return await consented(http_client, base_url, owner=owner, scopes=SCOPES)


async def accounts_of(
    http_client: AsyncHTTPClient, base_url: str, owner: str = OWNER
) -> list[dict[str, Any]]:
    response = await http_client.fetch(f"{base_url}/accounts", headers=bearer(owner))
    return list(json.loads(response.body)["accounts"])


# -- the callback connects whatever TikTok answers the profile call -------------------


@gen_test
@pytest.mark.parametrize(
    ("fault", "calls"),
    [
        ({"status": 429}, 3),
        ({"status": 500}, 3),
        ({"status": 503}, 3),
        # Each attempt times out at 1 s; the 2.8 s budget leaves room for two.
        ({"status": 200, "delay": 2.0}, 2),
    ],
    ids=["429", "500", "503", "timeout"],
)
async def test_a_busy_profile_call_still_connects_and_the_filler_loads_it(
    http_client, base_url, app, sandbox, fault, calls
):
    await ready_store(app)
    url = await callback_url(http_client, base_url)
    sandbox.add_fault("userinfo", count=calls, **fault)

    response = await follow(http_client, url)
    assert location(response) == CONNECTED
    assert sandbox.stats["token"] == 1 and sandbox.stats["userinfo"] == calls
    [account] = await accounts_of(http_client, base_url)
    assert account["status"] == "connected"
    assert account["profileStatus"] == "pending"
    assert account["displayName"] is None and account["username"] is None
    # The same callback again answers the same redirect, without TikTok.
    assert location(await follow(http_client, url)) == CONNECTED
    assert sandbox.stats["userinfo"] == calls

    filled = await filler_of(app).run_once()
    assert filled.outcomes == {"filled": 1} and filled.pending == 0
    assert sandbox.stats["userinfo"] == calls + 1
    [account] = await accounts_of(http_client, base_url)
    assert account["profileStatus"] == "complete"
    user = sandbox.users[0]
    assert (account["displayName"], account["username"]) == (user.display_name, user.username)
    # Nothing left: the next round asks TikTok nothing.
    assert (await filler_of(app).run_once()).outcomes == {}
    assert sandbox.stats["userinfo"] == calls + 1

    metrics = await scrape(http_client, base_url)
    # Both the callback and its repeat answered connected.
    assert metrics.value("tiktok_gateway_callbacks_total", outcome="connected") == 2
    assert metrics.value("tiktok_gateway_callbacks_total", outcome="SERVICE_UNAVAILABLE") == 0
    assert metrics.value("tiktok_gateway_profiles_left_pending_total") == 1
    assert metrics.value("tiktok_gateway_profile_fills_total", outcome="filled") == 1
    assert metrics.value("tiktok_gateway_profiles_pending") == 0


@gen_test
async def test_a_profile_loaded_by_the_callback_is_complete(http_client, base_url, app, sandbox):
    await ready_store(app)
    assert location(await follow(http_client, await callback_url(http_client, base_url))) \
        == CONNECTED
    [account] = await accounts_of(http_client, base_url)
    assert account["profileStatus"] == "complete"
    assert (await filler_of(app).run_once()).outcomes == {}
    assert sandbox.stats["userinfo"] == 1


@gen_test
@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 429}], ids=["500", "429"])
async def test_a_failure_before_the_tokens_are_stored_is_still_503(
    http_client, base_url, app, sandbox, fault
):
    await ready_store(app)
    url = await callback_url(http_client, base_url)
    sandbox.add_fault("token", **fault)
    body = assert_envelope(await follow(http_client, url), 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["endpoint"] == "token"
    assert await accounts_of(http_client, base_url) == []
    assert sandbox.stats["userinfo"] == 0


@gen_test
@pytest.mark.parametrize(
    ("fault", "outcome", "calls"),
    [
        # TikTok still busy for the filler: one fetch, its two quick retries.
        ({"status": 429, "count": 3}, "unavailable", 3),
        # TikTok refuses the token: never retried at once.
        ({"status": 401}, "refused", 1),
    ],
    ids=["busy", "refused"],
)
async def test_the_filler_backs_off_and_comes_back(
    http_client, base_url, app, sandbox, fault, outcome, calls
):
    store = await ready_store(app)
    url = await callback_url(http_client, base_url)
    sandbox.add_fault("userinfo", status=500, count=3)
    assert location(await follow(http_client, url)) == CONNECTED
    asked = sandbox.stats["userinfo"]

    # The filler's attempt fails: the account waits.
    sandbox.add_fault("userinfo", **fault)
    now = utc_now() + timedelta(seconds=1)  # past the callback's due time, in ms too
    failed = await filler_of(app).run_once(now)
    assert failed.outcomes == {outcome: 1} and failed.pending == 1
    asked_by_filler = sandbox.stats["userinfo"] - asked
    assert asked_by_filler == calls
    sandbox.clear_faults()
    # Not due again before its wait (30 s, jittered), in any process.
    assert (await filler_of(app).run_once(now + timedelta(seconds=20))).outcomes == {}
    assert sandbox.stats["userinfo"] - asked == asked_by_filler
    [account] = await accounts_of(http_client, base_url)
    assert account["profileStatus"] == "pending"

    later = now + MINUTE
    assert (await filler_of(app).run_once(later)).outcomes == {"filled": 1}
    [account] = await accounts_of(http_client, base_url)
    assert account["profileStatus"] == "complete"
    assert await store.count_pending_profiles() == 0


@gen_test
async def test_a_reconnect_keeps_the_earlier_profile_until_the_new_one_is_loaded(
    http_client, base_url, app, sandbox
):
    await ready_store(app)
    assert location(await follow(http_client, await callback_url(http_client, base_url))) \
        == CONNECTED
    [before] = await accounts_of(http_client, base_url)
    assert before["profileStatus"] == "complete" and before["displayName"]

    url = await callback_url(http_client, base_url)
    sandbox.add_fault("userinfo", status=429, count=3)
    assert location(await follow(http_client, url)) == CONNECTED
    [account] = await accounts_of(http_client, base_url)
    assert account["id"] == before["id"] and account["profileStatus"] == "pending"
    assert account["displayName"] == before["displayName"]
    assert (await filler_of(app).run_once()).outcomes == {"filled": 1}
    [account] = await accounts_of(http_client, base_url)
    assert account["profileStatus"] == "complete"


@gen_test
async def test_the_filler_paces_its_calls(http_client, base_url, app, sandbox):
    await ready_store(app)
    for owner in ("owner-a", "owner-b", "owner-c"):
        url = await callback_url(http_client, base_url, owner)
        sandbox.add_fault("userinfo", status=500, count=3)
        assert location(await follow(http_client, url)) == CONNECTED
    clock = [1000.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    filler = filler_of(app, max_per_minute=60, concurrency=1, monotonic=lambda: clock[0],
                       sleep=sleep)
    assert (await filler.run_once()).outcomes == {"filled": 3}
    # 60 a minute: one claim a second. The first went at once; the second and third
    # accounts, then the look that found nothing left, each waited their second.
    assert waits == [1.0, 1.0, 1.0]


@gen_test
async def test_two_fillers_never_fetch_one_profile_twice(http_client, base_url, app, sandbox):
    await ready_store(app)
    owners = [f"owner-{n}" for n in range(4)]
    for owner in owners:
        url = await callback_url(http_client, base_url, owner)
        sandbox.add_fault("userinfo", status=503, count=3)
        assert location(await follow(http_client, url)) == CONNECTED
    asked = sandbox.stats["userinfo"]

    # TikTok slow: both fillers' rounds overlap for the whole time.
    sandbox.latency = 0.2
    rounds = await asyncio.gather(filler_of(app, holder="one", concurrency=1).run_once(),
                                  filler_of(app, holder="two", concurrency=1).run_once())
    assert sum(r.outcomes["filled"] for r in rounds) == len(owners)
    assert all(r.outcomes["filled"] for r in rounds)  # both took part
    assert sandbox.stats["userinfo"] - asked == len(owners)  # each profile fetched once
    for owner in owners:
        [account] = await accounts_of(http_client, base_url, owner)
        assert account["profileStatus"] == "complete"


@gen_test
async def test_a_refused_token_keeps_the_503_and_the_profile_pending(
    http_client, base_url, app, sandbox
):
    await ready_store(app)
    url = await callback_url(http_client, base_url)
    sandbox.add_fault("userinfo", status=401)
    body = assert_envelope(await follow(http_client, url), 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["providerError"] == "access_token_invalid"
    [account] = await accounts_of(http_client, base_url)
    assert account["status"] == "connected" and account["profileStatus"] == "pending"
    # Not queued at once: the user's retry connects afresh; the filler's turn comes later.
    assert (await filler_of(app).run_once()).outcomes == {}
    later = utc_now() + PROFILE_FIRST_FILL_DELAY + MINUTE
    assert (await filler_of(app).run_once(later)).outcomes == {"filled": 1}


# -- the store's queue of pending profiles ---------------------------------------------


async def connected_at(store: Store, owner: str, at: datetime) -> str:
    return (await store.save_account_tokens(owner, fake_grant(now=at), now=at)).id


@gen_test
async def test_pending_profiles_are_claimed_oldest_first_one_holder_at_a_time(make_store):
    t0 = utc_now()
    async with make_store() as store:
        ids = [await connected_at(store, f"owner-{n}", t0 + n * MINUTE) for n in range(4)]
        assert await store.count_pending_profiles() == 4
        # A new account is left to its callback's own profile call at first.
        assert await store.claim_profile_fill("a", now=t0, until=t0 + MINUTE) is None

        now = t0 + 10 * MINUTE
        until = now + MINUTE
        claims = await asyncio.gather(
            *(store.claim_profile_fill(f"h{n}", now=now, until=until) for n in range(6))
        )
        held = [c.account.id for c in claims if c is not None]
        assert sorted(held) == sorted(ids)  # each once, whoever asked first
        assert {c.failures for c in claims if c is not None} == {0}
        assert await store.claim_profile_fill("late", now=now, until=until) is None

        # Loaded (by its callback or a filler): out of the queue.
        await store.save_account_profile(ids[0], {"display_name": "A"}, now=now)
        # Disconnected: no longer wanted.
        await store.revoke_account(ids[1], now=now, reason="disconnected", revoked_at_tiktok=True)
        assert await store.count_pending_profiles() == 2

        # A failure, deferred by its holder: due at its retry time, failures counted.
        holder_of = {c.account.id: f"h{n}" for n, c in enumerate(claims) if c is not None}
        await store.defer_profile_fill(ids[2], holder_of[ids[2]], retry_at=until + 2 * MINUTE)
        # Someone else's claim is not theirs to defer.
        await store.defer_profile_fill(ids[3], "not-the-holder", retry_at=until + 9 * MINUTE)
        # ids[3]'s holder died: due again when its lease ends, before ids[2].
        again = await store.claim_profile_fill("b", now=until, until=until + 10 * MINUTE)
        assert again is not None and again.account.id == ids[3] and again.failures == 0
        assert await store.claim_profile_fill("b", now=until, until=until + MINUTE) is None
        retried = await store.claim_profile_fill(
            "c", now=until + 2 * MINUTE, until=until + 3 * MINUTE
        )
        assert retried is not None and retried.account.id == ids[2] and retried.failures == 1
        assert retried.account.profile_pending

        # A reconnect whose profile call failed: pending again, due when asked, failures
        # forgotten.
        await store.save_account_profile(ids[2], {"display_name": "C"}, now=now)
        await store.schedule_profile_fill(ids[2], at=until + 5 * MINUTE)
        assert (await store.get_account(ids[2])).profile_pending
        assert await store.claim_profile_fill("d", now=until + 4 * MINUTE,
                                              until=until + 6 * MINUTE) is None
        rescheduled = await store.claim_profile_fill("d", now=until + 5 * MINUTE,
                                                     until=until + 6 * MINUTE)
        assert rescheduled is not None and rescheduled.account.id == ids[2]
        assert rescheduled.failures == 0


@gen_test
async def test_profiles_left_pending_by_an_earlier_version_are_filled_first(
    mongo_server, mongo_database_name, mongo_driver
):
    now = utc_now()
    async with open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver) as store:
        recent = await connected_at(store, "owner-recent", now - 10 * MINUTE)
        legacy = await connected_at(store, "owner-legacy", now - MINUTE)
        # As an earlier version left it: pending, without a schedule.
        await store.database["social_accounts"].update_one(
            {"_id": ObjectId(legacy)}, {"$unset": {"profileRetryAt": ""}})
        assert await store.claim_profile_fill("x", now=now, until=now + MINUTE) is not None
        await store.schedule_profile_fill(recent, at=now - 5 * MINUTE)  # due again

        await store.initialize()  # the next start-up
        first = await store.claim_profile_fill("y", now=now, until=now + MINUTE)
        assert first is not None and first.account.id == legacy
        second = await store.claim_profile_fill("y", now=now, until=now + MINUTE)
        assert second is not None and second.account.id == recent


@gen_test
async def test_the_filler_query_is_served_by_its_index(
    mongo_server, mongo_database_name, mongo_driver
):
    now = utc_now()
    async with open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver) as store:
        for n in range(20):
            account_id = await connected_at(store, f"owner-{n}", now - n * MINUTE)
            if n % 2:
                await store.save_account_profile(account_id, {"display_name": "x"}, now=now)
        indexes = await store.database["social_accounts"].index_information()
        assert indexes[PROFILE_FILL_INDEX]["key"] == [
            ("profilePending", 1), ("status", 1), ("profileRetryAt", 1)]

        explained = await store.profile_fill_cursor(now).explain()
        stages, stage = [], explained["queryPlanner"]["winningPlan"]
        while stage:
            stages.append(stage)
            stage = stage.get("inputStage")
        names = [s["stage"] for s in stages]
        assert "COLLSCAN" not in names, names
        assert names[-1] == "IXSCAN" and stages[-1]["indexName"] == PROFILE_FILL_INDEX
        # The index answers the whole query: nothing is checked on the documents.
        [fetch] = [s for s in stages if s["stage"] == "FETCH"]
        assert "filter" not in fetch, fetch
        # mongod reads the due order from the index; SecantusDB still sorts, but only
        # what the index scan found, keeping the first (a top-1 sort).
        for sort in (s for s in stages if s["stage"] == "SORT"):
            assert sort["limitAmount"] == 1, sort
        # And what the claim finds is what the query finds first.
        [first] = [doc async for doc in store.profile_fill_cursor(now)]
        claim = await store.claim_profile_fill("x", now=now, until=now + MINUTE)
        assert claim is not None and claim.account.id == str(first["_id"])


# -- the gateway runs the filler by itself ----------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_the_gateway_fills_pending_profiles_in_one_worker(
    tmp_path, client, sandbox, mongo_server, mongo_database_name
):
    settings = gateway_settings(mongo_server.uri, mongo_database_name, sandbox.url,
                                WORKERS="2")
    async with started_gateway(client, tmp_path / "gateway.log", timeout=30,
                               **settings) as gateway:
        async def log() -> str:
            return gateway.log_path.read_text(errors="replace")

        # Both workers made their indexes before the first write (wait_for_indexes).
        await poll_until(log, lambda text: text.count("store ready") >= 2, timeout=30,
                         what="both workers ready")
        url = await callback_url(client, gateway.url)
        sandbox.add_fault("userinfo", status=429, count=3)
        assert location(await follow(client, url)) == CONNECTED

        async def profile_status() -> str:
            [account] = await accounts_of(client, gateway.url)
            return str(account["profileStatus"])

        # The filler's round every 5 s loads it, in the background.
        await poll_until(profile_status, lambda status: status == "complete", timeout=30,
                         what="profile filled")
        text = await log()
        assert text.count("background profile filler every") == 1, text


# -- bursts queue for pooled connections ---------------------------------------------


class CountingSandbox(Sandbox):
    """The sandbox, noting when each TikTok API request it served began and ended."""

    def __init__(self) -> None:
        super().__init__(sandbox_clients())
        self.served: list[tuple[float, float]] = []

    def make_app(self) -> tornado.web.Application:
        app = super().make_app()
        log_request = app.settings["log_function"]

        def record(handler: tornado.web.RequestHandler) -> None:
            if handler.request.path.startswith("/v2/") and "auth" not in handler.request.path:
                began = handler.request._start_time
                self.served.append((began, began + handler.request.request_time()))
            log_request(handler)

        app.settings["log_function"] = record
        return app

    def most_at_once(self) -> int:
        # Ends sort before starts at the same instant: back to back is not at once.
        events = sorted([(b, 1) for b, _ in self.served] + [(e, -1) for _, e in self.served])
        most = now = 0
        for _, step in events:
            now += step
            most = max(most, now)
        return most


class TestBurstQueues:
    @pytest.fixture
    def sandbox(self, io_loop):
        with live_sandbox(io_loop, CountingSandbox()) as sandbox:
            yield sandbox

    @pytest.fixture
    def backend(self) -> str:
        return "memory"

    @pytest.fixture
    def gateway_settings_(self, sandbox) -> dict[str, str]:
        return sandbox_settings(sandbox.url) | {
            "TIKTOK_MAX_CONNECTIONS": "2",
            "TIKTOK_CALLBACK_BUDGET_SECONDS": "20",
        }

    @pytest.mark.gen_test(timeout=60)
    async def test_callbacks_beyond_the_pool_wait_their_turn(self, http_client, base_url, app,
                                                             sandbox):
        client = http_client  # ten requests at once (its max_clients)
        urls = [await callback_url(client, base_url, f"burst-{n}") for n in range(10)]
        # 20 calls of 0.5 s through 2 connections: the last waits ~4.5 s, more than
        # the 2 s connect timeout that bounded the wait before.
        sandbox.latency = 0.5
        responses: list[HTTPResponse] = await asyncio.gather(
            *(follow(client, url) for url in urls)
        )
        assert [r.code for r in responses] == [302] * len(urls), [
            r.body for r in responses if r.code != 302]
        assert {location(r) for r in responses} == {CONNECTED}
        assert sandbox.stats["token"] == sandbox.stats["userinfo"] == len(urls)
        assert sandbox.most_at_once() == 2
        for n in range(len(urls)):
            [account] = await accounts_of(client, base_url, f"burst-{n}")
            assert account["profileStatus"] == "complete"

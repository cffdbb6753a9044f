"""``GET /metrics`` after real flows against the live sandbox: counters by outcome,
TikTok and store latency histograms, the in-flight gauge, refresh counts and lag."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from core.clock import utcnow
from sandbox.state import ACCESS_TOKEN_TTL
from server import build_gateway, make_app
from services.accounts import AccountService
from services.metrics import CALLBACK_OUTCOMES, GatewayMetrics, InstrumentedStore
from services.refresher import Refresher
from storage.base import Store
from storage.memory import MemoryStore
from tests.flow import consent, consented, follow, location, sandbox_settings, start
from tests.support import CONNECTED, Scrape, assert_envelope, make_config, scrape

ACCESS_TTL = ACCESS_TOKEN_TTL  # the sandbox's access-token lifetime, as TikTok's (2 h)


@pytest.fixture
def app(sandbox):
    return make_app(
        make_config(**sandbox_settings(sandbox.url), TIKTOK_REQUEST_TIMEOUT_SECONDS="2")
    )




@pytest.mark.gen_test(timeout=20)
async def test_flows_show_up_in_the_metrics(http_client, base_url, app, sandbox):
    # Before anything: every callback outcome is there, at 0.
    before = await scrape(http_client, base_url)
    assert before.labelled("tiktok_gateway_callbacks_total", "outcome") == dict.fromkeys(
        CALLBACK_OUTCOMES, 0.0)
    assert before.value("tiktok_gateway_callbacks_in_flight") == 0

    # A connection.
    started = await start(http_client, base_url)
    callback_url = await consent(http_client, base_url, started["authorizationUrl"])
    assert location(await follow(http_client, callback_url)) == CONNECTED
    # The user presses Cancel at TikTok.
    started = await start(http_client, base_url)
    callback_url = await consent(
        http_client, base_url, started["authorizationUrl"], sandbox_decision="deny"
    )
    assert_envelope(await follow(http_client, callback_url), 400, "PERMISSION_DENIED")
    # TikTok's token endpoint answers 500.
    started = await start(http_client, base_url)
    callback_url = await consent(http_client, base_url, started["authorizationUrl"])
    sandbox.add_fault("token", status=500)
    assert_envelope(await follow(http_client, callback_url), 503, "SERVICE_UNAVAILABLE")
    # Malformed links, refused before the service runs: no state, a repeated code.
    for query in ("code=abc", f"state={started['state']}&code=a&code=b"):
        response = await follow(http_client, f"{base_url}/oauth/tiktok/callback?{query}")
        assert_envelope(response, 400, "VALIDATION_ERROR")

    after = await scrape(http_client, base_url)
    assert after.labelled("tiktok_gateway_callbacks_total", "outcome") == {
        **dict.fromkeys(CALLBACK_OUTCOMES, 0.0),
        "connected": 1.0,
        "PERMISSION_DENIED": 1.0,
        "SERVICE_UNAVAILABLE": 1.0,
        "VALIDATION_ERROR": 2.0,
    }
    assert after.value("tiktok_gateway_callbacks_in_flight") == 0

    tiktok = "tiktok_gateway_tiktok_request_seconds"
    assert after.families[tiktok].type == "histogram"
    counts = {
        (dict(key)["endpoint"], dict(key)["result"]): value
        for (name, key), value in after.samples.items() if name == f"{tiktok}_count"
    }
    # The denied flow never reached TikTok; the 500 was not retried.
    assert counts == {("token", "200"): 1.0, ("token", "500"): 1.0, ("user_info", "200"): 1.0}
    assert sandbox.stats["token"] == 2 and sandbox.stats["userinfo"] == 1
    assert after.value(f"{tiktok}_sum", endpoint="token", result="200") > 0
    assert after.value(f"{tiktok}_bucket", endpoint="user_info", result="200", le="+Inf") == 1

    store = "tiktok_gateway_store_operation_seconds"
    assert after.families[store].type == "histogram"
    operations = after.labelled(f"{store}_count", "operation")
    assert operations["save_pending"] == 3
    assert operations["claim_pending"] == 3
    assert operations["finish_pending"] == 3
    assert operations["save_account_tokens"] == 1
    assert operations["save_account_profile"] == 1


@pytest.mark.gen_test(timeout=20)
async def test_every_budget_shows_its_limits_and_counters_before_its_first_call(
    http_client, base_url, app
):
    """TikTok's user-info budget (the default one): its limit, the background share's,
    its use and room, and its counters by priority, all there at 0 before any call."""
    before = await scrape(http_client, base_url)
    assert before.labelled("tiktok_gateway_budget_limit", "share") == {
        "all": 600.0, "background": 300.0}
    assert before.value("tiktok_gateway_budget_used", budget="user_info") == 0
    assert before.value("tiktok_gateway_budget_remaining", budget="user_info") == 600
    assert before.labelled("tiktok_gateway_budget_deferred_total", "priority") == {
        "interactive": 0.0, "background": 0.0}
    calls = {(dict(key)["priority"], dict(key)["result"]): value
             for (name, key), value in before.samples.items()
             if name == "tiktok_gateway_budget_calls_total"}
    assert calls == {("interactive", "admitted"): 0, ("interactive", "refused"): 0,
                     ("interactive", "local"): 0, ("background", "admitted"): 0,
                     ("background", "refused"): 0, ("background", "paused"): 0}
    # Only TikTok's documented limit: no budget for token or revoke.
    assert {dict(key)["budget"] for name, key in before.samples
            if name == "tiktok_gateway_budget_limit"} == {"user_info"}


@pytest.mark.gen_test(timeout=20)
async def test_in_flight_gauge_counts_a_callback_while_it_waits_for_tiktok(
    http_client, base_url, app, sandbox
):
    callback_url = await consented(http_client, base_url)
    sandbox.add_fault("token", status=200, delay=0.6)  # answers, late
    callback = asyncio.ensure_future(follow(http_client, callback_url))
    seen = []
    while not callback.done():
        seen.append((await scrape(http_client, base_url)).value(
            "tiktok_gateway_callbacks_in_flight"))
        await asyncio.sleep(0.05)
    assert location(await callback) == CONNECTED
    assert 1.0 in seen and set(seen) <= {0.0, 1.0}
    assert (await scrape(http_client, base_url)).value("tiktok_gateway_callbacks_in_flight") == 0


@pytest.mark.gen_test(timeout=20)
async def test_refreshes_by_outcome_and_refresher_lag(http_client, base_url, app, sandbox):
    callback_url = await consented(http_client, base_url)
    assert location(await follow(http_client, callback_url)) == CONNECTED
    gateway = app.settings["gateway"]

    # A round that looks two lifetimes ahead: the token has been due for one lifetime.
    ahead = 2 * ACCESS_TTL
    accounts = AccountService(store=gateway.store, tiktok=gateway.tiktok,
                              refresh_skew_seconds=ahead, metrics=gateway.metrics)
    # Every account kept warm: this one was never handed out.
    refresher = Refresher(store=gateway.store, accounts=accounts, ahead_seconds=ahead,
                          keep_warm_seconds=None)
    summary = await refresher.run_once()
    assert summary.outcomes == {"refreshed": 1}
    metrics = await scrape(http_client, base_url)
    assert metrics.value("tiktok_gateway_refreshes_total", outcome="refreshed") == 1
    assert metrics.value("tiktok_gateway_refreshes_total", outcome="unavailable") == 0
    lag = metrics.value("tiktok_gateway_refresher_lag_seconds")
    assert ACCESS_TTL - 60 < lag <= ACCESS_TTL + 1
    assert metrics.value("tiktok_gateway_tiktok_request_seconds_count",
                         endpoint="refresh", result="200") == 1

    # TikTok failing a refresh is counted too (the access-token endpoint's path).
    sandbox.add_fault("token", status=503)
    assert await accounts.refresh_account(
        (await gateway.store.list_accounts("user-123"))[0], force=True) == "unavailable"

    # A round with nothing due: no lag.
    idle = Refresher(store=gateway.store, accounts=accounts, ahead_seconds=60)
    assert (await idle.run_once()).due == 0
    metrics = await scrape(http_client, base_url)
    assert metrics.value("tiktok_gateway_refresher_lag_seconds") == 0
    assert metrics.value("tiktok_gateway_refreshes_total", outcome="unavailable") == 1
    assert metrics.value("tiktok_gateway_tiktok_request_seconds_count",
                         endpoint="refresh", result="503") == 1


def test_each_gateway_has_its_own_registry():
    first = build_gateway(make_config())
    second = build_gateway(make_config())
    first.metrics.refresh("refreshed")
    assert first.metrics.registry is not second.metrics.registry
    assert Scrape(first.metrics.render().decode()).value(
        "tiktok_gateway_refreshes_total", outcome="refreshed") == 1
    assert Scrape(second.metrics.render().decode()).value(
        "tiktok_gateway_refreshes_total", outcome="refreshed") == 0
    # Nothing lands in prometheus_client's process-wide registry.
    assert not [name for name in prometheus_client.REGISTRY._names_to_collectors
                if name.startswith("tiktok_gateway")]
    # A host may hand in its own registry.
    registry = CollectorRegistry()
    hosted = build_gateway(make_config(), registry=registry)
    assert hosted.metrics.registry is registry
    assert registry.get_sample_value("tiktok_gateway_callbacks_in_flight") == 0


@pytest.mark.gen_test
async def test_the_store_wrapper_times_every_operation_and_passes_the_rest_through():
    inner = MemoryStore()
    inner.extra = "kept"
    metrics = GatewayMetrics()
    store = InstrumentedStore(inner, metrics)
    assert isinstance(store, Store)
    assert store.extra == "kept" and store.inner is inner
    await store.ping()
    assert await store.list_accounts("nobody") == []
    assert await store.accounts_due_for_refresh(utcnow() + timedelta(hours=1), limit=5) == []
    registry = metrics.registry
    for operation in ("ping", "list_accounts", "accounts_due_for_refresh"):
        assert registry.get_sample_value(
            "tiktok_gateway_store_operation_seconds_count", {"operation": operation}) == 1
    # Every operation of the interface is wrapped, none inherited unwrapped.
    for name in Store.__abstractmethods__:
        assert getattr(InstrumentedStore, name) is not getattr(Store, name), name

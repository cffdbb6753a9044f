"""TikTok's rate limits as budgets shared through the store (services/budget.py).

The sliding-window rule is checked against every store (memory, and MongoDB over the
wire with motor and pymongo) with hypothesis-generated arrival times on an injected
clock; several OS processes share one MongoDB budget judged by the database's clock;
priorities, waiting and the fail-safe run on injected clocks, or count admissions.
Nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, RateLimited, StoreUnavailable
from server import build_gateway, make_app
from services.accounts import AccountService
from services.budget import (
    DEFAULT_RATE_LIMITS,
    Priority,
    RateLimit,
    TikTokBudget,
    call_priority,
    current_priority,
)
from services.config import load_config
from services.metrics import GatewayMetrics
from services.refresher import Refresher
from storage.base import CallAdmission, Store
from storage.memory import MemoryStore
from tests.fixtures_mongo import mongo_failpoint, open_mongo_store
from tests.flow import (
    connect,
    consent,
    follow,
    live_sandbox,
    sandbox_grant,
    sandbox_settings,
    start,
)
from tests.support import (
    ROOT,
    environ,
    make_config,
    query_of,
)

BASE = datetime(2030, 1, 1, tzinfo=UTC)
gen_test = pytest.mark.gen_test(timeout=60)


def at_ms(ms: int) -> datetime:
    return BASE + timedelta(milliseconds=ms)


def assert_every_window_within(times: list[float], limit: int, window: float) -> None:
    """No half-open window of ``window`` seconds holds more than ``limit`` of ``times``:
    any limit+1 of them, in time order, span at least the window. Milliseconds, the
    stores' precision."""
    ms = sorted(round(t * 1000) for t in times)
    for k in range(limit, len(ms)):
        assert ms[k] - ms[k - limit] >= round(window * 1000), (
            f"{limit + 1} calls within {window}s: {ms[k - limit:k + 1]}"
        )


def oracle(
    arrivals: list[tuple[int, bool]], limit: int, window_ms: int, background_limit: int
) -> list[bool]:
    """The definition: admit when fewer than ``limit`` admitted calls (and, for a
    background call, fewer than ``background_limit`` background ones) lie in the
    window (t - window, t]."""
    admitted: list[tuple[int, bool]] = []
    decisions = []
    for t, background in arrivals:
        recent = [bg for a, bg in admitted if a > t - window_ms]
        ok = len(recent) < limit and (not background or sum(recent) < background_limit)
        if ok:
            admitted.append((t, background))
        decisions.append(ok)
    return decisions


# -- the sliding window, on every store --------------------------------------------


@contextlib.contextmanager
def opened(io_loop: Any, make_store: Callable[..., Any]) -> Any:
    """A store of the parametrized backend, open across a synchronous test."""
    stack = contextlib.AsyncExitStack()

    async def enter() -> Store:
        return await stack.enter_async_context(make_store())

    store = io_loop.run_sync(enter)
    try:
        yield store
    finally:
        io_loop.run_sync(stack.aclose)


@st.composite
def arrivals(draw: Any) -> tuple[int, list[tuple[int, bool]]]:
    """A window (ms) and gaps between arrivals (ms, background or not): bursts at one
    instant, and gaps right at the window's edges as often as anywhere else."""
    window = draw(st.integers(1, 3000))
    edges = st.sampled_from([0, 1, window - 1, window, window + 1])
    gap = st.integers(0, 2 * window) | edges
    return window, draw(st.lists(st.tuples(gap, st.booleans()), max_size=40))


def test_no_window_ever_holds_more_than_the_limit(io_loop, make_store):
    with opened(io_loop, make_store) as store:

        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(limit=st.integers(1, 5), share=st.integers(1, 5), scenario=arrivals())
        def check(limit, share, scenario):
            window_ms, arrivals = scenario
            background_limit = min(share, limit)
            times, t = [], 0
            for gap, background in arrivals:
                t += gap
                times.append((t, background))
            name = f"test_{uuid.uuid4().hex}"  # a log of its own per example

            async def run() -> list[CallAdmission]:
                return [
                    await store.admit_call(
                        name, limit=limit, window_seconds=window_ms / 1000,
                        background=background, background_limit=background_limit,
                        now=at_ms(t),
                    )
                    for t, background in times
                ]

            decisions = io_loop.run_sync(run)
            # Exactly the definition: never more, and never fewer (no call refused
            # while the window had room).
            assert [d.admitted for d in decisions] == oracle(
                times, limit, window_ms, background_limit
            )
            admitted = [t / 1000 for (t, _), d in zip(times, decisions, strict=True)
                        if d.admitted]
            background = [t / 1000 for (t, bg), d in zip(times, decisions, strict=True)
                          if d.admitted and bg]
            assert_every_window_within(admitted, limit, window_ms / 1000)
            assert_every_window_within(background, background_limit, window_ms / 1000)
            for decision in decisions:
                # A refused call is told when the next slot frees, never "now".
                assert decision.admitted or decision.retry_after > 0
                assert decision.used <= limit
                assert decision.background_used <= background_limit

        check()


@gen_test
async def test_a_full_window_then_its_refill_is_not_admitted(make_store):
    """A token bucket of burst N admits N, then N-1 more as it refills within the
    same minute: 2N in one window. The sliding window admits the second N only once
    the first N are a whole window old."""
    async with make_store() as store:

        async def ask(ms: int) -> CallAdmission:
            return await store.admit_call(
                "user_info", limit=5, window_seconds=60, now=at_ms(ms)
            )

        assert all([(await ask(0)).admitted for _ in range(5)])
        refill = [await ask(59_999) for _ in range(5)]
        assert not any(d.admitted for d in refill)
        assert refill[0].retry_after == pytest.approx(0.001, abs=1e-6)
        assert refill[0].used == 5
        assert all([(await ask(60_000)).admitted for _ in range(5)])
        assert not (await ask(60_000)).admitted


@gen_test
async def test_mongodb_judges_by_its_own_clock(mongo_server, mongo_database_name, mongo_driver):
    """Without ``now``, one clock for every process: the database's. Two stores (two
    clients) share one log."""
    async with (
        open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver) as first,
        open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver) as second,
    ):
        decisions = [
            await store.admit_call("revoke", limit=3, window_seconds=3600)
            for store in (first, second, first, second)
        ]
        assert [d.admitted for d in decisions] == [True, True, True, False]
        # A whole window after the first of them, by the database's clock.
        assert decisions[3].retry_after == pytest.approx(
            decisions[0].at + 3600 - decisions[3].at, abs=0.002
        )
        assert decisions[3].used == 3
        # The budget documents exist from initialize on.
        names = await first.database["tiktok_call_budgets"].distinct("_id")
        assert set(names) >= {"user_info", "token", "revoke"}


# -- several processes, one MongoDB budget -----------------------------------------

_HAMMER = """
import asyncio, json, sys, time
from services.budget import Priority, RateLimit, TikTokBudget
from core.errors import RateLimited
from storage.crypto import TokenCipher
from storage.mongodb import MongoStore, connect_mongo

uri, database, driver, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

async def main():
    client, db = connect_mongo(uri, database, driver=driver)
    store = MongoStore(db, TokenCipher.ephemeral(), client=client)
    # The database's clock; no fallback share: a store fault refuses, never guesses.
    budget = TikTokBudget(store, {"user_info": RateLimit(10, 0.5)}, margin_seconds=0,
                          background_share=0.5, fallback_share=0)
    await store.ping()
    while time.time() < start_at:  # every process starts together
        await asyncio.sleep(0.01)
    admitted, background, refused = [], [], 0

    async def worker(priority):
        nonlocal refused
        for _ in range(8):
            try:
                admission = await budget.acquire(
                    "user_info", priority, deadline=time.monotonic() + 30
                )
            except RateLimited:
                refused += 1
                continue
            admitted.append(admission.at)
            if priority is Priority.BACKGROUND:
                background.append(admission.at)

    await asyncio.gather(*(worker(p) for p in (Priority.INTERACTIVE, Priority.INTERACTIVE,
                                               Priority.BACKGROUND)))
    await store.close()
    print(json.dumps({"admitted": admitted, "background": background, "refused": refused}))

asyncio.run(main())
"""


def test_processes_sharing_one_mongodb_budget_never_exceed_it(mongo_server, mongo_database_name):
    """Three OS processes (both drivers), nine callers, 72 calls against 10 per 0.5 s:
    every window of the database's clock holds at most 10, at most 5 background."""
    start_at = time.time() + 3
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, mongo_server.uri, mongo_database_name, driver,
             str(start_at)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for driver in ("motor", "pymongo", "motor")
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
        results.append(json.loads(out))
    admitted = [t for result in results for t in result["admitted"]]
    background = [t for result in results for t in result["background"]]
    assert len(admitted) + sum(r["refused"] for r in results) == 72
    assert all(result["admitted"] for result in results)
    # The window slid several times under contention, and never overflowed.
    assert len(admitted) > 3 * 10
    assert_every_window_within(admitted, 10, 0.5)
    assert_every_window_within(background, 5, 0.5)


# -- waiting, priorities and the fail-safe ------------------------------------------


class FakeTime:
    """One fake clock for the store (``clock``) and the budget (``monotonic``), moved
    only by the injected ``sleep``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> datetime:
        return BASE + timedelta(seconds=self.now)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def fake_budget(
    fake: FakeTime, store: Store | None = None, **kwargs: Any
) -> TikTokBudget:
    kwargs.setdefault("margin_seconds", 0)
    limits = kwargs.pop("limits", {"user_info": RateLimit(2, 10)})
    return TikTokBudget(store or MemoryStore(), limits, clock=fake.clock,
                        monotonic=fake.monotonic, sleep=fake.sleep, **kwargs)


@gen_test
async def test_interactive_call_waits_for_the_next_free_slot_within_its_deadline():
    fake = FakeTime()
    metrics = GatewayMetrics()
    budget = fake_budget(fake, metrics=metrics)
    await budget.acquire("user_info")
    await budget.acquire("user_info")
    with pytest.raises(RateLimited) as refused:
        await budget.acquire("user_info", deadline=fake.now + 9.9)
    assert refused.value.status == 503 and refused.value.retry_after == 10
    assert refused.value.details == {
        "dependency": "tiktok", "endpoint": "user_info", "reason": "rate_limit"
    }
    assert fake.slept == []  # no slot before the deadline: no wait either
    admission = await budget.acquire("user_info", deadline=fake.now + 30)
    assert admission is not None and admission.admitted
    assert fake.slept == [pytest.approx(10)]
    assert admission.at == (BASE + timedelta(seconds=10)).timestamp()
    calls = functools.partial(metric, metrics, budget="user_info", priority="interactive")
    assert calls("tiktok_gateway_budget_calls_total", result="admitted") == 3
    assert calls("tiktok_gateway_budget_calls_total", result="refused") == 1
    assert calls("tiktok_gateway_budget_deferred_total") == 1
    # An endpoint without a limit never waits and never asks the store.
    assert await budget.acquire("token") is None


@gen_test
async def test_the_margin_lengthens_every_window():
    fake = FakeTime()
    budget = fake_budget(fake, limits={"user_info": RateLimit(1, 60)}, margin_seconds=1.5,
                         background_share=1)
    await budget.acquire("user_info")
    await budget.acquire("user_info", deadline=100)
    assert fake.slept == [pytest.approx(61.5)]


@gen_test
async def test_background_never_takes_more_than_its_share(make_store):
    async with make_store() as store:
        fake = FakeTime()
        budget = fake_budget(fake, store, limits={"user_info": RateLimit(10, 60)},
                             background_share=0.5)
        outcomes = []
        for _ in range(8):
            try:
                await budget.acquire("user_info", Priority.BACKGROUND)
                outcomes.append("admitted")
            except RateLimited:
                outcomes.append("refused")
        assert outcomes == ["admitted"] * 5 + ["refused"] * 3
        # Interactive calls still find the other half.
        for _ in range(5):
            await budget.acquire("user_info", Priority.INTERACTIVE)
        with pytest.raises(RateLimited):
            await budget.acquire("user_info", Priority.INTERACTIVE)


@gen_test
async def test_interactive_calls_get_through_while_background_is_saturated():
    """Background waiters queue on their own: an interactive call with room is admitted
    at once (no deadline: it could not wait), and interactive waiters take freed slots
    before waiting background calls do. Real time, tiny windows; only the order and the
    counts of the admissions are checked."""
    budget = TikTokBudget(MemoryStore(), {"user_info": RateLimit(4, 0.3)}, margin_seconds=0,
                          background_share=0.5)
    order: list[tuple[str, float]] = []

    async def call(priority: Priority, deadline: float | None) -> None:
        admission = await budget.acquire("user_info", priority, deadline)
        assert admission is not None
        order.append((priority.value, admission.at))

    await call(Priority.BACKGROUND, None)
    await call(Priority.BACKGROUND, None)  # the background share is full
    soon = time.monotonic() + 20
    waiting_background = [asyncio.ensure_future(call(Priority.BACKGROUND, soon))
                          for _ in range(4)]
    await asyncio.sleep(0)
    await call(Priority.INTERACTIVE, None)
    await call(Priority.INTERACTIVE, None)  # now the whole budget is spent
    waiting_interactive = [asyncio.ensure_future(call(Priority.INTERACTIVE, soon))
                           for _ in range(3)]
    await asyncio.gather(*waiting_background, *waiting_interactive)
    kinds = [kind for kind, _ in order]
    assert kinds[:4] == ["background", "background", "interactive", "interactive"]
    # The three interactive waiters before any of the four background ones.
    assert kinds[4:7] == ["interactive"] * 3
    assert kinds[7:] == ["background"] * 4
    assert_every_window_within([t for _, t in order], 4, 0.3)
    assert_every_window_within([t for k, t in order if k == "background"], 2, 0.3)


@gen_test
async def test_the_callers_priority_comes_from_its_context():
    fake = FakeTime()
    budget = fake_budget(fake, limits={"user_info": RateLimit(2, 10)}, background_share=0.5)
    assert current_priority() is Priority.INTERACTIVE
    with call_priority(Priority.BACKGROUND):
        # A task created here keeps the priority.
        await asyncio.ensure_future(budget.acquire("user_info"))
        with pytest.raises(RateLimited):
            await budget.acquire("user_info")
    assert current_priority() is Priority.INTERACTIVE
    await budget.acquire("user_info")


def metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@gen_test
async def test_without_the_store_interactive_calls_use_the_local_share_and_background_pauses(
    mongo_server, mongo_database_name, mongo_driver
):
    async with open_mongo_store(mongo_server.uri, mongo_database_name, mongo_driver) as store:
        fake = FakeTime()
        metrics = GatewayMetrics()
        budget = TikTokBudget(store, {"user_info": RateLimit(10, 60)}, margin_seconds=0,
                              fallback_share=0.3, metrics=metrics, monotonic=fake.monotonic,
                              sleep=fake.sleep)
        await budget.acquire("user_info")  # the shared budget, by the database's clock
        with mongo_failpoint(mongo_server.uri, failCommands=["findAndModify"], errorCode=13,
                             appName="tiktok-gateway"):
            with pytest.raises(StoreUnavailable):
                await budget.acquire("user_info", Priority.BACKGROUND, deadline=fake.now + 30)
            for _ in range(3):  # 30% of 10, this process alone
                await budget.acquire("user_info")
            with pytest.raises(RateLimited) as refused:
                await budget.acquire("user_info", deadline=fake.now + 30)
            assert refused.value.retry_after == 60
        # Answering again: the shared budget takes over once the store is asked again.
        fake.now += 6
        admission = await budget.acquire("user_info")
        assert admission is not None and admission.used == 2
    calls = functools.partial(metric, metrics, "tiktok_gateway_budget_calls_total",
                              budget="user_info")
    assert calls(priority="interactive", result="admitted") == 2
    assert calls(priority="interactive", result="local") == 3
    assert calls(priority="interactive", result="refused") == 1
    assert calls(priority="background", result="paused") == 1
    # Refused at once (its deadline came before the next slot): never waited.
    assert metric(metrics, "tiktok_gateway_budget_deferred_total", budget="user_info",
                  priority="interactive") == 0


@gen_test
async def test_no_fallback_share_stops_calls_while_the_store_cannot_be_asked(
    mongo_server, mongo_database_name
):
    async with open_mongo_store(mongo_server.uri, mongo_database_name, "pymongo") as store:
        budget = TikTokBudget(store, fallback_share=0)
        with mongo_failpoint(mongo_server.uri, failCommands=["findAndModify"], errorCode=13,
                             appName="tiktok-gateway"):
            with pytest.raises(StoreUnavailable):
                await budget.acquire("user_info")


# -- wired into the gateway ---------------------------------------------------------


@pytest.fixture
def sandbox(io_loop):
    with live_sandbox(io_loop, pkce="optional") as sandbox:
        yield sandbox


@pytest.fixture
def app(sandbox):
    return make_app(make_config(**sandbox_settings(sandbox.url),
                                TIKTOK_RATE_LIMITS="user_info=2/60s",
                                TIKTOK_FALLBACK_SHARE="0.5"))


@gen_test
async def test_a_callback_past_the_user_info_budget_connects_with_its_profile_pending(
    http_client, base_url, app, sandbox
):
    """The user-info budget spent: the callback connects (302) without calling TikTok's
    user info, and the account waits for the background filler."""
    for owner in ("user-123", "user-234"):
        await connect(http_client, base_url, owner=owner)
    third = await start(http_client, base_url, owner="user-456")
    landed = await follow(http_client, await consent(http_client, base_url,
                                                     third["authorizationUrl"]))
    assert landed.code == 302, landed.body
    assert query_of(landed.headers["Location"])["status"] == ["connected"]
    assert sandbox.stats["userinfo"] == 2
    # The tokens are kept; only the profile waits.
    accounts = await app.settings["gateway"].store.list_accounts("user-456")
    assert len(accounts) == 1 and accounts[0].profile_pending
    scrape = (await http_client.fetch(f"{base_url}/metrics")).body.decode()
    assert 'tiktok_gateway_budget_calls_total{budget="user_info",priority="interactive",' \
           'result="refused"} 1.0' in scrape
    assert 'tiktok_gateway_budget_remaining{budget="user_info"} 0.0' in scrape
    assert "tiktok_gateway_profiles_left_pending_total 1.0" in scrape


async def due_account(store: Store, sandbox: Any, owner: str) -> str:
    grant = sandbox_grant(sandbox, expires_in=timedelta(seconds=60),
                          refresh_expires_in=timedelta(days=365))
    account = await store.save_account_tokens(owner, grant, now=datetime.now(UTC))
    return account.id


@gen_test
async def test_the_refresher_draws_on_the_background_share_only(sandbox):
    """token=2/60s: the refresher (background) gets one call, the access-token endpoint
    (interactive) still finds the other."""
    gateway = build_gateway(make_config(**sandbox_settings(sandbox.url),
                                        TIKTOK_RATE_LIMITS="token=2/60s",
                                        TIKTOK_FALLBACK_SHARE="0.5"))
    ids = [await due_account(gateway.store, sandbox, owner) for owner in ("a", "b")]
    sandbox.reset_stats()
    refresher = Refresher(
        store=gateway.store,
        accounts=AccountService(store=gateway.store, tiktok=gateway.tiktok,
                                refresh_skew_seconds=3600),
        ahead_seconds=3600,
        keep_warm_seconds=None,  # every connected account, used or not
    )
    summary = await refresher.run_once()
    assert summary.outcomes == {"refreshed": 1, "unavailable": 1}
    assert sandbox.stats["token"] == 1
    # The account the refresher could not refresh, refreshed on demand.
    soon = datetime.now(UTC) + timedelta(seconds=120)
    stale = [(owner, account_id) for owner, account_id in zip("ab", ids, strict=True)
             if (await gateway.store.get_account_tokens(account_id)).access_token_expires_at
             < soon]
    assert len(stale) == 1
    token = await gateway.accounts.access_token(*stale[0])
    assert token.expires_at > soon
    assert sandbox.stats["token"] == 2
    gateway.tiktok.close()


# -- configuration -------------------------------------------------------------------


def test_rate_limits_default_to_tiktoks_documented_one():
    config = load_config(environ())
    assert dict(config.tiktok_rate_limits) == dict(DEFAULT_RATE_LIMITS)
    assert dict(config.tiktok_rate_limits) == {"user_info": RateLimit(600, 60.0)}
    assert config.tiktok_rate_limit_margin_seconds == 1.0
    assert config.tiktok_background_share == 0.5
    assert config.tiktok_fallback_share == 0.1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("user_info=600/60s,token=1200/60s",
         {"user_info": RateLimit(600, 60), "token": RateLimit(1200, 60)}),
        ("token=30/1m", {"user_info": RateLimit(600, 60), "token": RateLimit(30, 60)}),
        (" revoke = 10 / 30 , ", {"user_info": RateLimit(600, 60), "revoke": RateLimit(10, 30)}),
        ("user_info=1000/60s", {"user_info": RateLimit(1000, 60)}),
        ("user_info=off", {}),
    ],
)
def test_rate_limits_accept(value, expected):
    config = load_config(environ(TIKTOK_RATE_LIMITS=value))
    assert dict(config.tiktok_rate_limits) == expected


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"TIKTOK_RATE_LIMITS": "user_info"}, "is not name=calls/seconds"),
        ({"TIKTOK_RATE_LIMITS": "video_list=600/60s"}, "known: user_info, token, revoke"),
        ({"TIKTOK_RATE_LIMITS": "user_info=600"}, "such as 60s or 1m"),
        ({"TIKTOK_RATE_LIMITS": "user_info=0/60s"}, "above 0"),
        ({"TIKTOK_RATE_LIMITS": "user_info=1.5/60s"}, "whole number"),
        ({"TIKTOK_RATE_LIMITS": "user_info=600/0s"}, "period above 0"),
        ({"TIKTOK_RATE_LIMITS": "user_info=600/60h"}, "such as 60s or 1m"),
        ({"TIKTOK_RATE_LIMITS": "token=1/1s,token=2/1s"}, "token is given twice"),
        ({"TIKTOK_RATE_LIMIT_MARGIN_SECONDS": "-1"}, "TIKTOK_RATE_LIMIT_MARGIN_SECONDS"),
        ({"TIKTOK_BACKGROUND_SHARE": "0"}, "TIKTOK_BACKGROUND_SHARE"),
        ({"TIKTOK_BACKGROUND_SHARE": "1.5"}, "at most 1"),
        ({"TIKTOK_FALLBACK_SHARE": "-0.1"}, "from 0 to 1"),
        ({"TIKTOK_RATE_LIMITS": "revoke=1/60s", "TIKTOK_FALLBACK_SHARE": "0"},
         "TIKTOK_BACKGROUND_SHARE=0.5 leaves background work"),
        ({"TIKTOK_RATE_LIMITS": "revoke=5/60s", "TIKTOK_FALLBACK_SHARE": "0.1"},
         "TIKTOK_FALLBACK_SHARE=0.1 leaves a process"),
    ],
)
def test_rate_limit_settings_are_checked(overrides, needle):
    with pytest.raises(ConfigError) as caught:
        load_config(environ(**overrides))
    text = "\n".join(caught.value.problems)
    assert needle in text
    assert len(caught.value.problems) == 1


def test_rate_limit_problems_are_reported_with_the_others():
    with pytest.raises(ConfigError) as caught:
        load_config(environ(TIKTOK_RATE_LIMITS="nope", PORT="eighty"))
    text = "\n".join(caught.value.problems)
    assert "TIKTOK_RATE_LIMITS='nope' is invalid" in text and "PORT" in text

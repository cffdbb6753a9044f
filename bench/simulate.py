"""A large account base over months, on fake clocks: ``python -m bench.simulate``.

What it answers (issue 14): with 1,000,000 connected accounts over 200 days, how
much of each TikTok budget the background work uses, how long on-demand requests
wait for the budget, whether any refresh token expires unnoticed, and how much
memory it takes. The decisions are the gateway's own code, unchanged:
``Refresher`` (keep-warm rounds, the expiry sweep, its pace), ``AccountService``
(on-demand refreshes for the product's token requests, leases, rotation),
``TikTokBudget`` (the shared sliding windows, priorities), ``TikTokClient`` and the
memory store. TikTok is a fake behind the HTTP client (``FakeTikTok``): two-hour
access tokens, 180-day refresh tokens that a refresh does not extend, strict
rotation, revocation, and its rate limits (429 beyond them).

Time is virtual: the event loop (``VirtualClockLoop``) jumps to its next timer
whenever nothing is ready, so 200 days take minutes, and every clock the code
reads (the store's, the budget's, the refresher's, the TikTok client's) is that
loop's. Nothing sleeps for real and nothing leaves the process.

What is sampled, exactly (the work is two parts):

1. **The policy over 200 days, on a sample.** ``--accounts`` accounts (default
   1,000, a 1/1000 sample of the 1,000,000) in the mix of ``MIX`` (their share of the
   base, how often the product asks for each one's token, how soon its user
   reconnects once asked to), each with its own product and user: a task that asks
   ``AccountService.access_token`` at that account's times, and connects again
   (code exchange and user info, through the budget) after a
   ``reauthorization_required``. The refresher's pace (``REFRESH_MAX_PER_MINUTE``,
   300 per minute for the whole base) is scaled to the sample (x 1/1000: one refresh
   every 200 s), so the refresher falls behind when it would for the whole base
   (though, taking one account at a time, it loses more picks to on-demand refreshes
   made while it waits: BENCHMARKS.md). TikTok's budgets are kept at their real size:
   a sample never fills them. That is exact only if the whole base does not fill them
   either; part 2 checks it.
2. **The budgets at full scale, replayed.** The sample's permits asked, by budget and
   priority, averaged per five-minute bin of the day over the run (its first day, the
   warm-up, left out) and multiplied by 1/sample, are the whole base's rates; a
   million independent accounts make them Poisson arrivals. The busiest hour of them
   goes through a fresh ``TikTokBudget`` at TikTok's real limits, each call asking as
   the TikTok client does (its priority, a deadline of the request timeout): the waits
   and refusals the whole base would meet at its busiest, and the background share in
   every window. It is open loop: a refused call is counted, not retried.

Reported: TikTok calls a day (scaled to the base), refreshes per account and day by
activity, the product's token requests and how they were answered, the refresher's
outcomes, the budgets (background use against its share, interactive waits), refresh
tokens that expired unnoticed (the product's view of the account, at least a second
after TikTok's expiry, still ``connected``; or TikTok asked to refresh an expired
one: both must be 0) and the sweep's lag, and memory (the process's peak RSS; the
store's bytes per account, times 1,000,000).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import logging
import math
import random
import resource
import selectors
import sys
import time
import tracemalloc
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders

import services.tiktok
from bench.common import max_in_window
from core.errors import Conflict, GatewayError, RateLimited
from services.accounts import AccountService
from services.budget import (
    DEFAULT_BACKGROUND_SHARE,
    DEFAULT_MARGIN_SECONDS,
    Priority,
    RateLimit,
    TikTokBudget,
    current_priority,
    share_of,
)
from services.config import _rate_limits as parse_rate_limits
from services.refresher import DEFAULT_MAX_PER_MINUTE, Refresher, RoundSummary
from services.tiktok import MIN_ATTEMPT_SECONDS, TikTokClient
from storage.base import AccountStatus, CallAdmission, TokenGrant
from storage.memory import MemoryStore

BASE_ACCOUNTS = 1_000_000
DAY = 86400.0
HOUR = 3600.0
ACCESS_TTL = 7200  # TikTok: 2 hours
REFRESH_TTL = 180 * 86400  # TikTok: 180 days, not extended by a refresh
EPOCH = datetime(2027, 1, 4, tzinfo=UTC)  # a Monday, 00:00 UTC
# The gateway's defaults (services/config.py).
REQUEST_TIMEOUT = 4.0
CONNECT_TIMEOUT = 2.0
REFRESH_INTERVAL = 60.0
REFRESH_AHEAD = 3600
KEEP_WARM = 3600
# TikTok's documented user-info limit, and a token limit of the issue's example
# (TikTok documents none; with none, refreshes never wait for a budget).
DEFAULT_LIMITS = "user_info=600/60s,token=1200/60s"
# Scopes the sample's grants carry; user info asks for these fields.
SCOPES = ["user.info.basic"]
FIELDS = ["open_id", "union_id", "avatar_url", "display_name"]


@dataclass(frozen=True)
class Kind:
    """A kind of account: its share of the base and how the product uses it."""

    name: str
    share: float
    # The product asks for the account's token this often (mean), within ``hours`` (UTC).
    uses_per_day: float
    hours: tuple[int, int]
    # After a reauthorization_required, the user connects again after this long
    # (mean, days); None: never (an account nobody uses notices nothing).
    reconnect_days: float | None
    # Fixed hourly times (a product's sync job) rather than random ones.
    periodic: bool = False
    # Chance over the run that the user removes the app in TikTok (unannounced here).
    removal: float = 0.0


# A social-media product's base: a few accounts synced every hour around the clock,
# some used daily or weekly in working hours, half connected once and never used.
MIX: tuple[Kind, ...] = (
    Kind("hourly sync", 0.05, 24.0, (0, 24), 1.0, periodic=True, removal=0.05),
    Kind("daily", 0.15, 2.0, (8, 22), 2.0, removal=0.05),
    Kind("weekly", 0.30, 1 / 7, (8, 22), 7.0, removal=0.05),
    Kind("idle", 0.50, 0.0, (0, 24), None),
)


# -- virtual time -------------------------------------------------------------------


class _InstantSelector(selectors.DefaultSelector):
    """Never blocks: where the loop would wait for its next timer, time jumps there."""

    loop: VirtualClockLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("simulation stalled: no timer and nothing ready")
        self.loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock (seconds from 0): sleeps cost no real time."""

    def __init__(self) -> None:
        selector = _InstantSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = 0.0
        # asyncio runs the timers due before now + this. Its default, the monotonic
        # clock's 1 ns, is below a double's step past 2**24 s (194 days): a timer due
        # "now" would then never run, and the loop would spin.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        # To the next timer exactly: adding a tiny wait to a large time can round to no
        # change at all, and the loop would spin.
        scheduled = self._scheduled  # type: ignore[attr-defined]
        target = self._now + max(seconds, 0.0)
        if scheduled:
            target = max(target, scheduled[0].when())
        self._now = target


def now_at(loop: asyncio.AbstractEventLoop) -> Callable[[], datetime]:
    return lambda: EPOCH + timedelta(seconds=loop.time())


# -- TikTok ----------------------------------------------------------------------------


@dataclass
class Grant:
    open_id: str
    generation: int
    refresh_expires_at: float
    access_expires_at: float
    revoked: bool = False


class FakeTikTok(AsyncHTTPClient):
    """TikTok's token, user-info and revoke endpoints, answered at once from memory.

    Tokens name their grant and generation (``r.<open_id>.<n>``), so a rotated or
    expired refresh token is recognised without keeping every token ever issued.
    """

    def setup(self, clock: Callable[[], float], limits: dict[str, RateLimit]) -> None:
        self.clock = clock
        self.limits = limits
        self.windows: dict[str, deque[float]] = {name: deque() for name in limits}
        self.grants: dict[str, Grant] = {}
        self.calls: Counter[str] = Counter()
        # Problems the gateway must never cause: each counted.
        self.refused: Counter[str] = Counter()

    def issue(self, open_id: str, at: float) -> Grant:
        """A new grant (a consent), as of ``at``."""
        previous = self.grants.get(open_id)
        grant = Grant(open_id, (previous.generation + 1) if previous else 1,
                      at + REFRESH_TTL, at + ACCESS_TTL)
        self.grants[open_id] = grant
        return grant

    def tokens(self, grant: Grant, now: float) -> dict[str, Any]:
        return {
            "open_id": grant.open_id,
            "access_token": f"a.{grant.open_id}.{grant.generation}",
            "refresh_token": f"r.{grant.open_id}.{grant.generation}",
            "expires_in": ACCESS_TTL,
            "refresh_expires_in": max(1, round(grant.refresh_expires_at - now)),
            "scope": ",".join(SCOPES),
            "token_type": "Bearer",
        }

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        now = self.clock()
        url = request.url
        if "/oauth/token/" in url:
            endpoint, status, body = "token", *self._token(request, now)
        elif "/user/info/" in url:
            endpoint, status, body = "user_info", *self._user_info(request, now)
        else:
            endpoint, status, body = "revoke", *self._revoke(request)
        if status == 429:
            self.refused["rate_limited"] += 1
        callback(HTTPResponse(
            request, status,
            headers=HTTPHeaders({"Content-Type": "application/json", "X-Tt-Logid": "sim"}),
            buffer=BytesIO(json.dumps(body).encode()),
        ))
        self.calls[endpoint] += 1

    def _over_limit(self, endpoint: str, now: float) -> bool:
        limit = self.limits.get(endpoint)
        if limit is None:
            return False
        window = self.windows[endpoint]
        while window and window[0] <= now - limit.seconds:
            window.popleft()
        if len(window) >= limit.calls:
            return True
        window.append(now)
        return False

    def _token(self, request: HTTPRequest, now: float) -> tuple[int, dict[str, Any]]:
        if self._over_limit("token", now):
            return 429, {"error": "rate_limit_exceeded", "error_description": "slow down"}
        form = dict(parse_qsl(request.body.decode()))
        if form["grant_type"] == "authorization_code":
            open_id = form["code"].split(".")[1]
            return 200, self.tokens(self.issue(open_id, now), now)
        _, open_id, generation = form["refresh_token"].split(".")
        grant = self.grants.get(open_id)
        problem = None
        if grant is None or grant.revoked:
            problem = "revoked"
        elif int(generation) != grant.generation:
            problem = "rotated"  # a refresh token already used: lost rotation
        elif now >= grant.refresh_expires_at:
            problem = "expired"
        if grant is None or problem:
            if problem != "revoked":
                self.refused[f"refresh_token_{problem}"] += 1
            return 200, {"error": "invalid_grant", "error_description": f"refresh token {problem}"}
        grant.generation += 1
        grant.access_expires_at = now + ACCESS_TTL
        return 200, self.tokens(grant, now)

    def _user_info(self, request: HTTPRequest, now: float) -> tuple[int, dict[str, Any]]:
        error = {"code": "ok", "message": "", "log_id": "sim"}
        if self._over_limit("user_info", now):
            error = error | {"code": "rate_limit_exceeded", "message": "slow down"}
            return 429, {"data": {}, "error": error}
        open_id = request.headers["Authorization"].split(".")[1]
        user = {"open_id": open_id, "union_id": f"u-{open_id}", "avatar_url": "",
                "display_name": open_id}
        return 200, {"data": {"user": user}, "error": error}

    def _revoke(self, request: HTTPRequest) -> tuple[int, dict[str, Any]]:
        form = dict(parse_qsl(request.body.decode()))
        grant = self.grants.get(form["token"].split(".")[1])
        if grant is not None:
            grant.revoked = True
        return 200, {}


# -- the budget, observed --------------------------------------------------------------


@dataclass
class Asked:
    """One permit asked of a budget: when, by whom, how long it waited, the answer."""

    at: float
    budget: str
    priority: str
    activity: str
    waited: float
    admitted: bool


class ObservedBudget(TikTokBudget):
    """The real budget; every ``acquire`` is also written down (``log``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[Asked] = []

    async def acquire(
        self, budget: str, priority: Priority | None = None, deadline: float | None = None
    ) -> CallAdmission | None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        who = (priority or current_priority()).value
        activity = ACTIVITY.get()
        try:
            admission = await super().acquire(budget, priority, deadline)
        except RateLimited:
            self.log.append(Asked(started, budget, who, activity, loop.time() - started, False))
            raise
        if budget in self.limits:
            self.log.append(Asked(started, budget, who, activity, loop.time() - started, True))
        return admission


# What a task's TikTok calls are for: "request" (the product's), "connect", else background.
ACTIVITY: ContextVar[str] = ContextVar("simulated_activity", default="background")


class ObservedRefresher(Refresher):
    """The real refresher; its rounds' outcomes are also added up (``outcomes``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outcomes: Counter[str] = Counter()

    async def run_once(self, now: datetime | None = None) -> RoundSummary:
        summary = await super().run_once(now)
        self.outcomes.update(summary.outcomes)
        return summary


# -- the simulation --------------------------------------------------------------------


@dataclass
class Sampled:
    id: str
    owner: str
    open_id: str
    kind: Kind


@dataclass
class Figures:
    requests: Counter[str] = field(default_factory=Counter)
    refreshes_by_kind: Counter[str] = field(default_factory=Counter)
    connects: Counter[str] = field(default_factory=Counter)
    expiries: int = 0
    unnoticed: int = 0
    handed_out_after_expiry: int = 0
    # Seconds between a refresh token's expiry and the store marking the account.
    sweep_lag: list[float] = field(default_factory=list)
    unswept_at_end: int = 0


def scaled_pace(fraction: float) -> float:
    return DEFAULT_MAX_PER_MINUTE * fraction


def build_sample(count: int, seed: int) -> list[tuple[Kind, float]]:
    """(kind, connected at: seconds before the start) for each sampled account."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not a secret
    sample: list[tuple[Kind, float]] = []
    for kind in MIX:
        for _ in range(round(kind.share * count)):
            # Connected at some time in the 180 days before the start: the refresh
            # tokens expire all through the run.
            sample.append((kind, -rng.uniform(0, REFRESH_TTL)))
    return sample


def next_use(kind: Kind, now: float, rng: random.Random, offset: float) -> float | None:
    if kind.uses_per_day <= 0:
        return None
    if kind.periodic:
        period = DAY / kind.uses_per_day
        # The next slot strictly after now (a hair of slack: now may be this slot's own
        # time, computed in floating point).
        return (math.floor((now - offset) / period + 1e-6) + 1) * period + offset
    start, end = kind.hours
    rate = kind.uses_per_day / ((end - start) * HOUR)  # per second of active hours
    at = now
    wait = rng.expovariate(rate)
    while True:
        # Spend the wait within active hours only.
        day = math.floor(at / DAY) * DAY
        opens, closes = day + start * HOUR, day + end * HOUR
        if at < opens:
            at = opens
        if at >= closes:
            at = day + DAY + start * HOUR
            continue
        if at + wait < closes:
            return at + wait
        wait -= closes - at
        at = day + DAY + start * HOUR


async def simulate(args: argparse.Namespace) -> tuple[dict[str, Any], list[Asked]]:
    loop = asyncio.get_running_loop()
    clock = now_at(loop)
    fraction = args.accounts / BASE_ACCOUNTS
    limits = dict(parse_rate_limits(args.limits))
    logging.getLogger().setLevel(logging.ERROR)

    # TikTok's client reads time.monotonic(): the loop's clock, here.
    services.tiktok.time = SimpleNamespace(monotonic=loop.time)  # type: ignore[assignment]

    tracemalloc.start()
    store = MemoryStore(clock=loop.time)
    tiktok_http = FakeTikTok(force_instance=True)
    tiktok_http.setup(loop.time, limits)
    budget = ObservedBudget(
        store, limits, margin_seconds=DEFAULT_MARGIN_SECONDS,
        background_share=DEFAULT_BACKGROUND_SHARE, clock=clock, monotonic=loop.time,
    )
    tiktok = TikTokClient(
        tiktok_http, client_key="sim", client_secret="sim-secret",  # noqa: S106 - fake
        redirect_uri="https://gateway.example/oauth/tiktok/callback",
        api_base_url="https://tiktok.example", authorize_url="https://tiktok.example/auth",
        connect_timeout=CONNECT_TIMEOUT, request_timeout=REQUEST_TIMEOUT, budget=budget,
    )
    accounts = AccountService(store=store, tiktok=tiktok, clock=clock, monotonic=loop.time)
    pace = scaled_pace(fraction)
    refresher = ObservedRefresher(
        store=store,
        accounts=accounts,
        interval_seconds=REFRESH_INTERVAL,
        ahead_seconds=REFRESH_AHEAD,
        keep_warm_seconds=args.keep_warm,
        # The whole base's pace, scaled to the sample: a float is fine for its spacing.
        max_per_minute=pace,
        batch_size=max(1, math.ceil(pace)),
        clock=clock,
        monotonic=loop.time,
    )

    # The sample, as connected before the start (no TikTok call: that was before).
    sample: list[Sampled] = []
    before = tracemalloc.get_traced_memory()[0]
    for index, (kind, connected) in enumerate(build_sample(args.accounts, args.seed)):
        open_id = f"oid{index:07d}"
        grant = tiktok_http.issue(open_id, connected)
        body = tiktok_http.tokens(grant, connected)
        at = clock() + timedelta(seconds=connected)
        account = await store.save_account_tokens(f"owner{index}", TokenGrant(
            open_id=open_id, access_token=body["access_token"],
            refresh_token=body["refresh_token"],
            access_token_expires_at=at + timedelta(seconds=ACCESS_TTL),
            refresh_token_expires_at=at + timedelta(seconds=REFRESH_TTL), scopes=SCOPES,
        ), now=at)
        sample.append(Sampled(account.id, f"owner{index}", open_id, kind))
    store_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    figures = Figures()
    end = args.days * DAY
    # (refresh token expiry, open_id, generation): checked once a refresher interval has
    # passed since, the expiry sweep's period.
    expiring: list[tuple[float, str, int]] = [
        (g.refresh_expires_at, g.open_id, g.generation) for g in tiktok_http.grants.values()
    ]
    heapq.heapify(expiring)
    by_open_id = {s.open_id: s for s in sample}

    async def connect(account: Sampled) -> None:
        """The callback's TikTok part and its store write: exchange, user info, save."""
        token = ACTIVITY.set("connect")
        try:
            reply = await tiktok.exchange_code(f"c.{account.open_id}", None)
            grant = tiktok_http.grants[account.open_id]
            heapq.heappush(expiring, (grant.refresh_expires_at, account.open_id,
                                      grant.generation))
            figures.connects["exchanged"] += 1
            try:
                await tiktok.fetch_user(reply.access_token, FIELDS,
                                        deadline=loop.time() + REQUEST_TIMEOUT)
            except GatewayError:
                figures.connects["profile_pending"] += 1
            now = clock()
            await store.save_account_tokens(account.owner, TokenGrant(
                open_id=account.open_id, access_token=reply.access_token,
                refresh_token=reply.refresh_token,
                access_token_expires_at=now + timedelta(seconds=reply.expires_in),
                refresh_token_expires_at=now + timedelta(seconds=reply.refresh_expires_in),
                scopes=reply.scopes,
            ), now=now)
        except GatewayError:
            figures.connects["failed"] += 1
        finally:
            ACTIVITY.reset(token)

    async def product(account: Sampled) -> None:
        """The product asking for one account's token, and its user reconnecting."""
        kind = account.kind
        account_rng = random.Random(f"{args.seed}/{account.open_id}")  # noqa: S311 - workload
        offset = account_rng.uniform(0, HOUR)
        removal_at = end * account_rng.random() if account_rng.random() < kind.removal else None
        ACTIVITY.set("request")
        while True:
            at = next_use(kind, loop.time(), account_rng, offset)
            if removal_at is not None and (at is None or removal_at < at):
                await asyncio.sleep(removal_at - loop.time())
                tiktok_http.grants[account.open_id].revoked = True  # the user removed the app
                removal_at = None
                continue
            if at is None or at >= end:
                return
            await asyncio.sleep(at - loop.time())
            before_refreshes = tiktok_http.calls["token"]
            grant = tiktok_http.grants[account.open_id]
            try:
                await accounts.access_token(account.owner, account.id)
            except Conflict:
                figures.requests["reauthorization_required"] += 1
                if kind.reconnect_days is None:
                    return
                back = loop.time() + account_rng.expovariate(1 / (kind.reconnect_days * DAY))
                if back >= end:
                    return  # the run ends first: never sleep past it
                await asyncio.sleep(back - loop.time())
                await connect(account)
                continue
            except RateLimited:
                figures.requests["refused_by_budget"] += 1
                continue
            except GatewayError as exc:
                figures.requests[f"failed_{exc.code}"] += 1
                continue
            if loop.time() >= grant.refresh_expires_at and not grant.revoked:
                figures.handed_out_after_expiry += 1
            refreshed = tiktok_http.calls["token"] > before_refreshes
            figures.requests["refreshed_on_demand" if refreshed else "fresh"] += 1

    async def watch_expiries() -> None:
        """Each refresh token that expires (not replaced by a newer grant): the product
        must see its account as not connected from then on (``view_account``), and the
        sweep must mark it in the store; how long after is the sweep's lag."""
        unswept: list[tuple[float, Sampled]] = []
        while loop.time() < end:
            await asyncio.sleep(REFRESH_INTERVAL)
            now = loop.time()
            # TikTok tells lifetimes in whole seconds: the gateway knows an expiry to
            # within one, so it is asked about one second after it.
            while expiring and expiring[0][0] <= now - 1.0:
                expires, open_id, _ = heapq.heappop(expiring)
                if tiktok_http.grants[open_id].refresh_expires_at != expires:
                    continue  # reconnected before it expired: a newer grant
                account = by_open_id[open_id]
                figures.expiries += 1
                seen = await accounts.view_account(account.owner, account.id)
                if seen.status is AccountStatus.CONNECTED:
                    figures.unnoticed += 1
                unswept.append((expires, account))
            waiting = []
            for expires, account in unswept:
                stored = await store.get_account(account.id)
                if stored is not None and stored.status is AccountStatus.CONNECTED:
                    waiting.append((expires, account))
                elif stored is not None:
                    swept = (stored.updated_at - EPOCH).total_seconds()
                    figures.sweep_lag.append(max(swept - expires, 0.0))
            unswept = waiting
        figures.unswept_at_end = len(unswept)

    refresher.start()
    wall = time.monotonic()
    cpu = time.process_time()
    await asyncio.gather(watch_expiries(), *(product(a) for a in sample))
    if loop.time() < end:
        await asyncio.sleep(end - loop.time())
    if loop.time() > end + HOUR:
        # Per-day figures divide by --days: a task that slept past the end would skew them.
        raise RuntimeError(f"the run overran its end by {(loop.time() - end) / HOUR:.1f} h")
    await refresher.stop()
    wall = time.monotonic() - wall
    cpu = time.process_time() - cpu

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for asked in budget.log:
        if asked.budget == "token" and asked.admitted:
            figures.refreshes_by_kind[asked.activity] += 1
    result = report(args, fraction, limits, sample, figures, tiktok_http, budget, store_bytes,
                    peak_rss_mb, wall, cpu, pace)
    result["refresher_outcomes"] = dict(refresher.outcomes)
    return result, budget.log


# -- part 2: the budgets at full scale ----------------------------------------------------

PROFILE_BIN_SECONDS = 300.0


def poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:  # normal approximation, ample for these counts
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def daily_profile(
    log: list[Asked], limits: dict[str, RateLimit], days: float
) -> tuple[dict[tuple[int, str, str], float], float]:
    """Permits asked per second, by five-minute bin of the day, budget and priority,
    averaged over every day of the run but the first (its warm-up); and how many days."""
    first = DAY if days >= 2 else 0.0
    counted = (days * DAY - first) / DAY
    counts: Counter[tuple[int, str, str]] = Counter(
        (int((a.at % DAY) // PROFILE_BIN_SECONDS), a.budget, a.priority)
        for a in log if a.budget in limits and a.at >= first
    )
    return {key: n / counted / PROFILE_BIN_SECONDS for key, n in counts.items()}, counted


async def replay(
    log: list[Asked], fraction: float, limits: dict[str, RateLimit], days: float, seed: int,
    hours: float = 1.0,
) -> dict[str, Any]:
    """The busiest ``hours`` of the day at the whole base's size, through a fresh real
    budget at TikTok's limits, open loop.

    The sample's permits asked, averaged by time of day over the run, scaled by
    1/sample, are the whole base's mean rates; its calls come from a million
    independent accounts, so they arrive as a Poisson process at those rates. Each
    call asks as the TikTok client does: its priority, a deadline of the request
    timeout."""
    loop = asyncio.get_running_loop()
    rates, counted_days = daily_profile(log, limits, days)
    if not rates:
        return {}
    bins = round(DAY / PROFILE_BIN_SECONDS)
    width = max(1, round(hours * HOUR / PROFILE_BIN_SECONDS))
    totals = [sum(r for (b, _, _), r in rates.items() if b == index) for index in range(bins)]
    peak = max(range(bins), key=lambda first: sum(totals[(first + k) % bins]
                                                  for k in range(width)))
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not a secret
    scale = 1 / fraction
    # A window's worth before the measured hour fills the budget's logs as they would be.
    lead = max(limit.seconds for limit in limits.values()) + DEFAULT_MARGIN_SECONDS
    lead_bins = math.ceil(lead / PROFILE_BIN_SECONDS)
    calls: list[tuple[float, str, Priority]] = []
    for k in range(-lead_bins, width):
        index = (peak + k) % bins
        for (b, name, priority), rate in rates.items():
            if b != index:
                continue
            for _ in range(poisson(rng, rate * scale * PROFILE_BIN_SECONDS)):
                at = (k + rng.random()) * PROFILE_BIN_SECONDS
                calls.append((at, name, Priority(priority)))
    calls.sort()
    origin = loop.time() + lead_bins * PROFILE_BIN_SECONDS
    store = MemoryStore(clock=loop.time)
    budget = TikTokBudget(store, limits, clock=now_at(loop), monotonic=loop.time)
    waits: dict[tuple[str, str], list[float]] = defaultdict(list)
    refused: Counter[tuple[str, str]] = Counter()
    admitted: dict[str, list[tuple[float, bool]]] = defaultdict(list)

    async def one(at: float, name: str, priority: Priority) -> None:
        await asyncio.sleep(origin + at - loop.time())
        began = loop.time()
        measured = at >= 0
        try:
            await budget.acquire(name, priority,
                                 deadline=began + REQUEST_TIMEOUT - MIN_ATTEMPT_SECONDS)
        except RateLimited:
            if measured:
                refused[(name, priority.value)] += 1
            return
        if measured:
            waits[(name, priority.value)].append(loop.time() - began)
        admitted[name].append((loop.time(), priority is Priority.BACKGROUND))

    started = time.monotonic()
    # In slices, so the loop never holds every call's task at once.
    slice_size = 20_000
    for offset in range(0, len(calls), slice_size):
        await asyncio.gather(*(one(*call) for call in calls[offset:offset + slice_size]))
    result: dict[str, Any] = {
        "hour_of_day_utc": round(peak * PROFILE_BIN_SECONDS / HOUR, 2),
        "hours": hours,
        "profile_days": round(counted_days, 1),
        "scale": round(scale),
        "calls": sum(1 for c in calls if c[0] >= 0),
        "wall_seconds": round(time.monotonic() - started, 1),
        "budgets": {},
    }
    for name, limit in limits.items():
        per_priority = {}
        for priority in Priority:
            series = sorted(waits.get((name, priority.value), []))
            per_priority[priority.value] = {
                "admitted": len(series),
                "waited": sum(1 for w in series if w > 0),
                "wait_p99_seconds": round(percentile(series, 0.99), 3) if series else None,
                "wait_max_seconds": round(series[-1], 3) if series else None,
                "refused": refused.get((name, priority.value), 0),
            }
        entries = admitted.get(name, [])
        result["budgets"][name] = {
            "limit": str(limit),
            "background_limit": share_of(limit, DEFAULT_BACKGROUND_SHARE),
            "max_in_window": max_in_window([t for t, _ in entries], limit.seconds),
            "background_max_in_window": max_in_window([t for t, bg in entries if bg],
                                                      limit.seconds),
            **per_priority,
        }
    return result


def percentile(ordered: Sequence[float], fraction: float) -> float:
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


# -- the report ---------------------------------------------------------------------------


def report(
    args: argparse.Namespace, fraction: float, limits: dict[str, RateLimit],
    sample: list[Sampled], figures: Figures, tiktok: FakeTikTok, budget: ObservedBudget,
    store_bytes: int, peak_rss_mb: float, wall: float, cpu: float, pace: float,
) -> dict[str, Any]:
    scale = 1 / fraction
    days = args.days
    per_kind = Counter(s.kind.name for s in sample)
    refreshes = figures.refreshes_by_kind
    background = [a for a in budget.log if a.admitted and a.priority == "background"]
    budgets = {}
    for name, limit in limits.items():
        used = sorted(a.at for a in budget.log if a.admitted and a.budget == name)
        bg = sorted(a.at for a in background if a.budget == name)
        interactive = sorted(a.waited for a in budget.log
                             if a.budget == name and a.priority == "interactive" and a.admitted)
        budgets[name] = {
            "limit": str(limit),
            "background_limit": share_of(limit, DEFAULT_BACKGROUND_SHARE),
            "sample_max_in_window": max_in_window(used, limit.seconds),
            "sample_background_max_in_window": max_in_window(bg, limit.seconds),
            "sample_interactive_waited": sum(1 for w in interactive if w > 0),
            "sample_interactive_wait_p99_seconds": (
                round(percentile(interactive, 0.99), 3) if interactive else None),
            "sample_refused": sum(1 for a in budget.log if a.budget == name and not a.admitted),
        }
    return {
        "base_accounts": BASE_ACCOUNTS,
        "sampled_accounts": len(sample),
        "sample_fraction": fraction,
        "days": days,
        "mix": {k.name: {"share": k.share, "uses_per_day": round(k.uses_per_day, 3),
                         "sampled": per_kind[k.name]} for k in MIX},
        "keep_warm_seconds": args.keep_warm,
        "refresher_pace_per_minute_in_sample": round(pace, 4),
        "limits": {name: str(limit) for name, limit in limits.items()},
        "tiktok_calls": dict(tiktok.calls),
        "tiktok_calls_per_day_whole_base": {
            name: round(count * scale / days) for name, count in tiktok.calls.items()},
        "refresh_calls_per_day_whole_base": {
            activity: round(count * scale / days) for activity, count in refreshes.items()},
        "refresh_calls_per_account_day": {
            activity: round(count / len(sample) / days, 3)
            for activity, count in refreshes.items()},
        "requests": dict(figures.requests),
        "connects": dict(figures.connects),
        "tiktok_refused": dict(tiktok.refused),
        "refresh_token_expiries": figures.expiries,
        # Seen `connected` by the product after expiry, or offered to TikTok expired.
        "expired_unnoticed": figures.unnoticed
        + tiktok.refused.get("refresh_token_expired", 0),
        "tiktok_asked_with_an_expired_refresh_token": tiktok.refused.get(
            "refresh_token_expired", 0),
        "sweep_lag_max_seconds": round(max(figures.sweep_lag), 1) if figures.sweep_lag else None,
        "sweep_lag_p99_seconds": (
            round(percentile(sorted(figures.sweep_lag), 0.99), 1) if figures.sweep_lag else None),
        "unswept_at_end": figures.unswept_at_end,
        "tokens_handed_out_after_refresh_expiry": figures.handed_out_after_expiry,
        "budgets": budgets,
        "store_bytes_per_account": round(store_bytes / max(len(sample), 1)),
        "store_mb_whole_base": round(store_bytes / max(len(sample), 1) * BASE_ACCOUNTS / 2**20),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
    }


def print_report(result: dict[str, Any]) -> None:
    r = result
    print(f"simulation: {r['sampled_accounts']:,} sampled accounts standing for "
          f"{r['base_accounts']:,}, {r['days']} days, keep-warm {r['keep_warm_seconds']}s, "
          f"limits {r['limits']}; {r['wall_seconds']}s wall, {r['cpu_seconds']}s CPU")
    for name, kind in r["mix"].items():
        print(f"  {name:<12} {kind['share']:>5.0%} of the base, {kind['uses_per_day']:g} token "
              f"requests/day, {kind['sampled']} sampled")
    print(f"  TikTok calls/day, whole base: {r['tiktok_calls_per_day_whole_base']}")
    print(f"  token calls/day, whole base, by activity: {r['refresh_calls_per_day_whole_base']}")
    print(f"  product token requests: {r['requests']}; connections: {r['connects']}")
    print(f"  the refresher's outcomes: {r.get('refresher_outcomes')}")
    print(f"  refresh-token expiries {r['refresh_token_expiries']}: unnoticed "
          f"{r['expired_unnoticed']} (target 0); TikTok asked with an expired one "
          f"{r['tiktok_asked_with_an_expired_refresh_token']}; marked by the sweep after "
          f"p99 {r['sweep_lag_p99_seconds']}s, max {r['sweep_lag_max_seconds']}s; "
          f"TikTok's refusals {r['tiktok_refused'] or 0}")
    for name, b in r["budgets"].items():
        print(f"  budget {name} {b['limit']} (sample): most in a window "
              f"{b['sample_max_in_window']}, background most in a window "
              f"{b['sample_background_max_in_window']} of its {b['background_limit']}")
    replayed = r.get("replay") or {}
    if replayed:
        print(f"  the whole base's busiest {replayed['hours']:g} h ({replayed['hour_of_day_utc']:g}"
              f" h UTC; the sample's rates x{replayed['scale']:,}, Poisson; "
              f"{replayed['calls']:,} calls through the real budget):")
        for name, b in replayed["budgets"].items():
            bg, fg = b["background"], b["interactive"]
            share = b["background_max_in_window"] / b["background_limit"]
            print(f"    {name} {b['limit']}: most in a window {b['max_in_window']} "
                  f"(limit {b['limit'].split('/')[0]}); background most in a window "
                  f"{b['background_max_in_window']} / share {b['background_limit']} = "
                  f"{share:.2f}; interactive: {fg['admitted']:,} admitted, {fg['waited']:,} "
                  f"waited, p99 wait {fg['wait_p99_seconds']}s, refused {fg['refused']}; "
                  f"background: {bg['admitted']:,} admitted, refused {bg['refused']}")
    if r["sampled_accounts"] < 1000 or r["days"] < 100:
        print("  (a short run: a small sample's rates by time of day are noisy, and the replay "
              "scales them up with their noise; the full run is the one to read)")
    print(f"  memory: peak RSS {r['peak_rss_mb']} MB; the memory store holds "
          f"{r['store_bytes_per_account']} bytes per account, {r['store_mb_whole_base']:,} MB "
          f"for {r['base_accounts']:,}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1000,
                        help="sampled accounts (of 1,000,000); capacities scale with them")
    parser.add_argument("--days", type=float, default=200.0)
    parser.add_argument("--limits", default=DEFAULT_LIMITS,
                        help=f"TIKTOK_RATE_LIMITS for the gateway and the fake TikTok "
                        f"(default {DEFAULT_LIMITS})")
    parser.add_argument("--keep-warm", type=lambda v: None if v == "all" else int(v),
                        default=KEEP_WARM, help="REFRESH_KEEP_WARM_SECONDS (or 'all')")
    parser.add_argument("--replay-hours", type=float, default=1.0,
                        help="the busiest hours replayed at full scale (0: none)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--quick", action="store_true", help="200 accounts, 20 days")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    if args.quick:
        args.accounts, args.days, args.replay_hours = 200, 20.0, 0.25
    if args.accounts < len(MIX) or args.days <= 0:
        parser.error("--accounts must cover every kind and --days be > 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    real_time = services.tiktok.time
    try:
        result, log = on_virtual_clock(simulate(args))
    finally:
        services.tiktok.time = real_time
    if args.replay_hours > 0:
        limits = dict(parse_rate_limits(args.limits))
        result["replay"] = on_virtual_clock(replay(
            log, result["sample_fraction"], limits, args.days, args.seed, args.replay_hours))
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def on_virtual_clock(coroutine: Any) -> Any:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_report(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

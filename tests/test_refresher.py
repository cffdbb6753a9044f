"""The background refresher against the sandbox as TikTok, on both stores.

Rate, concurrency and backoff are checked with injected clocks and sleep: assertions
are about counts and fake seconds, never about wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from core.errors import ConfigError, StoreUnavailable
from sandbox import Sandbox
from sandbox.state import ACCESS_TOKEN_TTL, OAuthError
from server import build_gateway, start_refresher
from services.accounts import AccountService, RefreshOutcome
from services.refresher import ERROR, MAX_BACKOFF_SECONDS, RateLimiter, Refresher
from services.tiktok import TikTokClient
from storage.base import Account, AccountStatus, AccountTokens, Store
from storage.memory import MemoryStore
from tests.flow import live_sandbox, make_sandbox, sandbox_grant, tiktok_for
from tests.support import CLIENT_KEY, make_config, utc_now

gen_test = pytest.mark.gen_test(timeout=30)
AHEAD = 3600
# A refreshed access token lives the sandbox's (TikTok's) 2 hours, well past AHEAD and
# the due expiries the tests seed (minutes): an expiry this late shows a refresh happened.
REFRESHED = timedelta(seconds=ACCESS_TOKEN_TTL) - timedelta(minutes=1)


class FakeTime:
    """A monotonic clock that only the injected sleep moves, and a UTC clock that moves
    with it (from the real time when made)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.started = utc_now()
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return self.started + timedelta(seconds=self.now - 1000.0)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class RecordingAccounts(AccountService):
    """The real refresh path, recording when each call started and how many overlapped."""

    def __init__(self, fake: FakeTime | None = None, **kwargs: Any) -> None:
        super().__init__(refresh_skew_seconds=AHEAD, **kwargs)
        self.fake = fake
        self.starts: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def refresh_account(
        self, account: Account, *, force: bool = False, due_within: timedelta | None = None
    ) -> RefreshOutcome:
        self.starts.append(self.fake.now if self.fake else 0.0)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await super().refresh_account(account, force=force, due_within=due_within)
        finally:
            self.in_flight -= 1


@pytest.fixture
def sandbox(io_loop):
    with live_sandbox(io_loop, pkce="optional") as sandbox:
        yield sandbox


async def connect(
    store: Store,
    sandbox: Any,
    owner: str,
    *,
    expires_in: timedelta,
    refresh_expires_in: timedelta = timedelta(days=365),
    refresh_token: str | None = None,
) -> Account:
    """An account holding real sandbox tokens, with the access expiry we choose."""
    grant = sandbox_grant(sandbox, expires_in=expires_in, refresh_expires_in=refresh_expires_in,
                          refresh_token=refresh_token)
    return await store.save_account_tokens(owner, grant, now=utc_now())


def refresher_for(
    store: Store, accounts: AccountService, fake: FakeTime | None = None, **kwargs: Any
) -> Refresher:
    """A refresher on ``fake`` time if given. It keeps every account warm unless told
    otherwise: most tests here are about what happens to what is due."""
    kwargs.setdefault("ahead_seconds", AHEAD)
    kwargs.setdefault("keep_warm_seconds", None)
    if fake is not None:
        kwargs.update(monotonic=fake.monotonic, sleep=fake.sleep, clock=fake.wall)
    return Refresher(store=store, accounts=accounts, **kwargs)


async def wait_until(condition: Callable[[], bool], *, steps: int = 2000) -> None:
    """Yield to the loop until ``condition`` holds; a bound on steps, not on time."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


# -- what is refreshed -----------------------------------------------------------


@gen_test
async def test_refreshes_only_what_is_due(make_store, sandbox, tiktok):
    async with make_store() as store:
        due = await connect(store, sandbox, "due", expires_in=timedelta(minutes=10))
        fresh = await connect(store, sandbox, "fresh", expires_in=timedelta(hours=20))
        refresher = refresher_for(store, RecordingAccounts(store=store, tiktok=tiktok))

        summary = await refresher.run_once()

        assert summary.due == 1
        assert summary.outcomes == {RefreshOutcome.REFRESHED.value: 1}
        assert sandbox.stats["token_refresh"] == 1
        refreshed = await store.get_account(due.id)
        assert refreshed.access_token_expires_at > utc_now() + REFRESHED
        tokens = await store.get_account_tokens(due.id)
        sandbox.state.check_access(tokens.access_token)  # the new token works at TikTok
        untouched = await store.get_account(fresh.id)
        assert untouched.access_token_expires_at == fresh.access_token_expires_at
        assert untouched.updated_at == fresh.updated_at

        # Nothing is due any more: the next round calls TikTok for nobody.
        assert (await refresher.run_once()).due == 0
        assert sandbox.stats["token_refresh"] == 1


@gen_test
async def test_expired_refresh_token_needs_reauthorization_without_tiktok(
    make_store, sandbox, tiktok
):
    async with make_store() as store:
        dead, also_dead = [
            await connect(
                store, sandbox, owner, expires_in=-timedelta(hours=1),
                refresh_expires_in=-timedelta(minutes=1),
            )
            for owner in ("dead", "also-dead")
        ]
        fake = FakeTime()
        refresher = refresher_for(
            store, RecordingAccounts(store=store, tiktok=tiktok), fake,
            max_per_minute=1, batch_size=10,
        )
        summary = await refresher.run_once()
        assert summary.outcomes == {RefreshOutcome.REFRESH_TOKEN_EXPIRED.value: 2}
        for account in (dead, also_dead):
            stored = await store.get_account(account.id)
            assert stored.status is AccountStatus.REAUTHORIZATION_REQUIRED
            assert await store.get_account_tokens(account.id) is None
        assert sandbox.stats["token"] == 0
        assert fake.slept == []  # no TikTok call, so no rate budget spent


@gen_test
@pytest.mark.parametrize("keep_warm", [3600, 0, None], ids=["keep-warm", "none", "all"])
async def test_every_round_marks_expired_refresh_tokens_whatever_is_kept_warm(
    make_store, sandbox, tiktok, keep_warm
):
    async with make_store() as store:
        # Its access token is good for hours, so it is not due: only its refresh token's
        # expiry (180 days after the user connected, never extended) ends it.
        expired = await connect(store, sandbox, "expired", expires_in=timedelta(hours=2),
                                refresh_expires_in=timedelta(minutes=2))
        live = await connect(store, sandbox, "live", expires_in=timedelta(hours=2),
                             refresh_expires_in=timedelta(days=179))
        fake = FakeTime()
        refresher = refresher_for(store, RecordingAccounts(store=store, tiktok=tiktok), fake,
                                  keep_warm_seconds=keep_warm)
        assert (await refresher.run_once()).outcomes == {}
        fake.now += 120  # the refresh token's expiry
        summary = await refresher.run_once()
        assert (summary.due, summary.outcomes) == (
            0, {RefreshOutcome.REFRESH_TOKEN_EXPIRED.value: 1}
        )
        stored = await store.get_account(expired.id)
        assert stored.status is AccountStatus.REAUTHORIZATION_REQUIRED
        assert stored.updated_at == fake.wall()
        assert await store.get_account_tokens(expired.id) is None
        assert (await store.get_account(live.id)).status is AccountStatus.CONNECTED
        assert sandbox.stats["token"] == 0
        # Once marked, it is not counted again.
        assert (await refresher.run_once()).outcomes == {}


# -- which accounts are kept warm --------------------------------------------------------


async def hand_out(store: Store, tiktok: TikTokClient, account: Account, at: datetime) -> None:
    """The access-token endpoint's path, on a clock that says ``at``."""
    service = AccountService(store=store, tiktok=tiktok, clock=lambda: at)
    token = await service.access_token(account.owner_id, account.id)
    assert token.expires_at == account.access_token_expires_at  # fresh: not refreshed


@gen_test
async def test_by_default_only_accounts_used_in_the_last_hour_are_kept_warm(
    make_store, sandbox, tiktok
):
    async with make_store() as store:
        now = utc_now()
        accounts = {
            name: await connect(store, sandbox, name, expires_in=timedelta(minutes=30))
            for name in ("recent", "an-hour-ago", "long-ago", "never")
        }
        await hand_out(store, tiktok, accounts["recent"], now - timedelta(minutes=5))
        await hand_out(store, tiktok, accounts["an-hour-ago"], now - timedelta(seconds=3600))
        await hand_out(store, tiktok, accounts["long-ago"], now - timedelta(minutes=61))
        service = RecordingAccounts(store=store, tiktok=tiktok)
        refresher = Refresher(store=store, accounts=service, ahead_seconds=AHEAD)

        summary = await refresher.run_once(now)

        assert (summary.due, summary.outcomes) == (2, {RefreshOutcome.REFRESHED.value: 2})
        assert sandbox.stats["token_refresh"] == 2
        for name, account in accounts.items():
            stored = await store.get_account(account.id)
            refreshed = stored.access_token_expires_at != account.access_token_expires_at
            assert refreshed is (name in ("recent", "an-hour-ago")), name
        # The rest wait for the access-token endpoint to refresh them on demand.
        on_demand = AccountService(store=store, tiktok=tiktok, refresh_skew_seconds=AHEAD)
        await on_demand.access_token("never", accounts["never"].id)
        assert sandbox.stats["token_refresh"] == 3
        assert (await store.get_account(accounts["never"].id)).token_used_at is not None


@gen_test
@pytest.mark.parametrize(("keep_warm", "refreshed"), [(0, 0), (None, 2)], ids=["none", "all"])
async def test_keep_warm_none_or_all(make_store, sandbox, tiktok, keep_warm, refreshed):
    async with make_store() as store:
        used = await connect(store, sandbox, "used", expires_in=timedelta(minutes=30))
        await connect(store, sandbox, "never", expires_in=timedelta(minutes=30))
        await hand_out(store, tiktok, used, utc_now())
        refresher = refresher_for(store, RecordingAccounts(store=store, tiktok=tiktok),
                                  keep_warm_seconds=keep_warm)
        summary = await refresher.run_once()
        assert summary.due == refreshed
        assert sandbox.stats["token_refresh"] == refreshed


# -- failures and backoff ------------------------------------------------------------------


class BrokenTokensStore(MemoryStore):
    """A store whose records for some ids cannot be read (say, corrupted ciphertext)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()

    async def get_account_tokens(self, account_id: str) -> Any:
        if account_id in self.broken:
            raise RuntimeError("record cannot be read")
        return await super().get_account_tokens(account_id)


@gen_test
async def test_one_failing_account_does_not_stop_the_others(sandbox, tiktok, caplog):
    store = BrokenTokensStore()
    soon = timedelta(minutes=5)
    first = await connect(store, sandbox, "first", expires_in=soon)
    refused = await connect(store, sandbox, "refused", expires_in=soon,
                            refresh_token="rft.unknown-to-tiktok")
    broken = await connect(store, sandbox, "broken", expires_in=soon)
    last = await connect(store, sandbox, "last", expires_in=soon)
    store.broken.add(broken.id)
    fake = FakeTime()
    refresher = refresher_for(store, RecordingAccounts(store=store, tiktok=tiktok), fake)

    summary = await refresher.run_once()

    assert summary.outcomes == {
        RefreshOutcome.REFRESHED.value: 2,
        RefreshOutcome.REAUTHORIZATION_REQUIRED.value: 1,  # TikTok said invalid_grant
        ERROR: 1,
    }
    for account in (first, last):
        stored = await store.get_account(account.id)
        assert stored.access_token_expires_at > utc_now() + REFRESHED
    assert (await store.get_account(refused.id)).status is AccountStatus.REAUTHORIZATION_REQUIRED
    assert (await store.get_account(broken.id)).status is AccountStatus.CONNECTED
    assert f"refresh of account {broken.id} failed unexpectedly" in caplog.text
    # The broken account's lease was given back: it is tried again once its wait is over.
    store.broken.clear()
    assert (await refresher.run_once()).due == 0
    fake.now += refresher.interval
    assert (await refresher.run_once()).outcomes == {RefreshOutcome.REFRESHED.value: 1}


async def failing_refreshes(
    store: Store, sandbox: Any, tiktok: TikTokClient, failures: int
) -> tuple[Account, FakeTime, Refresher]:
    """One due account whose next ``failures`` refreshes TikTok answers 503; a refresher
    on fake time, every 60 s, whose rate budget hardly waits."""
    account = await connect(store, sandbox, "flaky", expires_in=timedelta(minutes=5))
    fake = FakeTime()
    refresher = refresher_for(store, RecordingAccounts(store=store, tiktok=tiktok), fake,
                              interval_seconds=60, max_per_minute=600)
    sandbox.add_fault("token", status=503, count=failures)
    return account, fake, refresher


@gen_test
async def test_a_failing_account_waits_longer_after_each_failure(make_store, sandbox, tiktok):
    async with make_store() as store:
        account, fake, refresher = await failing_refreshes(store, sandbox, tiktok, 3)
        # Another gateway process's refresher: the wait is the account's, not one process's.
        other = refresher_for(store, RecordingAccounts(store=store, tiktok=tiktok), fake,
                              interval_seconds=60, max_per_minute=600)
        summary = await refresher.run_once()
        # Waits of 60, 120, then 240 s: asked earlier, the query leaves the account out.
        for failures, wait in enumerate((60, 120, 240), start=1):
            assert summary.outcomes == {RefreshOutcome.UNAVAILABLE.value: 1}
            stored = await store.get_account(account.id)
            assert stored.refresh_failures == failures
            assert stored.refresh_retry_at == fake.wall() + timedelta(seconds=wait)
            fake.now += wait - 1
            assert (await refresher.run_once()).due == 0
            assert (await other.run_once()).due == 0
            fake.now += 1
            summary = await (other if failures == 2 else refresher).run_once()
            assert summary.due == 1
        assert summary.outcomes == {RefreshOutcome.REFRESHED.value: 1}
        assert sandbox.stats["token_refresh"] == 4  # three failures and the success
        stored = await store.get_account(account.id)
        assert stored.access_token_expires_at > utc_now() + REFRESHED
        # Success clears the wait.
        assert (stored.refresh_retry_at, stored.refresh_failures) == (None, 0)
        assert (await refresher.run_once()).due == 0


@gen_test
async def test_waits_are_capped_and_reconnecting_clears_them(make_store, sandbox, tiktok):
    async with make_store() as store:
        account, fake, refresher = await failing_refreshes(store, sandbox, tiktok, 20)
        for _ in range(8):  # waits of 60, 120, ..., capped
            fake.now += MAX_BACKOFF_SECONDS
            summary = await refresher.run_once()
            assert summary.outcomes == {RefreshOutcome.UNAVAILABLE.value: 1}
        stored = await store.get_account(account.id)
        assert stored.refresh_failures == 8
        assert stored.refresh_retry_at == fake.wall() + timedelta(seconds=MAX_BACKOFF_SECONDS)
        # The user connects again: a new grant starts without the old one's wait.
        again = await connect(store, sandbox, "flaky", expires_in=timedelta(minutes=5))
        assert again.id == account.id
        assert (again.refresh_retry_at, again.refresh_failures) == (None, 0)
        sandbox.clear_faults()
        assert (await refresher.run_once()).outcomes == {RefreshOutcome.REFRESHED.value: 1}


# -- budget and concurrency --------------------------------------------------------


@gen_test
async def test_rate_budget_spaces_tiktok_calls(sandbox, tiktok):
    store = MemoryStore()
    for n in range(10):
        await connect(store, sandbox, f"owner-{n}", expires_in=timedelta(minutes=n))
    fake = FakeTime()
    accounts = RecordingAccounts(fake, store=store, tiktok=tiktok)
    refresher = refresher_for(
        store, accounts, max_per_minute=6, monotonic=fake.monotonic, sleep=fake.sleep
    )

    # One round takes one minute's budget; the rest waits for the next round.
    assert (await refresher.run_once()).outcomes == {RefreshOutcome.REFRESHED.value: 6}
    assert (await refresher.run_once()).outcomes == {RefreshOutcome.REFRESHED.value: 4}

    assert sandbox.stats["token_refresh"] == 10
    starts = accounts.starts
    assert len(starts) == 10
    # Never more than 6 calls in any 60 fake seconds, across rounds too.
    assert max(sum(1 for s in starts if w <= s < w + 60) for w in starts) == 6
    assert sum(fake.slept) == pytest.approx(9 * 10)


@gen_test
async def test_a_backlog_is_refreshed_at_the_full_pace_round_after_round(sandbox, tiktok):
    """Rounds start every interval: one that spent it waiting for its pace is followed
    at once. 18 due accounts at 6 a minute: a start every 10 s, not a round's six and
    then an idle interval (which halved a busy refresher's pace)."""
    store = MemoryStore()
    for n in range(18):
        await connect(store, sandbox, f"owner-{n}", expires_in=timedelta(minutes=5))
    fake = FakeTime()
    accounts = RecordingAccounts(fake, store=store, tiktok=tiktok)
    # One at a time: the fake clock moves with each sleep in turn.
    refresher = refresher_for(store, accounts, fake, max_per_minute=6, interval_seconds=60,
                              concurrency=1)
    refresher.start()
    # The fake clock runs on while we look: the refreshed tokens fall due again an hour
    # later, so the first 18 starts are the ones that tell.
    await wait_until(lambda: len(accounts.starts) >= 18)
    await refresher.stop()
    starts = accounts.starts[:18]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    assert gaps == pytest.approx([10.0] * 17)


@gen_test
async def test_rate_limiter_counts():
    fake = FakeTime()
    limiter = RateLimiter(120, clock=fake.monotonic, sleep=fake.sleep)
    times = []
    for _ in range(5):
        await limiter.acquire()
        times.append(fake.now)
    assert [t - times[0] for t in times] == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])
    fake.now += 100  # idle for a while: no catching up with a burst
    await limiter.acquire()
    await limiter.acquire()
    assert fake.slept[-1] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        RateLimiter(0)


@gen_test
@pytest.mark.parametrize("concurrency", [4, 2])
async def test_concurrency_is_bounded(concurrency):
    sandbox = make_sandbox(pkce="optional", latency=0.2)
    tiktok = tiktok_for(f"http://127.0.0.1:{sandbox.listen()}")
    try:
        store = MemoryStore()
        for n in range(10):
            await connect(store, sandbox, f"owner-{n}", expires_in=timedelta(minutes=5))
        fake = FakeTime()
        accounts = RecordingAccounts(fake, store=store, tiktok=tiktok)
        refresher = refresher_for(
            store, accounts, max_per_minute=600, concurrency=concurrency,
            monotonic=fake.monotonic, sleep=fake.sleep,
        )
        summary = await refresher.run_once()
        assert summary.outcomes == {RefreshOutcome.REFRESHED.value: 10}
        assert accounts.max_in_flight == concurrency
    finally:
        await sandbox.close()


# -- the loop ------------------------------------------------------------------------


class FlakyStore(MemoryStore):
    """The first rounds fail: the store is down, then a bug."""

    def __init__(self) -> None:
        super().__init__()
        self.due_calls = 0

    async def accounts_due_for_refresh(
        self, before: datetime, *, limit: int, **filters: Any
    ) -> list[Account]:
        self.due_calls += 1
        if self.due_calls == 1:
            raise StoreUnavailable(technical_message="MongoDB unreachable: test")
        if self.due_calls == 2:
            raise RuntimeError("a bug in one round")
        return await super().accounts_due_for_refresh(before, limit=limit, **filters)


@gen_test
async def test_loop_survives_failed_rounds_and_stop_ends_it(sandbox, tiktok, caplog):
    store = FlakyStore()
    account = await connect(store, sandbox, "owner", expires_in=timedelta(minutes=5))
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    refresher = refresher_for(
        store, RecordingAccounts(store=store, tiktok=tiktok), interval_seconds=42, sleep=sleep
    )
    refresher.start()
    assert refresher.running
    await wait_until(lambda: refresher.rounds >= 2)
    await refresher.stop()

    assert not refresher.running
    assert sandbox.stats["token_refresh"] == 1
    stored = await store.get_account(account.id)
    assert stored.access_token_expires_at > utc_now() + REFRESHED
    assert "refresh round skipped: MongoDB unreachable: test" in caplog.text
    assert "refresh round failed" in caplog.text
    # What is left of the interval after each (quick) round.
    assert sleeps and all(41 < seconds <= 42 for seconds in sleeps)
    calls = store.due_calls
    for _ in range(20):
        await asyncio.sleep(0)
    assert store.due_calls == calls  # stopped for good
    await refresher.stop()  # a second stop is harmless


@dataclass
class InFlight:
    """A refresher round whose refresh has reached a slow TikTok (the sandbox)."""

    sandbox: Sandbox
    store: MemoryStore
    account: Account
    old_tokens: AccountTokens
    accounts: RecordingAccounts
    refresher: Refresher


@contextlib.asynccontextmanager
async def refresh_in_flight() -> AsyncIterator[InFlight]:
    """An account due in a memory store and a started refresher whose refresh TikTok
    (0.3 s a request) has received, and so rotates; the sandbox closed on the way out."""
    sandbox = make_sandbox(pkce="optional", latency=0.3)
    tiktok = tiktok_for(f"http://127.0.0.1:{sandbox.listen()}")
    try:
        store = MemoryStore()
        account = await connect(store, sandbox, "owner", expires_in=timedelta(minutes=5))
        old_tokens = await store.get_account_tokens(account.id)
        assert old_tokens is not None
        accounts = RecordingAccounts(store=store, tiktok=tiktok)
        refresher = refresher_for(store, accounts, interval_seconds=3600)
        refresher.start()
        await wait_until(lambda: sandbox.stats["token_refresh"] == 1)
        yield InFlight(sandbox, store, account, old_tokens, accounts, refresher)
    finally:
        await sandbox.close()


@gen_test
async def test_stop_lets_an_in_flight_refresh_finish():
    async with refresh_in_flight() as flight:
        await flight.refresher.stop()
        # TikTok rotated the refresh token: stopping must not lose the new one.
        assert not flight.refresher.running
        stored = await flight.store.get_account(flight.account.id)
        assert stored.status is AccountStatus.CONNECTED
        assert stored.access_token_expires_at > utc_now() + REFRESHED
        new_tokens = await flight.store.get_account_tokens(flight.account.id)
        assert new_tokens.refresh_token != flight.old_tokens.refresh_token
        with pytest.raises(OAuthError):  # the old one was rotated away at TikTok
            flight.sandbox.state.refresh(flight.sandbox.state.clients[CLIENT_KEY],
                                         flight.old_tokens.refresh_token)


@gen_test
async def test_a_shutdown_with_no_grace_still_stores_what_tiktok_answers():
    """SHUTDOWN_TIMEOUT_SECONDS=0 (or shorter than TikTok's answer): the refresh already
    sent is not abandoned, since TikTok rotates the refresh token it carries."""
    async with refresh_in_flight() as flight:
        # What app.lifecycle.shut_down does, with a zero timeout.
        await flight.refresher.stop(grace_seconds=0)
        assert await flight.accounts.close(0) == 0
        store, account_id = flight.store, flight.account.id
        new_tokens = await store.get_account_tokens(account_id)
        assert new_tokens.refresh_token != flight.old_tokens.refresh_token
        assert (await store.get_account(account_id)).status is AccountStatus.CONNECTED
        # The lease was released: nothing waits for it to expire.
        assert await store.acquire_refresh_lease(account_id, "next", seconds=30)


# -- wiring and configuration ----------------------------------------------------------


@gen_test
async def test_server_starts_no_refresher_when_interval_is_zero():
    before = asyncio.all_tasks()
    gateway = build_gateway(make_config(REFRESH_INTERVAL_SECONDS="0"))
    assert start_refresher(gateway) is None
    assert asyncio.all_tasks() == before


@gen_test
@pytest.mark.parametrize(
    ("keep_warm", "expected"),
    [(None, timedelta(hours=1)), ("600", timedelta(minutes=10)), ("0", timedelta(0)),
     ("all", None), ("ALL", None)],
)
async def test_server_starts_and_stops_the_refresher(keep_warm, expected):
    gateway = build_gateway(
        make_config(REFRESH_INTERVAL_SECONDS="5", REFRESH_AHEAD_SECONDS="600",
                    REFRESH_MAX_PER_MINUTE="120", REFRESH_KEEP_WARM_SECONDS=keep_warm)
    )
    refresher = start_refresher(gateway)
    assert refresher is not None and refresher.running
    # The gateway's one AccountService, not a second one built for the refresher.
    assert refresher._accounts is gateway.accounts
    assert refresher.interval == 5 and refresher.ahead == timedelta(seconds=600)
    assert refresher.batch_size == 120
    assert refresher.keep_warm == expected
    await refresher.stop()
    assert not refresher.running


@gen_test
async def test_the_refresher_window_holds_whatever_the_service_skew(make_store, sandbox, tiktok):
    """The refresher shares the access-token endpoint's AccountService, whose skew (300 s
    here) is narrower than the refresher's window: each keeps its own."""
    async with make_store() as store:
        picked = await connect(store, sandbox, "picked", expires_in=timedelta(minutes=30))
        shared = AccountService(store=store, tiktok=tiktok, refresh_skew_seconds=300)

        summary = await refresher_for(store, shared).run_once()

        assert (summary.due, summary.outcomes) == (1, {RefreshOutcome.REFRESHED.value: 1})
        refreshed = await store.get_account(picked.id)
        assert refreshed.access_token_expires_at > utc_now() + REFRESHED
        # On demand the service keeps its 300 s skew: 30 minutes from expiry is not due.
        asked = await connect(store, sandbox, "asked", expires_in=timedelta(minutes=30))
        assert await shared.refresh_account(asked) is RefreshOutcome.NOT_DUE
        assert sandbox.stats["token_refresh"] == 1


def test_refresher_refuses_bad_settings():
    store = MemoryStore()
    tiktok = tiktok_for("http://127.0.0.1:9")
    narrow = AccountService(store=store, tiktok=tiktok, refresh_skew_seconds=300)
    with pytest.raises(ValueError, match="interval"):
        Refresher(store=store, accounts=narrow, ahead_seconds=60, interval_seconds=0)
    with pytest.raises(ValueError, match="keep_warm"):
        Refresher(store=store, accounts=narrow, ahead_seconds=60, keep_warm_seconds=-1)


def test_configuration():
    config = make_config()
    assert config.refresh_interval_seconds == 60
    assert config.refresh_ahead_seconds == 3600
    assert config.refresh_max_per_minute == 300
    assert config.refresh_keep_warm_seconds == 3600
    assert config.webhook_tolerance_seconds == 72 * 3600  # TikTok's retry window
    for name, value in [
        ("REFRESH_KEEP_WARM_SECONDS", "-1"),
        ("REFRESH_KEEP_WARM_SECONDS", "forever"),
        ("REFRESH_INTERVAL_SECONDS", "-1"),
        ("REFRESH_INTERVAL_SECONDS", "nan"),
        ("REFRESH_AHEAD_SECONDS", "0"),
        ("REFRESH_MAX_PER_MINUTE", "601"),  # over TikTok's own limit
        ("REFRESH_MAX_PER_MINUTE", "0"),
        ("WEBHOOK_TOLERANCE_SECONDS", "0"),
    ]:
        with pytest.raises(ConfigError, match=name):
            make_config(**{name: value})

"""Background refresh: keep connected accounts' access tokens ahead of their expiry.

Every ``interval`` seconds one round asks the store for the connected accounts
whose access token expires within ``ahead`` seconds (soonest first) and hands
each to ``AccountService.refresh_account``, the one refresh path. That method
takes the account's lease in the store, so several gateway processes running
this loop never refresh one account twice; it also turns an expired refresh
token into ``reauthorization_required`` without calling TikTok, and never
raises for TikTok faults.

Calls are bounded twice: at most ``concurrency`` refreshes in flight, and their
starts spaced ``60 / max_per_minute`` seconds apart, so this process stays under
its share of TikTok's 600 requests per minute whatever the backlog.

An account whose refresh failed without a verdict (TikTok unavailable, or an
error) is not retried every round: it waits ``interval`` seconds after the first
failure, then twice as long after each next one, up to ``MAX_BACKOFF_SECONDS``,
and is counted ``deferred`` meanwhile. Any other outcome clears its wait. The
waits are this process's own; the access-token endpoint still refreshes on demand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services.accounts import AccountService, RefreshOutcome
from services.budget import Priority, call_priority
from services.connect import utcnow
from services.errors import GatewayError
from storage.base import Account, Store

log = logging.getLogger("gateway.refresher")

DEFAULT_INTERVAL_SECONDS = 60.0
DEFAULT_AHEAD_SECONDS = 3600
DEFAULT_MAX_PER_MINUTE = 300
DEFAULT_CONCURRENCY = 4
DEFAULT_STOP_GRACE_SECONDS = 10.0
# Counted when refresh_account raised instead of answering an outcome (a bug or a
# store fault): the account is retried after its wait, the others carry on.
ERROR = "error"
# Outcomes after which the account waits before its next attempt, and what it does then.
RETRY_LATER = frozenset({RefreshOutcome.UNAVAILABLE.value, ERROR})
DEFERRED = "deferred"
MAX_BACKOFF_SECONDS = 900.0

Sleep = Callable[[float], Awaitable[Any]]


class RateLimiter:
    """Spaces acquisitions ``60 / per_minute`` seconds apart on a monotonic clock.

    Waiters queue behind one lock, so any 60-second window holds at most
    ``per_minute`` acquisitions, and a fake clock advanced by a fake sleep gives
    exactly the times a real run would.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be greater than 0")
        self.spacing = 60.0 / per_minute
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = self._clock()
            if self._next is not None and self._next > now:
                await self._sleep(self._next - now)
                now = self._clock()
            self._next = now + self.spacing


@dataclass
class RoundSummary:
    due: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        counts = ", ".join(f"{name}={n}" for name, n in sorted(self.outcomes.items()))
        return f"{self.due} due" + (f": {counts}" if counts else "")


class Refresher:
    def __init__(
        self,
        *,
        store: Store,
        accounts: AccountService,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        ahead_seconds: int = DEFAULT_AHEAD_SECONDS,
        max_per_minute: int = DEFAULT_MAX_PER_MINUTE,
        concurrency: int = DEFAULT_CONCURRENCY,
        batch_size: int | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be greater than 0 (0 means: no refresher)")
        if concurrency <= 0:
            raise ValueError("concurrency must be greater than 0")
        if accounts.refresh_skew < timedelta(seconds=ahead_seconds):
            # refresh_account would answer not_due for every account the round picks
            # between the two windows.
            raise ValueError(
                "the AccountService's refresh skew must cover ahead_seconds; build it with "
                "refresh_skew_seconds=ahead_seconds"
            )
        self._store = store
        self._accounts = accounts
        self.interval = interval_seconds
        self.ahead = timedelta(seconds=ahead_seconds)
        self.concurrency = concurrency
        # One round takes at most what the rate allows in one minute; the rest wait
        # for the next round, soonest expiry first.
        self.batch_size = batch_size or max_per_minute
        self._limiter = RateLimiter(max_per_minute, clock=monotonic, sleep=sleep)
        self._monotonic = monotonic
        # Account id -> (failed attempts in a row, not before this monotonic time).
        self._backoff: dict[str, tuple[int, float]] = {}
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[RefreshOutcome]] = set()
        self._stopping = False
        self.rounds = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- one round --------------------------------------------------------------

    async def run_once(self, now: datetime | None = None) -> RoundSummary:
        """Refresh what is due at ``now``; never raises for one account's failure."""
        now = now or self._clock()
        due = await self._store.accounts_due_for_refresh(now + self.ahead, limit=self.batch_size)
        summary = RoundSummary(due=len(due))
        # Accounts no longer due (refreshed elsewhere, disconnected) are forgotten:
        # the waits never outnumber one round's batch.
        due_ids = {account.id for account in due}
        for account_id in [a for a in self._backoff if a not in due_ids]:
            del self._backoff[account_id]
        ready = [account for account in due if not self._waiting(account.id)]
        if len(ready) < len(due):
            summary.outcomes[DEFERRED] = len(due) - len(ready)
        queue = iter(ready)

        async def worker() -> None:
            # next() on a shared iterator never awaits: each account goes to one worker.
            for account in queue:
                summary.outcomes[await self._refresh_one(account, now)] += 1

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(ready)))))
        self.rounds += 1
        if due:
            log.info("refresh round: %s", summary.describe())
        else:
            log.debug("refresh round: nothing due")
        return summary

    def _waiting(self, account_id: str) -> bool:
        entry = self._backoff.get(account_id)
        return entry is not None and entry[1] > self._monotonic()

    def _record(self, account_id: str, outcome: str) -> str:
        if outcome in RETRY_LATER:
            failures = self._backoff.get(account_id, (0, 0.0))[0] + 1
            wait = min(self.interval * 2 ** min(failures - 1, 16), MAX_BACKOFF_SECONDS)
            self._backoff[account_id] = (failures, self._monotonic() + wait)
        else:
            self._backoff.pop(account_id, None)
        return outcome

    async def _refresh_one(self, account: Account, now: datetime) -> str:
        return self._record(account.id, await self._attempt(account, now))

    async def _attempt(self, account: Account, now: datetime) -> str:
        try:
            expired = account.refresh_token_expires_at
            if expired is None or expired > now:
                # Only calls that may reach TikTok spend the budget; refresh_account
                # settles a dead refresh token without asking TikTok.
                await self._limiter.acquire()
            # The task keeps this priority: its TikTok calls draw on the background share.
            with call_priority(Priority.BACKGROUND):
                task = asyncio.ensure_future(self._accounts.refresh_account(account))
            self._in_flight.add(task)
            task.add_done_callback(self._settled)
            # Shielded: stop() cancels the round, but a refresh that may have reached
            # TikTok (which rotates the refresh token) finishes and saves its tokens.
            outcome = await asyncio.shield(task)
            return outcome.value
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, GatewayError):
                log.warning("refresh of account %s failed: %s", account.id,
                            exc.technical_message or exc.message)
            else:
                log.exception("refresh of account %s failed unexpectedly", account.id)
            return ERROR

    def _settled(self, task: asyncio.Task[RefreshOutcome]) -> None:
        self._in_flight.discard(task)
        # Retrieve the error here too: a refresh outlives its round when stop() cancels it.
        if not task.cancelled() and task.exception() is not None and self._stopping:
            log.warning("a refresh finishing during shutdown failed: %r", task.exception())

    # -- the loop ---------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="tiktok-token-refresher")
        log.info(
            "background refresh every %gs of tokens expiring within %ds, at most %d "
            "in flight and %.0f per minute",
            self.interval,
            self.ahead.total_seconds(),
            self.concurrency,
            60 / self._limiter.spacing,
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except GatewayError as exc:
                log.warning("refresh round skipped: %s", exc.technical_message or exc.message)
            except Exception:
                log.exception("refresh round failed")
            await self._sleep(self.interval)

    async def stop(self, grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS) -> None:
        """End the loop: no new refresh starts; those in flight get ``grace_seconds``."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        in_flight = set(self._in_flight)
        if not in_flight:
            return
        _, late = await asyncio.wait(in_flight, timeout=grace_seconds)
        for pending in late:
            # The lease expires on its own; the account is picked up again later.
            pending.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        log.info("background refresh stopped (%d refresh(es) cancelled)", len(late))

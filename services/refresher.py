"""Background refresh: keep recently used accounts' access tokens ahead of their expiry.

Every ``interval`` seconds one round first marks ``reauthorization_required`` the
connected accounts whose refresh token has expired (one indexed update, no call
to TikTok: TikTok's refresh tokens live 180 days and a refresh does not renew
them). Then it asks the store for the connected accounts whose access token
expires within ``ahead`` seconds (soonest first) and hands each to
``AccountService.refresh_account`` with ``ahead`` as its window: the one refresh
path, in the same service the access-token endpoint uses. That method takes the
account's lease in the store, so several gateway processes running this loop
never refresh one account twice, and it never raises for TikTok faults.

Which accounts are kept warm (``keep_warm_seconds``, REFRESH_KEEP_WARM_SECONDS):
those whose token the access-token endpoint handed out within the last
``keep_warm_seconds`` (default one hour: a product that used an account lately
finds a fresh token next time); ``None`` keeps every connected account warm
(about 12 to 24 TikTok calls per account per day with two-hour tokens); ``0``
keeps none, and the refresher only marks expired refresh tokens. Every other
account is refreshed on demand by the access-token endpoint.

Calls are bounded twice: at most ``concurrency`` refreshes in flight, and their
starts spaced ``60 / max_per_minute`` seconds apart, so this process stays under
its share of TikTok's 600 requests per minute whatever the backlog.

An account whose refresh failed without a verdict (TikTok unavailable, or an
error) is not retried every round: it waits ``interval`` seconds after the first
failure, then twice as long after each next one, up to ``MAX_BACKOFF_SECONDS``.
The wait is stored on the account (``Store.defer_refresh``), so every process's
query leaves it out until then; success and every verdict clear it. The
access-token endpoint still refreshes on demand meanwhile.
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

from core.clock import utcnow
from core.errors import GatewayError
from services.accounts import AccountService, RefreshOutcome
from services.background import cancel_and_wait, finish_or_cancel, run_guarded
from services.budget import Priority, call_priority
from services.events import REFRESH_TOKEN_EXPIRED
from storage.base import Account, Store

log = logging.getLogger("gateway.refresher")

DEFAULT_INTERVAL_SECONDS = 60.0
DEFAULT_AHEAD_SECONDS = 3600
DEFAULT_KEEP_WARM_SECONDS = 3600
DEFAULT_MAX_PER_MINUTE = 300
DEFAULT_CONCURRENCY = 4
DEFAULT_STOP_GRACE_SECONDS = 10.0
# Counted when refresh_account raised instead of answering an outcome (a bug or a
# store fault): the account is retried after its wait, the others carry on.
ERROR = "error"
# Outcomes after which the account waits before its next attempt.
RETRY_LATER = frozenset({RefreshOutcome.UNAVAILABLE.value, RefreshOutcome.UNKNOWN.value, ERROR})
# Another holder (maybe another process) is refreshing it: its outcome decides the wait.
KEEP_WAIT = frozenset({RefreshOutcome.BUSY.value})
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
    # Accounts told this round that their refresh token expires soon.
    expiry_notices: int = 0

    def describe(self) -> str:
        counts = ", ".join(f"{name}={n}" for name, n in sorted(self.outcomes.items()))
        notices = f"; {self.expiry_notices} expiry notice(s)" if self.expiry_notices else ""
        return f"{self.due} due" + (f": {counts}" if counts else "") + notices


class Refresher:
    def __init__(
        self,
        *,
        store: Store,
        accounts: AccountService,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        ahead_seconds: int = DEFAULT_AHEAD_SECONDS,
        keep_warm_seconds: int | None = DEFAULT_KEEP_WARM_SECONDS,
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
        if keep_warm_seconds is not None and keep_warm_seconds < 0:
            raise ValueError("keep_warm_seconds must be 0 or more (None: keep all warm)")
        self._store = store
        self._accounts = accounts
        self.interval = interval_seconds
        self.ahead = timedelta(seconds=ahead_seconds)
        self.keep_warm = None if keep_warm_seconds is None else timedelta(seconds=keep_warm_seconds)
        self.concurrency = concurrency
        # One round takes at most what the rate allows in one minute; the rest wait
        # for the next round, soonest expiry first.
        self.batch_size = batch_size or max_per_minute
        self._limiter = RateLimiter(max_per_minute, clock=monotonic, sleep=sleep)
        self._monotonic = monotonic
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
        summary = RoundSummary()
        events = self._accounts.events
        expired = await self._store.expire_refresh_tokens(
            now=now, event_factory=events.reauthorization_required(REFRESH_TOKEN_EXPIRED)
        )
        if expired:
            summary.outcomes[RefreshOutcome.REFRESH_TOKEN_EXPIRED.value] = expired
        # Refresh tokens expiring soon: the user should connect again (once per grant).
        summary.expiry_notices = await self._store.record_expiry_notices(
            now=now,
            expiring_by=now + events.expiry_notice,
            limit=self.batch_size,
            event_factory=events.reauthorization_due(),
        )
        if expired or summary.expiry_notices:
            events.relay_soon()
        due: list[Account] = []
        if self.keep_warm != timedelta(0):
            due = await self._store.accounts_due_for_refresh(
                now + self.ahead,
                limit=self.batch_size,
                now=now,  # leaves out the accounts waiting out a backoff
                used_since=None if self.keep_warm is None else now - self.keep_warm,
            )
        summary.due = len(due)
        queue = iter(due)

        async def worker() -> None:
            # next() on a shared iterator never awaits: each account goes to one worker.
            for account in queue:
                summary.outcomes[await self._refresh_one(account, now)] += 1

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(due)))))
        self.rounds += 1
        if summary.outcomes or summary.expiry_notices:
            log.info("refresh round: %s", summary.describe())
        else:
            log.debug("refresh round: nothing due")
        return summary

    async def _refresh_one(self, account: Account, now: datetime) -> str:
        outcome = await self._attempt(account, now)
        try:
            await self._record(account, outcome)
        except GatewayError as exc:
            # The next round sees the account as it was: tried again, not lost.
            log.warning("backoff of account %s not stored: %s", account.id,
                        exc.technical_message or exc.message)
        return outcome

    async def _record(self, account: Account, outcome: str) -> None:
        if outcome in RETRY_LATER:
            failures = account.refresh_failures + 1
            wait = min(self.interval * 2 ** min(failures - 1, 16), MAX_BACKOFF_SECONDS)
            retry_at = self._clock() + timedelta(seconds=wait)
            await self._store.defer_refresh(account.id, retry_at=retry_at, failures=failures)
        elif outcome not in KEEP_WAIT and (account.refresh_failures or account.refresh_retry_at):
            await self._store.clear_refresh_retry(account.id)

    async def _attempt(self, account: Account, now: datetime) -> str:
        try:
            expired = account.refresh_token_expires_at
            if expired is None or expired > now:
                # Only calls that may reach TikTok spend the budget; refresh_account
                # settles a dead refresh token without asking TikTok.
                await self._limiter.acquire()
            # The task keeps this priority: its TikTok calls draw on the background share.
            with call_priority(Priority.BACKGROUND):
                task = asyncio.ensure_future(
                    self._accounts.refresh_account(account, due_within=self.ahead)
                )
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
        if self.keep_warm is None:
            warm = "every connected account"
        elif self.keep_warm:
            warm = f"accounts used in the last {self.keep_warm.total_seconds():.0f}s"
        else:
            warm = "no account (expired refresh tokens only)"
        log.info(
            "background refresh every %gs of tokens expiring within %ds, for %s, at most "
            "%d in flight and %.0f per minute",
            self.interval,
            self.ahead.total_seconds(),
            warm,
            self.concurrency,
            60 / self._limiter.spacing,
        )

    async def _run(self) -> None:
        while True:
            started = self._monotonic()
            await run_guarded(self.run_once, log, skipped="refresh round skipped: %s",
                              failed="refresh round failed")
            # Rounds start every interval: a round that spent it waiting for its pace
            # (a backlog) is followed at once, so a busy refresher keeps its
            # max_per_minute instead of idling a whole interval after each round.
            await self._sleep(max(self.interval - (self._monotonic() - started), 0.0))

    async def stop(self, grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS) -> None:
        """End the loop: no new refresh starts; those in flight get ``grace_seconds``."""
        self._stopping = True
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if not self._in_flight:
            return
        # A cancelled refresh's lease expires on its own; the account is picked up again.
        cancelled = await finish_or_cancel(self._in_flight, grace_seconds)
        log.info("background refresh stopped (%d refresh(es) cancelled)", cancelled)

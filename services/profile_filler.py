"""Background profile filler: load the profiles that callbacks left pending.

A callback whose profile call TikTok could not answer in time (429, 5xx, a timeout,
no free connection or budget left) still connects the account, with its profile
pending (``services.connect``). Every ``interval`` seconds one round takes the
pending profiles that are due, the one due longest first, each claimed in the store
with a lease (``Store.claim_profile_fill``): several gateway processes running this
loop never fetch one profile at once, and a process that dies mid-fetch holds its
claim no longer than the lease. Each is fetched at background priority, so
interactive work (callbacks, product token requests) comes first in the shared
TikTok budget, and at most ``max_per_minute`` start per minute in this process.

A failed attempt puts the account back with a growing wait, stored on the account
(``Store.defer_profile_fill``) so every process honours it. TikTok being busy or
unreachable also ends the round: the rest wait for the next one rather than meet
the same answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.clock import utcnow
from core.errors import GatewayError, ServiceUnavailable
from services.background import cancel_and_wait, run_guarded
from services.metrics import GatewayMetrics
from services.refresher import RateLimiter
from services.scopes import user_fields_for
from services.tiktok import BACKGROUND, ProfileRefused, TikTokClient
from storage.base import ProfileClaim, Store

log = logging.getLogger("gateway.profile_filler")

DEFAULT_INTERVAL_SECONDS = 5.0
DEFAULT_CONCURRENCY = 4
# Most profiles one round loads; the rest wait for the next round.
DEFAULT_BATCH_SIZE = 200
# TikTok allows 600 user-info calls a minute per app: background work takes half.
DEFAULT_MAX_PER_MINUTE = 300
# A claim not saved or deferred within this is due again (its holder died).
LEASE_SECONDS = 60.0
# One fill's TikTok call, retries included: well inside the lease.
CALL_SECONDS = 15.0
FIRST_BACKOFF_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 3600.0

FILLED = "filled"
UNAVAILABLE = "unavailable"
REFUSED = "refused"
NO_TOKENS = "no_tokens"
ERROR = "error"

Sleep = Callable[[float], Awaitable[Any]]


def backoff_seconds(failures: int, retry_after: float | None = None) -> float:
    """The wait after ``failures`` failed attempts in a row (this one included),
    doubling from FIRST_BACKOFF_SECONDS up to MAX_BACKOFF_SECONDS, jittered so the
    accounts of one outage do not all come back at once."""
    wait: float = min(FIRST_BACKOFF_SECONDS * 2 ** min(failures - 1, 16), MAX_BACKOFF_SECONDS)
    wait *= random.uniform(0.8, 1.2)  # noqa: S311 - spreading retries, not a secret
    return max(wait, retry_after or 0.0)


@dataclass
class FillRound:
    outcomes: Counter[str] = field(default_factory=Counter)
    # Connected accounts whose profile is still pending after the round.
    pending: int = 0

    def describe(self) -> str:
        counts = ", ".join(f"{name}={n}" for name, n in sorted(self.outcomes.items()))
        return f"{counts or 'nothing due'}; {self.pending} pending"


class ProfileFiller:
    def __init__(
        self,
        *,
        store: Store,
        tiktok: TikTokClient,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        concurrency: int = DEFAULT_CONCURRENCY,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_per_minute: int = DEFAULT_MAX_PER_MINUTE,
        lease_seconds: float = LEASE_SECONDS,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        metrics: GatewayMetrics | None = None,
        holder: str | None = None,
    ) -> None:
        if interval_seconds <= 0 or concurrency <= 0 or batch_size <= 0:
            raise ValueError("interval_seconds, concurrency and batch_size must be > 0")
        self._store = store
        self._tiktok = tiktok
        self.interval = interval_seconds
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.lease = timedelta(seconds=lease_seconds)
        self._limiter = RateLimiter(max_per_minute, clock=monotonic, sleep=sleep)
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics or GatewayMetrics()
        # Names this process's claims in the store.
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- one round --------------------------------------------------------------

    async def run_once(self, now: datetime | None = None) -> FillRound:
        """Fill the profiles due (at ``now``, default the clock); never raises for
        one account's failure."""
        summary = FillRound()
        claims = 0
        stop = False

        async def worker() -> None:
            nonlocal claims, stop
            while not stop and claims < self.batch_size:
                claims += 1
                # Paced before the claim, so no claim is held while waiting.
                await self._limiter.acquire()
                moment = now or self._clock()
                claim = await self._store.claim_profile_fill(
                    self.holder, now=moment, until=moment + self.lease
                )
                if claim is None:
                    return
                outcome = await self._fill(claim, moment)
                summary.outcomes[outcome] += 1
                self._metrics.profile_fill(outcome)
                # TikTok (or the store) busy: the next round tries again.
                stop = stop or outcome == UNAVAILABLE

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        summary.pending = await self._store.count_pending_profiles()
        self._metrics.profiles_pending.set(summary.pending)
        self.rounds += 1
        if summary.outcomes:
            log.info("profile fill round: %s", summary.describe())
        return summary

    async def _fill(self, claim: ProfileClaim, now: datetime) -> str:
        account = claim.account
        try:
            tokens = await self._store.get_account_tokens(account.id)
            if tokens is None:
                # Disconnected meanwhile: no longer a connected account, never claimed again.
                return NO_TOKENS
            user = await self._tiktok.fetch_user(
                tokens.access_token,
                user_fields_for(account.scopes),
                deadline=time.monotonic() + CALL_SECONDS,
                priority=BACKGROUND,
            )
            await self._store.save_account_profile(account.id, user.fields, now=self._clock())
            return FILLED
        except asyncio.CancelledError:
            raise  # stopping: the claim's lease runs out on its own
        except ProfileRefused as exc:
            # Likely an access token that died: a refresh (on demand or the
            # refresher's) gives the next attempt a live one.
            outcome, retry_after, cause = REFUSED, None, exc.technical_message
        except ServiceUnavailable as exc:
            outcome, retry_after, cause = UNAVAILABLE, exc.retry_after, exc.technical_message
        except Exception as exc:
            if isinstance(exc, GatewayError):
                cause = exc.technical_message or exc.message
            else:
                log.exception("profile fill of account %s failed unexpectedly", account.id)
                cause = type(exc).__name__
            outcome, retry_after = ERROR, None
        wait = backoff_seconds(claim.failures + 1, retry_after)
        log.info("profile of account %s not loaded (%s): next attempt in %.0fs",
                 account.id, cause, wait)
        try:
            await self._store.defer_profile_fill(
                account.id, self.holder, retry_at=now + timedelta(seconds=wait)
            )
        except GatewayError as exc:
            log.warning("could not defer the profile of account %s (%s); due again after "
                        "its lease", account.id, exc.technical_message or exc.message)
        return outcome

    # -- the loop ---------------------------------------------------------------

    def start(self, after: asyncio.Future[Any] | None = None) -> None:
        """Run a round every ``interval`` seconds, the first once ``after`` (the
        store's start-up: its indexes come before this loop's first query) is done."""
        if self.running:
            return
        self._task = asyncio.create_task(self._run(after), name="tiktok-profile-filler")
        log.info("background profile filler every %gs, at most %d in flight",
                 self.interval, self.concurrency)

    async def _run(self, after: asyncio.Future[Any] | None) -> None:
        if after is not None:
            await asyncio.wait([after])  # never cancels it
            if after.cancelled() or after.exception() is not None or after.result() is False:
                # The store never got its indexes (logged at start-up): nothing to fill.
                return
        while True:
            await run_guarded(self.run_once, log, skipped="profile fill round skipped: %s",
                              failed="profile fill round failed")
            await self._sleep(self.interval)

    async def stop(self) -> None:
        """End the loop now: a fetch in flight is dropped, its claim expires."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

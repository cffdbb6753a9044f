"""TikTok's rate limits as one budget per endpoint, shared by every gateway process.

TikTok counts an app's calls per endpoint in a one-minute sliding window (600 to
``/v2/user/info/``), whichever process or machine makes them. Every call takes a
permit here first. ``Store.admit_call`` keeps the times of the last N admitted calls
in the store (one MongoDB document per endpoint) and admits a call only when the
N-th most recent is at least the window old, judged and recorded in one atomic
update by the database's clock. So N+1 admitted calls always span the window and no
window, anywhere, holds more than N, whatever the number of processes. (A token
bucket of burst N would let 2N through in one minute: a full bucket, then its refill.)

Margin: TikTok sees a call when it arrives, a little after we admitted it, and that
delay varies (a wait for a free connection, connecting, transit), while the window
is judged on one clock. Each window is kept ``margin_seconds`` longer than TikTok's,
which covers any variation of that delay up to the margin. A time margin rather than
a few calls below the limit: a burst right after a window's last slot would still
land within TikTok's window, whatever the number of calls held back.

Priorities: interactive calls (a callback, a product asking for a token) may use
the whole budget; background ones (keep-warm refreshes, profile filling) at most
``background_share`` of it in any window, so a burst of users always finds room,
and within a process they step aside while interactive calls wait. A call that finds
no room waits for the next free slot until its deadline, then raises ``RateLimited``.

Fail-safe: when the store cannot be asked, interactive calls go on within this
process's own sliding window of ``fallback_share`` of each limit, and background
calls pause (raise ``StoreUnavailable``) until the store answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from core.errors import RateLimited, StoreUnavailable
from services.metrics import GatewayMetrics
from storage.base import CALL_BUDGETS, CallAdmission, Store, judge_call

log = logging.getLogger("gateway.budget")

DEFAULT_MARGIN_SECONDS = 1.0
DEFAULT_BACKGROUND_SHARE = 0.5
DEFAULT_FALLBACK_SHARE = 0.1
# After the store failed to answer, calls use the local share this long before
# asking it again, rather than each waiting for the store's timeout first.
STORE_RETRY_SECONDS = 5.0
# How often a background waiter looks again while interactive calls wait.
STEP_ASIDE_SECONDS = 0.05

# TikTokClient's endpoint labels -> budget: a refresh is a call to the token endpoint.
ENDPOINT_BUDGETS = {
    "token": "token",
    "refresh": "token",
    "revoke": "revoke",
    "user_info": "user_info",
}


class Priority(enum.StrEnum):
    INTERACTIVE = "interactive"
    BACKGROUND = "background"


_priority: ContextVar[Priority] = ContextVar("tiktok_call_priority", default=Priority.INTERACTIVE)


def current_priority() -> Priority:
    return _priority.get()


@contextlib.contextmanager
def call_priority(priority: Priority) -> Iterator[None]:
    """TikTok calls made inside, tasks created inside included, draw on ``priority``."""
    token = _priority.set(priority)
    try:
        yield
    finally:
        _priority.reset(token)


@dataclass(frozen=True)
class RateLimit:
    calls: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.calls}/{self.seconds:g}s"


# TikTok documents 600 per minute for user info, no limit for token and revoke.
DEFAULT_RATE_LIMITS: Mapping[str, RateLimit] = {"user_info": RateLimit(600, 60.0)}


def share_of(limit: RateLimit, share: float) -> int:
    """The calls ``share`` of ``limit`` allows, rounded down (never above the share)."""
    return math.floor(limit.calls * share + 1e-9)


class CallBudget(Protocol):
    """What ``TikTokClient`` needs: a permit before each call."""

    async def acquire(
        self, budget: str, priority: Priority | None = None, deadline: float | None = None
    ) -> CallAdmission | None: ...


class SlidingWindow:
    """This process's own log of admitted calls: the share it uses alone."""

    def __init__(self, limit: int, window_seconds: float) -> None:
        self.limit = limit
        self.window = window_seconds
        self._calls: list[float] = []

    def admit(self, now: float) -> CallAdmission:
        return judge_call(self._calls, [], now, limit=self.limit, window_seconds=self.window,
                          background=False, background_limit=None)


class _Budget:
    """One endpoint's budget, and what this process knows of it."""

    def __init__(
        self, name: str, limit: RateLimit, margin: float, background_share: float,
        fallback_share: float,
    ) -> None:
        self.name = name
        self.limit = limit
        self.window = limit.seconds + margin
        self.background_limit = share_of(limit, background_share)
        fallback = share_of(limit, fallback_share)
        self.local = SlidingWindow(fallback, self.window) if fallback else None
        self.waiting = dict.fromkeys(Priority, 0)
        # One waiter per priority asks the store at a time; the others would only
        # hammer it for a slot that is not there yet.
        self.turns = {priority: asyncio.Lock() for priority in Priority}
        # The last answer of the store, and when (monotonic) it came: /metrics.
        self.seen: tuple[CallAdmission, float] | None = None

    def used(self, now: float) -> int:
        if self.seen is None:
            return 0
        admission, at = self.seen
        return sum(1 for left in admission.leaving if left > now - at)


class BudgetSettings(Protocol):
    """The settings ``TikTokBudget.from_config`` reads: ``services.config.Config`` has
    them. Named here, not imported: the configuration imports this module's defaults."""

    @property
    def tiktok_rate_limits(self) -> Iterable[tuple[str, RateLimit]]: ...
    @property
    def tiktok_rate_limit_margin_seconds(self) -> float: ...
    @property
    def tiktok_background_share(self) -> float: ...
    @property
    def tiktok_fallback_share(self) -> float: ...


class TikTokBudget:
    """The gateway's permits to call TikTok, per endpoint; see the module docstring.

    ``clock``: the time each call is judged by; None (production) takes the store's
    own clock, the one clock of every process. ``monotonic`` and ``sleep`` are for
    waiting, and deadlines are ``monotonic`` seconds.
    """

    def __init__(
        self,
        store: Store,
        limits: Mapping[str, RateLimit] = DEFAULT_RATE_LIMITS,
        *,
        margin_seconds: float = DEFAULT_MARGIN_SECONDS,
        background_share: float = DEFAULT_BACKGROUND_SHARE,
        fallback_share: float = DEFAULT_FALLBACK_SHARE,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        unknown = sorted(set(limits) - set(CALL_BUDGETS))
        if unknown:
            raise ValueError(f"no TikTok budget named {', '.join(unknown)}")
        if margin_seconds < 0:
            raise ValueError("margin_seconds must be 0 or more")
        if not 0 < background_share <= 1 or not 0 <= fallback_share <= 1:
            raise ValueError("background_share must be in (0, 1], fallback_share in [0, 1]")
        self._store = store
        self._budgets = {
            name: _Budget(name, limit, margin_seconds, background_share, fallback_share)
            for name, limit in limits.items()
        }
        for budget in self._budgets.values():
            if not budget.background_limit:
                raise ValueError(f"background_share leaves no call of {budget.name}={budget.limit}")
        self._metrics = metrics or GatewayMetrics()
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._store_down_until: float | None = None
        for budget in self._budgets.values():
            self._metrics.budget_declared(budget.name, budget.limit.calls,
                                          budget.background_limit)
        self._metrics.before_render(self._report_use)

    @classmethod
    def from_config(
        cls, config: BudgetSettings, store: Store, *, metrics: GatewayMetrics | None = None
    ) -> TikTokBudget:
        return cls(
            store,
            dict(config.tiktok_rate_limits),
            margin_seconds=config.tiktok_rate_limit_margin_seconds,
            background_share=config.tiktok_background_share,
            fallback_share=config.tiktok_fallback_share,
            metrics=metrics,
        )

    @property
    def limits(self) -> dict[str, RateLimit]:
        return {name: budget.limit for name, budget in self._budgets.items()}

    async def acquire(
        self, budget: str, priority: Priority | None = None, deadline: float | None = None
    ) -> CallAdmission | None:
        """Return once one call to ``budget`` is admitted: the admission (None at once
        when ``budget`` has no limit).

        ``priority``: default the caller's context (``call_priority``), interactive
        unless set. ``deadline`` (``monotonic`` seconds): how long the call may wait for
        room; None: not at all. Raises ``RateLimited`` when there is no room before
        the deadline, ``StoreUnavailable`` for a background call (or with no local
        share) while the store cannot be asked.
        """
        state = self._budgets.get(budget)
        if state is None:
            return None
        priority = priority or current_priority()
        admission: CallAdmission | None = None
        # Behind waiters of the same priority (or, for background, of interactive
        # calls) there is no room yet: queue without asking.
        if not state.waiting[priority] and not self._stepping_aside(state, priority):
            admission = await self._ask(state, priority)
            if admission.admitted:
                return admission
        state.waiting[priority] += 1
        try:
            return await self._wait(state, priority, deadline, admission)
        finally:
            state.waiting[priority] -= 1

    def _stepping_aside(self, state: _Budget, priority: Priority) -> bool:
        return priority is Priority.BACKGROUND and state.waiting[Priority.INTERACTIVE] > 0

    async def _wait(
        self,
        state: _Budget,
        priority: Priority,
        deadline: float | None,
        admission: CallAdmission | None,
    ) -> CallAdmission:
        turn = state.turns[priority]
        deferred = False
        if turn.locked():
            admission = None  # stale by the time our turn comes
            remaining = -1.0 if deadline is None else deadline - self._monotonic()
            if remaining <= 0:
                raise self._refused(state, priority, None)
            self._metrics.budget_wait(state.name, priority.value)
            deferred = True
            try:
                await asyncio.wait_for(turn.acquire(), remaining)
            except TimeoutError:
                raise self._refused(state, priority, None) from None
        else:
            await turn.acquire()
        try:
            while True:
                if admission is None and not self._stepping_aside(state, priority):
                    admission = await self._ask(state, priority)
                    if admission.admitted:
                        return admission
                wait = admission.retry_after if admission else STEP_ASIDE_SECONDS
                if deadline is None or self._monotonic() + wait > deadline:
                    raise self._refused(state, priority, admission)
                if not deferred:
                    self._metrics.budget_wait(state.name, priority.value)
                    deferred = True
                await self._sleep(wait)
                admission = None
        finally:
            turn.release()

    async def _ask(self, state: _Budget, priority: Priority) -> CallAdmission:
        background = priority is Priority.BACKGROUND
        if self._store_down_until is not None and self._monotonic() < self._store_down_until:
            return self._without_store(state, priority, None)
        try:
            admission = await self._store.admit_call(
                state.name,
                limit=state.limit.calls,
                window_seconds=state.window,
                background=background,
                background_limit=state.background_limit if background else None,
                now=self._clock() if self._clock is not None else None,
            )
        except StoreUnavailable as exc:
            if self._store_down_until is None:
                log.warning(
                    "TikTok budgets: the store cannot be asked (%s); interactive calls use "
                    "this process's share, background calls pause",
                    exc.technical_message or exc.message,
                )
            self._store_down_until = self._monotonic() + STORE_RETRY_SECONDS
            return self._without_store(state, priority, exc)
        if self._store_down_until is not None:
            log.info("TikTok budgets: the store answers again")
            self._store_down_until = None
        state.seen = (admission, self._monotonic())
        self._metrics.budget_use(state.name, admission.used, state.limit.calls)
        return self._counted(state, priority, admission, "admitted")

    def _counted(
        self, state: _Budget, priority: Priority, admission: CallAdmission, result: str
    ) -> CallAdmission:
        """``admission``, counted as ``result`` if it admits (one that refuses is counted
        by ``_refused``, once the caller stops waiting for room)."""
        if admission.admitted:
            self._metrics.budget_call(state.name, priority.value, result)
        return admission

    def _without_store(
        self, state: _Budget, priority: Priority, cause: StoreUnavailable | None
    ) -> CallAdmission:
        if priority is Priority.BACKGROUND or state.local is None:
            self._metrics.budget_call(state.name, priority.value, "paused")
            error = StoreUnavailable(
                technical_message=f"TikTok {state.name} budget: the store cannot be asked, "
                f"{priority.value} calls pause",
                details={"dependency": "mongodb", "budget": state.name},
            )
            raise error from cause
        return self._counted(state, priority, state.local.admit(self._monotonic()), "local")

    def _refused(
        self, state: _Budget, priority: Priority, admission: CallAdmission | None
    ) -> RateLimited:
        self._metrics.budget_call(state.name, priority.value, "refused")
        wait = admission.retry_after if admission else STEP_ASIDE_SECONDS
        return RateLimited(
            technical_message=f"TikTok {state.name} budget ({state.limit}) has no room for a "
            f"{priority.value} call before its deadline",
            details={"dependency": "tiktok", "endpoint": state.name, "reason": "rate_limit"},
            retry_after=max(1, math.ceil(wait)),
        )

    def _report_use(self) -> None:
        now = self._monotonic()
        for budget in self._budgets.values():
            self._metrics.budget_use(budget.name, budget.used(now), budget.limit.calls)

"""The gateway's Prometheus metrics, in a registry of its own.

One ``GatewayMetrics`` per gateway (``build_gateway`` makes it, or takes the
host's ``CollectorRegistry``), never the process-wide default registry, so
several gateways in one process (tests, a host mounting two) do not clash.
``GET /metrics`` renders it in Prometheus' text format.

Label values come from small fixed sets (outcome names, error codes, endpoint
names, HTTP statuses, store method names), never from request data. Children
are looked up once and kept, so the hot path is a dict lookup and an add.

With ``WORKERS=N`` each worker calls ``enable_multiprocess`` before building its
gateway: values then live in files under one directory (prometheus_client's
multiprocess mode), and a scrape, whichever worker answers it, reports the sum
over all workers, those that died included (their in-flight gauge excepted).
"""

from __future__ import annotations

import abc
import contextlib
import glob
import inspect
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar, overload

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from core.errors import (
    AuthorizationDenied,
    GatewayError,
    ServiceUnavailable,
    StateConflict,
    ValidationFailed,
)
from services.event_types import EVENT_TYPES
from storage.base import Account, Store

CONTENT_TYPE = CONTENT_TYPE_LATEST
CONNECTED = "connected"
# A callback that ended in something other than a GatewayError (a bug).
INTERNAL_ERROR = GatewayError.code
# What a callback can end in: connected, or the envelope's error code.
CALLBACK_OUTCOMES = (
    CONNECTED,
    *(
        error.code
        for error in (ValidationFailed, StateConflict, AuthorizationDenied, ServiceUnavailable)
    ),
    INTERNAL_ERROR,
)
# services.accounts.RefreshOutcome values, plus "error" when refreshing raised.
REFRESH_OUTCOMES = (
    "refreshed",
    "not_due",
    "reauthorization_required",
    "refresh_token_expired",
    "unavailable",
    "unknown",
    "superseded",
    "busy",
    "error",
)
# services.profile_filler outcomes: what one attempt to load a pending profile did.
PROFILE_FILL_OUTCOMES = ("filled", "unavailable", "refused", "no_tokens", "error")
# services.budget: what a permit asked by each priority can come to (the store
# answering: admitted or refused; not answering: local for interactive calls, paused
# for background ones).
BUDGET_RESULTS = {
    "interactive": ("admitted", "refused", "local"),
    "background": ("admitted", "refused", "paused"),
}
# TikTok answers in well under a second, times out at a few.
TIKTOK_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# prometheus_client's own variable: where the workers' metric files are.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def prepare_multiprocess_dir(configured: str | None) -> tuple[str, bool]:
    """For a supervisor about to fork workers: the directory their metrics go to, and
    whether it is a new temporary one (the supervisor removes it when it exits).
    ``configured`` (``PROMETHEUS_MULTIPROC_DIR``) when set, emptied of an earlier run's
    metric files."""
    if not configured:
        return tempfile.mkdtemp(prefix="tiktok-gateway-metrics-"), True
    os.makedirs(configured, exist_ok=True)
    # Only prometheus_client's own files: the directory may hold anything else.
    for kind in ("counter", "gauge", "histogram", "summary"):
        for path in glob.glob(os.path.join(configured, f"{kind}_*.db")):
            os.remove(path)
    return configured, False


def enable_multiprocess(directory: str) -> None:
    """From now on this process's metric values live in ``directory`` (a worker of
    ``WORKERS=N``; call it before any metric is made). Live gauges left by workers
    that died, say killed, are dropped so they no longer count."""
    os.environ[MULTIPROCESS_DIR_ENV] = directory
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue()
    for path in glob.glob(os.path.join(directory, "gauge_live*.db")):
        match = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(path))
        if match and not _alive(int(match.group(1))):
            mark_process_dead(int(match.group(1)), directory)


def leave_multiprocess() -> None:
    """A worker stopping: its in-flight gauge no longer counts (its counters do)."""
    directory = os.environ.get(MULTIPROCESS_DIR_ENV)
    if directory:
        mark_process_dead(os.getpid(), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


M = TypeVar("M", Counter, Gauge, Histogram)


class _Declared(Generic[M]):
    """One of ``GatewayMetrics``' metrics, declared once on the class: its type, name,
    help, labels and options (buckets, multiprocess mode). Each ``GatewayMetrics``
    makes it in its own registry, as an instance attribute of the same name."""

    def __init__(
        self,
        kind: type[M],
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        **options: Any,
    ) -> None:
        self.kind: type[M] = kind
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.options = options
        self.attribute = ""

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    @overload
    def __get__(self, instance: None, owner: type) -> _Declared[M]: ...

    @overload
    def __get__(self, instance: GatewayMetrics, owner: type) -> M: ...

    def __get__(self, instance: GatewayMetrics | None, owner: type) -> _Declared[M] | M:
        # The instance's own attribute (made by __init__) is found before this.
        if instance is None:
            return self
        raise AttributeError(self.attribute)

    def make(self, registry: CollectorRegistry) -> M:
        return self.kind(
            self.name, self.documentation, self.labels, registry=registry, **self.options
        )


class GatewayMetrics:
    # Every metric, in the order a scrape lists them.
    callbacks = _Declared(
        Counter,
        "tiktok_gateway_callbacks",
        "OAuth callbacks handled, by outcome: connected or the error code answered.",
        ["outcome"],
    )
    callbacks_in_flight = _Declared(
        Gauge,
        "tiktok_gateway_callbacks_in_flight",
        "OAuth callbacks being handled right now.",
        multiprocess_mode="livesum",
    )
    tiktok_request_seconds = _Declared(
        Histogram,
        "tiktok_gateway_tiktok_request_seconds",
        "Calls to TikTok by endpoint (token, refresh, revoke, user_info) and result "
        "(the HTTP status, timeout or connection_error).",
        ["endpoint", "result"],
        buckets=TIKTOK_BUCKETS,
    )
    store_operation_seconds = _Declared(
        Histogram,
        "tiktok_gateway_store_operation_seconds",
        "Store operations by method name, failures included.",
        ["operation"],
        buckets=STORE_BUCKETS,
    )
    refreshes = _Declared(
        Counter,
        "tiktok_gateway_refreshes",
        "Token refresh attempts (access-token endpoint and background refresher) by outcome.",
        ["outcome"],
    )
    refresher_lag_seconds = _Declared(
        Gauge,
        "tiktok_gateway_refresher_lag_seconds",
        "At the last refresh round: how long the most overdue due account had been due "
        "(0 when none was).",
        multiprocess_mode="livemax",
    )
    events_recorded = _Declared(
        Counter,
        "tiktok_gateway_events_recorded",
        "Account events logged by the relay (pulled and pushed from there), by type.",
        ["type"],
    )
    events_delivered = _Declared(
        Counter,
        "tiktok_gateway_events_delivered",
        "Account events the product's receiver acknowledged with a 2xx.",
    )
    events_retried = _Declared(
        Counter,
        "tiktok_gateway_event_delivery_retries",
        "Failed delivery attempts of account events that will be retried.",
    )
    events_failed = _Declared(
        Counter,
        "tiktok_gateway_events_failed",
        "Account events marked failed once their retry schedule ran out.",
    )
    oldest_undelivered_event_seconds = _Declared(
        Gauge,
        "tiktok_gateway_oldest_undelivered_event_age_seconds",
        "Age of the oldest account event still to push, relayed or not (0: none).",
        # Every worker reads the same store: the latest reading is the answer.
        multiprocess_mode="livemostrecent",
    )
    # Pending profiles (services/profile_filler.py).
    profiles_left_pending = _Declared(
        Counter,
        "tiktok_gateway_profiles_left_pending",
        "Callbacks that connected an account with its profile pending: TikTok could "
        "not answer the profile call in time (429, 5xx, timeout, budget spent).",
    )
    profile_fills = _Declared(
        Counter,
        "tiktok_gateway_profile_fills",
        "The profile filler's attempts by outcome: filled, unavailable (TikTok busy or "
        "unreachable), refused (TikTok refused the token), no_tokens (disconnected "
        "meanwhile), error (a bug or a store fault).",
        ["outcome"],
    )
    profiles_pending = _Declared(
        Gauge,
        "tiktok_gateway_profiles_pending",
        "Connected accounts whose profile is pending, at the filler's last round.",
        multiprocess_mode="livemax",
    )
    # TikTok call budgets (services/budget.py).
    budget_calls = _Declared(
        Counter,
        "tiktok_gateway_budget_calls",
        "Calls that asked a TikTok budget for a permit, by budget (endpoint), priority "
        "and result: admitted (shared budget), local (this process's share while the "
        "store cannot be asked), refused (no room before the caller's deadline), paused "
        "(background call while the store cannot be asked).",
        ["budget", "priority", "result"],
    )
    budget_deferred = _Declared(
        Counter,
        "tiktok_gateway_budget_deferred",
        "Calls that found their TikTok budget spent and waited for room (admitted or "
        "refused after), by budget and priority.",
        ["budget", "priority"],
    )
    budget_used = _Declared(
        Gauge,
        "tiktok_gateway_budget_used",
        "Calls admitted by every process in the current window of a TikTok budget, as "
        "this process last saw it.",
        ["budget"],
        multiprocess_mode="livemostrecent",
    )
    budget_remaining = _Declared(
        Gauge,
        "tiktok_gateway_budget_remaining",
        "Calls a TikTok budget can still admit in the current window (limit - used).",
        ["budget"],
        multiprocess_mode="livemostrecent",
    )
    budget_limit = _Declared(
        Gauge,
        "tiktok_gateway_budget_limit",
        "Calls a TikTok budget admits in any window (TIKTOK_RATE_LIMITS), and "
        "background_limit: the most of them background work may use "
        "(TIKTOK_BACKGROUND_SHARE).",
        ["budget", "share"],
        multiprocess_mode="livemax",
    )

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Set when this process's values are files shared with other workers.
        self.multiprocess_dir = (
            os.environ.get(MULTIPROCESS_DIR_ENV)
            if getattr(prometheus_values.ValueClass, "_multiprocess", False)
            else None
        )
        for declared in _DECLARED:
            setattr(self, declared.attribute, declared.make(self.registry))
        # Present from the start at 0, so rate() and alerts see every series.
        self._event_types = {name: self.events_recorded.labels(name) for name in EVENT_TYPES}
        self._callbacks = {name: self.callbacks.labels(name) for name in CALLBACK_OUTCOMES}
        self._refreshes = {name: self.refreshes.labels(name) for name in REFRESH_OUTCOMES}
        self._profile_fills = {
            name: self.profile_fills.labels(name) for name in PROFILE_FILL_OUTCOMES
        }
        self._tiktok: dict[tuple[str, str], Any] = {}
        # Functions run before each render, so gauges that age show their value now.
        self._render_hooks: list[Callable[[], None]] = []

    def render(self) -> bytes:
        for hook in self._render_hooks:
            hook()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        # Every worker's files, read at each scrape.
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged)

    @contextlib.contextmanager
    def callback(self) -> Iterator[None]:
        """Around one callback: in flight while it runs, then counted by outcome."""
        self.callbacks_in_flight.inc()
        outcome = INTERNAL_ERROR
        try:
            yield
            outcome = CONNECTED
        except GatewayError as exc:
            outcome = exc.code
            raise
        finally:
            self.callbacks_in_flight.dec()
            self._counter(self._callbacks, self.callbacks, outcome).inc()

    def callback_refused(self, code: str) -> None:
        """A callback refused before it could run (a malformed link): counted by code."""
        self._counter(self._callbacks, self.callbacks, code).inc()

    def refresh(self, outcome: str) -> None:
        self._counter(self._refreshes, self.refreshes, outcome).inc()

    def tiktok_request(self, endpoint: str, result: str, seconds: float) -> None:
        key = (endpoint, result)
        child = self._tiktok.get(key)
        if child is None:
            child = self._tiktok[key] = self.tiktok_request_seconds.labels(endpoint, result)
        child.observe(seconds)

    def event_recorded(self, event_type: str) -> None:
        self._counter(self._event_types, self.events_recorded, event_type).inc()

    def refresher_round(self, before: datetime, due: list[Account]) -> None:
        """Record the lag from one round's ``accounts_due_for_refresh(before)``.

        The refresher asks with ``before = now + ahead``, and an account is due from
        ``expires_at - ahead``: it has been due for ``before - expires_at``. The list
        is soonest expiry first.
        """
        lag = 0.0
        expires = due[0].access_token_expires_at if due else None
        if expires is not None:
            lag = max((before - expires).total_seconds(), 0.0)
        self.refresher_lag_seconds.set(lag)

    # -- pending profiles (services/profile_filler.py) ------------------------------

    def profile_left_pending(self) -> None:
        self.profiles_left_pending.inc()

    def profile_fill(self, outcome: str) -> None:
        self._counter(self._profile_fills, self.profile_fills, outcome).inc()

    @staticmethod
    def _counter(children: dict[str, Any], counter: Counter, name: str) -> Any:
        child = children.get(name)
        if child is None:
            child = children[name] = counter.labels(name)
        return child

    # -- TikTok call budgets (services/budget.py) -----------------------------------

    def before_render(self, hook: Callable[[], None]) -> None:
        self._render_hooks.append(hook)

    def budget_declared(self, budget: str, limit: int, background_limit: int) -> None:
        """A budget's series, present from the start (at 0), so rate() and alerts see
        every one before its first call."""
        self.budget_limit.labels(budget, "all").set(limit)
        self.budget_limit.labels(budget, "background").set(background_limit)
        for priority, results in BUDGET_RESULTS.items():
            self.budget_deferred.labels(budget, priority)
            for result in results:
                self.budget_calls.labels(budget, priority, result)
        self.budget_use(budget, 0, limit)

    def budget_call(self, budget: str, priority: str, result: str) -> None:
        self.budget_calls.labels(budget, priority, result).inc()

    def budget_wait(self, budget: str, priority: str) -> None:
        self.budget_deferred.labels(budget, priority).inc()

    def budget_use(self, budget: str, used: int, limit: int) -> None:
        self.budget_used.labels(budget).set(used)
        self.budget_remaining.labels(budget).set(max(limit - used, 0))



# GatewayMetrics' declarations in the order of its class body.
_DECLARED = tuple(
    value for value in vars(GatewayMetrics).values() if isinstance(value, _Declared)
)

class InstrumentedStore(Store):
    """A store that times every operation of the one it wraps.

    The methods are generated from ``Store`` itself, so an operation added to the
    interface is timed without touching this class; any other attribute (a
    store's own extras, such as ``MongoStore.database``) passes through.
    """

    def __init__(self, inner: Store, metrics: GatewayMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._timers: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes this wrapper does not have.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _timer(self, operation: str) -> Any:
        timer = self._timers.get(operation)
        if timer is None:
            timer = self._timers[operation] = self.metrics.store_operation_seconds.labels(
                operation
            )
        return timer

    async def accounts_due_for_refresh(
        self, before: datetime, *, limit: int, **filters: Any
    ) -> list[Account]:
        started = time.perf_counter()
        try:
            due = await self.inner.accounts_due_for_refresh(before, limit=limit, **filters)
        finally:
            self._timer("accounts_due_for_refresh").observe(time.perf_counter() - started)
        # Only the refresher asks this, once per round.
        self.metrics.refresher_round(before, due)
        return due


def _timed(name: str) -> Callable[..., Any]:
    async def operation(self: InstrumentedStore, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await getattr(self.inner, name)(*args, **kwargs)
        finally:
            self._timer(name).observe(time.perf_counter() - started)

    operation.__name__ = operation.__qualname__ = name
    return operation


def _passed_through(name: str) -> Callable[..., Any]:
    def method(self: InstrumentedStore, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


for _name, _member in vars(Store).items():
    if _name.startswith("_") or not callable(_member) or _name in vars(InstrumentedStore):
        continue
    wrapped = _timed if inspect.iscoroutinefunction(_member) else _passed_through
    setattr(InstrumentedStore, _name, wrapped(_name))
# mypy cannot see methods made by setattr: to it the class stays abstract.
abc.update_abstractmethods(InstrumentedStore)  # type: ignore[type-abstract]

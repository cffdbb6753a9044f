"""Push delivery of account events to the product: Standard Webhooks, at least once.

Every process runs an ``EventDelivery``. Each round asks the store for the events due
now (for each account only its earliest pending event, so a later one waits until the
earlier is delivered or failed), claims each with a lease (so no event is in flight
twice, whichever process tries) and POSTs it to ``PRODUCT_WEBHOOK_URL``, signed with
every ``PRODUCT_WEBHOOK_SECRET``. A 2xx acknowledges; anything else (another status, a
redirect, which is never followed, a timeout, a refused connection) is retried after
the next wait of the schedule, jittered, and the event is failed once the schedule
(or 24 h from its first attempt) runs out. The receiver's answer body is discarded
unread: never stored, never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import ssl
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from standardwebhooks import Webhook
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from core.clock import utcnow
from core.errors import GatewayError
from services.background import WakeableLoop, finish_or_cancel, run_guarded
from services.events import RELAY_IDLE_SECONDS, EventRelay
from services.http_client import is_refused, is_timeout
from storage.base import Store, StoredEvent

if TYPE_CHECKING:
    from services.config import Config
    from services.metrics import GatewayMetrics

log = logging.getLogger("gateway.events")

CONNECT_TIMEOUT_SECONDS = 2.0
REQUEST_TIMEOUT_SECONDS = 10.0
# A claim outlasts the longest attempt by this much before another worker may retry.
LEASE_MARGIN_SECONDS = 20.0
POLL_SECONDS = 0.5
CONCURRENCY = 8
JITTER = (0.8, 1.2)
RETRY_WINDOW = timedelta(hours=24)
GAUGE_SECONDS = 5.0
USER_AGENT = "tiktok-gateway-events/1"


class Signer:
    """Standard Webhooks signatures, one per secret (all sign during a key change-over)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one whsec_ secret is required")
        self._webhooks = [Webhook(secret) for secret in secrets]

    def headers(self, event_id: str, body: str, at: datetime) -> dict[str, str]:
        return {
            "webhook-id": event_id,
            "webhook-timestamp": str(math.floor(at.timestamp())),
            "webhook-signature": " ".join(w.sign(event_id, at, body) for w in self._webhooks),
            "content-type": "application/json",
        }


def delivery_body(stored: StoredEvent) -> str:
    return json.dumps(stored.event, separators=(",", ":"))


def describe_failure(exc: BaseException) -> str:
    """A short, fixed vocabulary for ``lastFailure`` and the log: no receiver text."""
    if is_timeout(exc):
        return "timeout"
    if is_refused(exc):
        return "connection refused"
    if isinstance(exc, ssl.SSLError):
        return "tls error"
    if isinstance(exc, HTTPClientError):
        return "connection closed" if exc.code == 599 else f"http {exc.code}"
    if isinstance(exc, OSError):
        return "connection failed"
    return "error"


def _discard(chunk: bytes) -> None:
    """The receiver's answer body: read off the socket, never kept."""


@dataclass(frozen=True)
class RetryPolicy:
    # Waits in seconds after the first, second... failed attempt.
    schedule: tuple[float, ...]
    window: timedelta = RETRY_WINDOW
    jitter: Callable[[float, float], float] = field(default=random.uniform)

    def next_attempt(
        self, attempts: int, first_attempt_at: datetime, now: datetime
    ) -> datetime | None:
        """When to try again after ``attempts`` failed attempts; None: give up (the
        schedule ran out, or the window since the first attempt)."""
        deadline = first_attempt_at + self.window
        if attempts > len(self.schedule) or now >= deadline:
            return None
        wait = self.schedule[attempts - 1] * self.jitter(*JITTER)
        # Jitter never pushes an attempt past the window: it happens at its end.
        return min(now + timedelta(seconds=wait), deadline)


def _safe_url(url: str) -> str:
    """The receiver's URL for the log: no query string (it may hold a token)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


class EventDelivery(WakeableLoop):
    def __init__(
        self,
        *,
        store: Store,
        url: str,
        secrets: Sequence[str],
        retry: RetryPolicy,
        metrics: GatewayMetrics | None = None,
        holder: str | None = None,
        http_client: AsyncHTTPClient | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        concurrency: int = CONCURRENCY,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__()
        self._store = store
        self.url = url
        self._signer = Signer(secrets)
        self.retry = retry
        self._metrics = metrics
        self.holder = holder or f"delivery-{uuid.uuid4().hex}"
        self._http = http_client
        self._owns_http = http_client is None
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.poll_seconds = poll_seconds
        self.concurrency = concurrency
        self._lease_seconds = request_timeout + LEASE_MARGIN_SECONDS
        self._clock = clock
        self._in_flight: set[asyncio.Task[None]] = set()

    # -- one round ------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim what is due, as many as free slots allow, and start pushing it."""
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        now = self._clock()
        started = 0
        for stored in await self._store.due_events(now=now, limit=free):
            claimed = await self._store.claim_event_for_delivery(
                stored.id, self.holder, now=now, seconds=self._lease_seconds
            )
            if claimed is None:
                continue  # another worker was first
            task = asyncio.create_task(self._deliver(claimed), name=f"deliver-{claimed.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._settled)
            started += 1
        return started

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        # A free slot, and maybe the next event of that account: look again now.
        self.wake()

    async def deliver(self, stored: StoredEvent) -> str | None:
        """One attempt; the failure's description, or None when acknowledged."""
        if self._http is None:
            self._http = SimpleAsyncHTTPClient(force_instance=True, max_clients=self.concurrency)
        body = delivery_body(stored)
        request = HTTPRequest(
            self.url,
            method="POST",
            body=body,
            headers=self._signer.headers(stored.id, body, self._clock()),
            connect_timeout=self.connect_timeout,
            request_timeout=self.request_timeout,
            follow_redirects=False,
            streaming_callback=_discard,
            user_agent=USER_AGENT,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except Exception as exc:  # every transport failure is a failed attempt
            return describe_failure(exc)
        return None if 200 <= response.code < 300 else f"http {response.code}"

    async def _deliver(self, stored: StoredEvent) -> None:
        try:
            failure = await self.deliver(stored)
            await self._settle(stored, failure)
        except GatewayError as exc:
            # The claim runs out on its own and the event is tried again.
            log.warning(
                "account event %s: delivery outcome not saved: %s",
                stored.id,
                exc.technical_message or exc.message,
            )
        except Exception:
            log.exception("account event %s: delivery failed unexpectedly", stored.id)

    async def _settle(self, stored: StoredEvent, failure: str | None) -> None:
        now = self._clock()
        attempts = stored.attempts + 1
        if failure is None:
            if await self._store.mark_delivered(stored.id, self.holder, now=now):
                if self._metrics is not None:
                    self._metrics.events_delivered.inc()
                log.info(
                    "account event %s (%s) delivered after %d attempt(s)",
                    stored.id, stored.type, attempts,
                )
            return
        first = stored.first_attempt_at or now
        next_at = self.retry.next_attempt(attempts, first, now)
        if not await self._store.mark_attempt_failed(
            stored.id, self.holder, now=now, failure=failure, next_attempt_at=next_at
        ):
            return
        if next_at is None:
            if self._metrics is not None:
                self._metrics.events_failed.inc()
            log.warning(
                "account event %s (%s) failed after %d attempt(s) to %s, last: %s; "
                "redeliver it with POST /events/{id}/redeliver",
                stored.id, stored.type, attempts, _safe_url(self.url), failure,
            )
        else:
            if self._metrics is not None:
                self._metrics.events_retried.inc()
            log.info(
                "account event %s (%s) attempt %d to %s failed: %s; next in %.3gs",
                stored.id, stored.type, attempts, _safe_url(self.url), failure,
                (next_at - now).total_seconds(),
            )

    # -- the loop -------------------------------------------------------------------

    task_name = "account-event-delivery"
    what = "account event delivery"
    round_name = "event delivery"

    def start(self) -> None:
        if self._start():
            log.info("account events pushed to %s", _safe_url(self.url))

    def _interval(self) -> float:
        return self.poll_seconds

    async def _round(self) -> bool:
        started = await self.run_once()
        return bool(started) and len(self._in_flight) < self.concurrency  # more may be due

    async def stop(self, grace_seconds: float = REQUEST_TIMEOUT_SECONDS) -> None:
        """No new attempt starts; those in flight get ``grace_seconds`` to finish."""
        await self._stop_task()
        # A cancelled attempt's claim runs out; another worker retries it.
        await finish_or_cancel(self._in_flight, grace_seconds)
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None


class EventWorkers:
    """One process's share of account events: the relay, the delivery worker (push
    on), and the oldest-undelivered gauge."""

    def __init__(
        self,
        *,
        store: Store,
        relay: EventRelay,
        delivery: EventDelivery | None,
        metrics: GatewayMetrics | None = None,
        gauge_seconds: float = GAUGE_SECONDS,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self.relay = relay
        self.delivery = delivery
        self._metrics = metrics
        self.gauge_seconds = gauge_seconds
        self._clock = clock
        self._gauge_task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._stopping:
            return  # stopped before it started (a shutdown during start-up)
        self.relay.start()
        if self.delivery is not None:
            self.delivery.start()
        if self._metrics is not None and self._gauge_task is None:
            self._gauge_task = asyncio.create_task(self._gauge(), name="account-event-gauge")

    def relay_soon(self) -> None:
        self.relay.relay_soon()

    async def update_gauge(self) -> None:
        if self._metrics is None:
            return
        oldest = await self._store.oldest_undelivered()
        age = (self._clock() - oldest).total_seconds() if oldest is not None else 0.0
        self._metrics.oldest_undelivered_event_seconds.set(max(age, 0.0))

    async def _gauge(self) -> None:
        while not self._stopping:  # the flag too: see WakeableLoop._run
            await run_guarded(self.update_gauge, log, skipped="event gauge not updated: %s",
                              failed="event gauge update failed", skipped_level=logging.DEBUG)
            await asyncio.sleep(self.gauge_seconds)

    async def stop(self, grace_seconds: float = REQUEST_TIMEOUT_SECONDS) -> None:
        """Stop relaying and claiming; deliveries in flight get ``grace_seconds``."""
        self._stopping = True
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            await asyncio.gather(self._gauge_task, return_exceptions=True)
            self._gauge_task = None
        await asyncio.gather(
            self.relay.stop(),
            self.delivery.stop(grace_seconds) if self.delivery else asyncio.sleep(0),
        )


def event_workers_for(
    config: Config,
    store: Store,
    metrics: GatewayMetrics | None = None,
    *,
    request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    poll_seconds: float = POLL_SECONDS,
    relay_idle_seconds: float = RELAY_IDLE_SECONDS,
) -> EventWorkers:
    """This process's relay, and its delivery worker when push is configured (the
    timings are for tests)."""
    delivery = None
    if config.product_webhook_url and config.product_webhook_secrets:
        delivery = EventDelivery(
            store=store,
            url=config.product_webhook_url,
            secrets=config.product_webhook_secrets,
            retry=RetryPolicy(config.product_webhook_retry_schedule),
            metrics=metrics,
            request_timeout=request_timeout,
            poll_seconds=poll_seconds,
        )
    relay = EventRelay(
        store=store,
        push=delivery is not None,
        metrics=metrics,
        idle_seconds=relay_idle_seconds,
        on_relayed=delivery.wake if delivery is not None else None,
    )
    return EventWorkers(store=store, relay=relay, delivery=delivery, metrics=metrics)

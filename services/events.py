"""Account events (issue 15): how they are built, relayed into the event log and pulled.

An event is a plain dict ``{"id", "type", "timestamp", "data"}``; ``data.account`` is
the account as the accounts API shows it, never a token. The store appends it to the
account's outbox in the same atomic write as the change that causes it; ``EventRelay``
(every process runs one, the holder of the store's relay lease does the work) moves
outboxes into the event log, where each event gets its ``seq``: the pull feed's
cursor. ``services.event_delivery`` pushes them from there.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from core.clock import iso_z, utcnow
from core.errors import Conflict, GatewayError, NotFound, ValidationFailed
from services.background import WakeableLoop

# The types and reasons, re-exported: callers build events from here.
from services.event_types import CONNECTED as CONNECTED
from services.event_types import EVENT_TYPES as EVENT_TYPES
from services.event_types import REAUTHORIZATION_DUE as REAUTHORIZATION_DUE
from services.event_types import REAUTHORIZATION_REQUIRED as REAUTHORIZATION_REQUIRED
from services.event_types import REFRESH_REFUSED as REFRESH_REFUSED
from services.event_types import REFRESH_TOKEN_EXPIRED as REFRESH_TOKEN_EXPIRED
from services.event_types import REVOKED as REVOKED
from services.event_types import SOURCE_PRODUCT as SOURCE_PRODUCT
from services.event_types import SOURCE_TIKTOK as SOURCE_TIKTOK
from services.representation import account_payload
from storage.base import Account, AccountStatus, EventFactory, EventStatus, Store, StoredEvent

if TYPE_CHECKING:
    from services.metrics import GatewayMetrics

log = logging.getLogger("gateway.events")

EVENT_ID_PREFIX = "evt_"
EVENT_ID_CHARS = 26
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
# An event id is ours if it is this long at most; anything longer is not looked up.
MAX_EVENT_ID_LENGTH = 64

# The relay lease: renewed at every round; a holder that stops renewing is replaced
# after RELAY_LEASE_SECONDS. A seq is allocated only while the lease lasts at least
# RELAY_FENCE_SECONDS more, longer than one store call may take (the driver's socket
# timeout), so a relayer that stalls cannot log an event behind one a reader saw.
RELAY_LEASE_SECONDS = 20.0
RELAY_FENCE_SECONDS = 10.0
RELAY_BATCH = 100
RELAY_IDLE_SECONDS = 0.5
def new_event_id() -> str:
    return EVENT_ID_PREFIX + secrets.token_urlsafe(EVENT_ID_CHARS)[:EVENT_ID_CHARS]


def new_event(
    event_type: str, account: Account, *, now: datetime | None = None, **extras: Any
) -> dict[str, Any]:
    """An event about ``account`` as it stands after the change (``extras`` join
    ``data``: a reason, a source...). The store records it with the change."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown account event type {event_type!r}")
    if "account" in extras:
        raise ValueError("data.account is the account's representation, not an extra")
    return {
        "id": new_event_id(),
        "type": event_type,
        "timestamp": iso_z(now or utcnow()),
        "data": {"account": account_payload(account), **extras},
    }


DEFAULT_EXPIRY_NOTICE_DAYS = 14


class AccountEvents:
    """What the services record their changes' events with, and how they have them
    relayed at once.

    Each method gives the ``EventFactory`` a store method takes: the store calls it with
    the account as its write leaves it (and as it was), and writes the event in that same
    write. ``relay_soon()``, after the change, wakes this process's relay (``attach``:
    the event workers, once they start) so the event goes out without waiting a round.
    """

    def __init__(
        self,
        *,
        expiry_notice_days: int = DEFAULT_EXPIRY_NOTICE_DAYS,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        # reauthorization_due: sent when the refresh token expires within this.
        self.expiry_notice = timedelta(days=expiry_notice_days)
        self._clock = clock
        self._relays: list[EventRelay] = []

    def connected(self) -> EventFactory:
        """A grant stored: a first connection, or a known account connected again."""

        def build(after: Account, before: Account | None) -> dict[str, Any]:
            return self._event(CONNECTED, after, reconnected=before is not None)

        return build

    def reauthorization_required(self, reason: str) -> EventFactory:
        """The tokens are gone (``REFRESH_REFUSED``, ``REFRESH_TOKEN_EXPIRED``); nothing
        when the account already needed reauthorization."""
        return self._status_change(
            AccountStatus.REAUTHORIZATION_REQUIRED, REAUTHORIZATION_REQUIRED, reason=reason
        )

    def revoked(self, source: str, reason: int | None = None) -> EventFactory:
        """Disconnected by the product (``SOURCE_PRODUCT``) or removed at TikTok
        (``SOURCE_TIKTOK``, with its reason code); nothing when it already was revoked."""
        extras: dict[str, Any] = {"source": source}
        if source == SOURCE_TIKTOK:
            extras["reason"] = reason
        return self._status_change(AccountStatus.REVOKED, REVOKED, **extras)

    def reauthorization_due(self) -> EventFactory:
        """The refresh token expires within ``expiry_notice``: the user should connect
        again before (``account.refreshTokenExpiresAt`` says when)."""

        def build(after: Account, before: Account | None) -> dict[str, Any]:
            return self._event(REAUTHORIZATION_DUE, after)

        return build

    def _status_change(
        self, status: AccountStatus, event_type: str, **extras: Any
    ) -> EventFactory:
        def build(after: Account, before: Account | None) -> dict[str, Any] | None:
            if after.status is not status or (before is not None and before.status is status):
                return None
            return self._event(event_type, after, **extras)

        return build

    def _event(self, event_type: str, account: Account, **extras: Any) -> dict[str, Any]:
        # When the change happens: the wall clock, whatever clock the change itself
        # was judged by (a refresher round may look ahead).
        return new_event(event_type, account, now=self._clock(), **extras)

    def attach(self, relay: EventRelay) -> None:
        """``relay`` relays at once after each change (``relay_soon``)."""
        if relay not in self._relays:
            self._relays.append(relay)

    def relay_soon(self) -> None:
        """Call after a change that recorded an event."""
        for relay in self._relays:
            relay.relay_soon()


# -- the pull feed ----------------------------------------------------------------------


def parse_cursor(text: str | None) -> int:
    """A cursor from ``GET /events``'s ``nextCursor`` (none: from the start)."""
    if text is None or text == "":
        return 0
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise ValidationFailed(
            "after must be a cursor this API returned as nextCursor.",
            technical_message="the cursor is not one GET /events answered",
            details={"parameter": "after"},
        )
    return int(text)


def cursor_of(seq: int) -> str:
    return str(seq)


@dataclass(frozen=True)
class EventPage:
    events: list[StoredEvent]
    next_cursor: str


class EventFeed:
    """What ``GET /events`` and ``POST /events/{id}/redeliver`` do."""

    def __init__(
        self, *, store: Store, push_enabled: bool, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._store = store
        self._push_enabled = push_enabled
        self._clock = clock

    async def page(self, *, after: str | None, limit: int, status: EventStatus | None) -> EventPage:
        after_seq = parse_cursor(after)
        events = await self._store.list_events(after_seq=after_seq, limit=limit, status=status)
        last = events[-1].seq if events else after_seq
        return EventPage(events=events, next_cursor=cursor_of(last))

    async def redeliver(self, event_id: str) -> StoredEvent:
        if not self._push_enabled:
            raise Conflict(
                "Push delivery is off: pull events with GET /events, or set "
                "PRODUCT_WEBHOOK_URL and PRODUCT_WEBHOOK_SECRET.",
                technical_message="no PRODUCT_WEBHOOK_URL configured",
            )
        stored = None
        if len(event_id) <= MAX_EVENT_ID_LENGTH:
            stored = await self._store.redeliver_event(event_id, now=self._clock())
        if stored is None:
            raise NotFound(
                "There is no event with this id (events are kept for EVENTS_RETENTION_DAYS).",
                details={"eventId": event_id[:MAX_EVENT_ID_LENGTH]},
            )
        if stored.status is EventStatus.DELIVERED:
            raise Conflict(
                "This event was already delivered; pull it again with GET /events.",
                details={"eventId": stored.id, "status": stored.status.value},
            )
        if stored.status is EventStatus.PULL_ONLY:
            raise Conflict(
                "This event was recorded while push delivery was off; pull it with "
                "GET /events.",
                details={"eventId": stored.id, "status": stored.status.value},
            )
        return stored  # pending: due now, or already on its way


# -- the relay ----------------------------------------------------------------------------


class EventRelay(WakeableLoop):
    """Moves account outboxes into the event log. Every process runs one; only the
    holder of the store's relay lease does the work, a few times a second while there
    is some. ``relay_soon()`` (after a state change) cuts the wait."""

    def __init__(
        self,
        *,
        store: Store,
        push: bool,
        metrics: GatewayMetrics | None = None,
        holder: str | None = None,
        idle_seconds: float = RELAY_IDLE_SECONDS,
        lease_seconds: float = RELAY_LEASE_SECONDS,
        fence_seconds: float = RELAY_FENCE_SECONDS,
        batch: int = RELAY_BATCH,
        clock: Callable[[], datetime] = utcnow,
        on_relayed: Callable[[], None] | None = None,
    ) -> None:
        if fence_seconds >= lease_seconds:
            raise ValueError("fence_seconds must be shorter than lease_seconds")
        super().__init__()
        self._store = store
        self._push = push
        self._metrics = metrics
        self.holder = holder or f"relay-{uuid.uuid4().hex}"
        self.idle_seconds = idle_seconds
        self._lease_seconds = lease_seconds
        self._fence_seconds = fence_seconds
        self._batch = batch
        self._clock = clock
        self._on_relayed = on_relayed

    async def run_once(self) -> int:
        """Relay everything in the outboxes if this process holds the lease; how many."""
        if not await self._store.acquire_relay_lease(self.holder, seconds=self._lease_seconds):
            return 0
        total = 0
        while True:
            relayed = await self._store.relay_outbox(
                self.holder,
                now=self._clock(),
                fence_seconds=self._fence_seconds,
                push=self._push,
                limit=self._batch,
            )
            for stored in relayed:
                if self._metrics is not None:
                    self._metrics.event_recorded(stored.type)
            total += len(relayed)
            if len(relayed) < self._batch:
                break
            if not await self._store.acquire_relay_lease(
                self.holder, seconds=self._lease_seconds
            ):
                break
        if total:
            log.debug("relayed %d account event(s)", total)
            if self._on_relayed is not None:
                self._on_relayed()
        return total

    def relay_soon(self) -> None:
        """Relay now rather than at the next round (call it after a state change)."""
        self.wake()

    task_name = "account-event-relay"
    what = "account event relay"
    round_name = "event relay"

    def _interval(self) -> float:
        return self.idle_seconds

    async def _round(self) -> bool:
        await self.run_once()
        return False

    async def stop(self) -> None:
        if not await self._stop_task():
            return
        try:
            # Another process takes over at once rather than when the lease runs out.
            await self._store.release_relay_lease(self.holder)
        except GatewayError as exc:
            log.warning("relay lease not released: %s", exc.technical_message or exc.message)

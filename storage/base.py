"""The store interface and the records it holds.

Implementations: ``storage.memory.MemoryStore`` (one process, nothing persists)
and ``storage.mongodb.MongoStore``. Both raise ``StoreUnavailable`` for every
infrastructure failure, so callers never see driver exceptions.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

PLATFORM = "tiktok"
# See Store.mark_token_used.
TOKEN_USE_RESOLUTION = timedelta(seconds=60)


class PendingStatus(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class AccountStatus(enum.StrEnum):
    CONNECTED = "connected"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"
    REVOKED = "revoked"


@dataclass
class PendingFailure:
    """What a failed callback answered (the error envelope's parts), so that the same
    callback repeated gets the same answer."""

    status: int
    code: str
    message: str
    technical_message: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    retry_after: int | None = None


@dataclass
class PendingAuthorization:
    """One started connection, named by the state JWT's ``jti``."""

    jti: str
    owner_id: str
    redirect_uri: str
    scopes: list[str]
    # Secrets are left out of repr() here and below: records end up in logs and tracebacks.
    code_verifier: str | None = field(repr=False)
    created_at: datetime
    expires_at: datetime
    status: PendingStatus = PendingStatus.PENDING
    # Digest of what the callback presented when it claimed the record, so a
    # repeated identical callback can be told from a forged one.
    callback_digest: str | None = None
    final_redirect: str | None = None
    # Set with status FAILED: what the callback that claimed the record answered.
    failure: PendingFailure | None = None


class ClaimResult(enum.StrEnum):
    CLAIMED = "claimed"
    ALREADY_COMPLETED = "already_completed"
    IN_PROGRESS = "in_progress"
    FAILED = "failed"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


@dataclass
class ClaimOutcome:
    result: ClaimResult
    pending: PendingAuthorization | None = None


# How ``claim_pending`` answers for a record already past ``pending``.
_CLAIM_REFUSALS = {
    PendingStatus.COMPLETED: ClaimResult.ALREADY_COMPLETED,
    PendingStatus.IN_PROGRESS: ClaimResult.IN_PROGRESS,
    PendingStatus.FAILED: ClaimResult.FAILED,
}


def claim_refusal(pending: PendingAuthorization, now: datetime) -> ClaimResult | None:
    """Why ``claim_pending`` cannot claim ``pending`` at ``now`` (None: it can), in the
    order of precedence every store answers with: its status first, then its expiry."""
    refusal = _CLAIM_REFUSALS.get(pending.status)
    if refusal is None and pending.expires_at <= now:
        return ClaimResult.EXPIRED
    return refusal


@dataclass
class TokenGrant:
    """What a successful token exchange or refresh gave us, with absolute expiries."""

    open_id: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime
    scopes: list[str]


@dataclass
class Account:
    """A connected TikTok account as the product may see it: never a token."""

    id: str
    owner_id: str
    platform_account_id: str
    scopes: list[str]
    status: AccountStatus
    access_token_expires_at: datetime | None
    refresh_token_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    platform: str = PLATFORM
    union_id: str | None = None
    display_name: str | None = None
    avatar_url: str | None = None
    username: str | None = None
    profile_pending: bool = True
    profile: dict[str, Any] = field(default_factory=dict)
    revoked_at: datetime | None = None
    # When the current grant was obtained (each reconnect moves it).
    connected_at: datetime | None = None
    # TikTok's deauthorization reason code, or "disconnected" when the product did it.
    revocation_reason: int | str | None = None
    revoked_at_tiktok: bool | None = None
    # When the access-token endpoint last handed a token out: the refresher keeps only
    # recently used accounts warm (REFRESH_KEEP_WARM_SECONDS).
    token_used_at: datetime | None = None
    # The background refresher's backoff after refreshes that failed without a verdict
    # (TikTok unavailable): it does not try again before refresh_retry_at.
    refresh_retry_at: datetime | None = None
    refresh_failures: int = 0
    # The refresh token expiry a reauthorization_due event was recorded for; the next
    # grant (a reconnect) clears it. A refresh keeps it: it does not move the expiry.
    expiry_notice_for: datetime | None = None


# What a new grant (a connection, a reconnect) clears on an account, and the default
# each goes back to: an earlier revocation, the refresher's backoff, the expiry notice of
# the grant it replaces. Every store clears exactly these (tests/test_store.py).
_ACCOUNT_DEFAULTS = {attribute.name: attribute.default for attribute in fields(Account)}
CLEARED_BY_NEW_GRANT: Mapping[str, Any] = MappingProxyType({
    name: _ACCOUNT_DEFAULTS[name]
    for name in (
        "revoked_at",
        "revocation_reason",
        "revoked_at_tiktok",
        "refresh_retry_at",
        "refresh_failures",
        "expiry_notice_for",
    )
})


# Builds the account event a change records with it (services.events.AccountEvents):
# called with the account as the change leaves it and as it was before (None: the change
# creates it). None records nothing: the change is not one the event is about.
EventFactory = Callable[[Account, Account | None], dict[str, Any] | None]


@dataclass
class AccountTokens:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime
    # The token generation: every grant stored (connect, reconnect, refresh) adds one;
    # re-encryption does not. A refresh stores its answer only over the generation it
    # read (``Store.save_refreshed_tokens``). 0: written before the counter existed.
    version: int = 0


@dataclass
class ResealBatch:
    """What one ``Store.reseal_tokens`` call did, account by account, in id order."""

    # The last account looked at: where the next batch starts (None: there was none).
    last_id: str | None
    # Encrypted again with the current key.
    resealed: int = 0
    # Already under the current key, or holding no tokens: nothing to do.
    current: int = 0
    # Rewritten meanwhile (a refresh, a disconnect), so left as that write made them.
    changed: int = 0
    # Accounts whose tokens no configured key opens (the key was dropped too early).
    unreadable: list[str] = field(default_factory=list)


# How long the event log keeps an event after the relay logged it, unless
# EVENTS_RETENTION_DAYS says otherwise.
DEFAULT_EVENTS_RETENTION_SECONDS = 7 * 86400


class EventStatus(enum.StrEnum):
    """Where an account event is in its delivery (push)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    # Recorded while push delivery was off: only pulled (GET /events).
    PULL_ONLY = "pull_only"


@dataclass
class StoredEvent:
    """An account event in the event log, after the relay numbered it."""

    # Increasing in the order events were relayed: the pull feed's cursor.
    seq: int
    # id, type, timestamp, data: exactly what is pushed and pulled.
    event: dict[str, Any]
    account_id: str
    owner_id: str
    status: EventStatus
    # When the relay logged it (retention counts from here).
    recorded_at: datetime
    attempts: int = 0
    next_attempt_at: datetime | None = None
    first_attempt_at: datetime | None = None
    # "http 500", "timeout", "connection refused"... never the receiver's answer body.
    last_failure: str | None = None
    delivered_at: datetime | None = None
    # The delivery worker that has it in flight, until when.
    lease_holder: str | None = None
    lease_expires_at: datetime | None = None

    @property
    def id(self) -> str:
        return str(self.event["id"])

    @property
    def type(self) -> str:
        return str(self.event["type"])


# Account attributes an ``append_account_event(only_if=...)`` condition may name.
EVENT_CONDITION_ATTRIBUTES = frozenset(
    {
        "status",
        "owner_id",
        "platform_account_id",
        "access_token_expires_at",
        "refresh_token_expires_at",
        "connected_at",
        "revoked_at",
    }
)


def check_event(event: dict[str, Any]) -> None:
    """What every store requires of an event it records (services.events builds them)."""
    missing = [key for key in ("id", "type", "timestamp", "data") if key not in event]
    if missing:
        raise ValueError(f"an account event needs {', '.join(missing)}")
    if not isinstance(event["id"], str) or not isinstance(event["timestamp"], str):
        raise ValueError("an account event's id and timestamp are strings")


def build_event(
    event_factory: EventFactory | None, after: Account, before: Account | None
) -> dict[str, Any] | None:
    """The event a change records: the factory's, for the account as the change leaves
    it and as it was (None: the change creates it), checked as every recorded event is.
    None: nothing to record."""
    if event_factory is None:
        return None
    event = event_factory(after, before)
    if event is not None:
        check_event(event)
    return event


def event_time(event: dict[str, Any]) -> datetime:
    """An event's ``timestamp`` (ISO-8601, ``Z``) as a datetime."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))


def check_event_condition(only_if: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(only_if or {}) - EVENT_CONDITION_ATTRIBUTES)
    if unknown:
        raise ValueError(f"only_if cannot name {', '.join(unknown)}")
    return dict(only_if or {})


PROFILE_FIELDS = {
    # TikTok user-info field -> account attribute
    "union_id": "union_id",
    "display_name": "display_name",
    "avatar_url": "avatar_url",
    "username": "username",
}


def profile_attributes(profile: dict[str, Any]) -> dict[str, Any]:
    """The account attributes a TikTok profile sets (``PROFILE_FIELDS``) and their values."""
    return {
        attribute: profile[tiktok_field]
        for tiktok_field, attribute in PROFILE_FIELDS.items()
        if tiktok_field in profile
    }


# A new account's profile is due for the background filler this long after its tokens
# were stored: its callback's own profile call goes first (it lasts at most
# TIKTOK_CALLBACK_BUDGET_SECONDS), and one that never ends (a crashed process) is
# filled after it.
PROFILE_FIRST_FILL_DELAY = timedelta(seconds=60)


@dataclass
class ProfileClaim:
    """An account whose pending profile one filler holds until the end of its lease."""

    account: Account
    # Attempts that failed in a row before this one (the filler backs off on them).
    failures: int = 0


class Store(abc.ABC):
    """Persistence for pending authorizations and connected accounts."""

    @abc.abstractmethod
    async def initialize(self) -> None:
        """Create indexes; safe to call at every start-up."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    async def check_ready(self) -> None:
        """Raise ``StoreUnavailable`` unless the store can serve requests (``/readyz``):
        it answers and ``initialize`` has set it up. A store with nothing to set up
        only needs to answer."""
        await self.ping()

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- pending authorizations -------------------------------------------------

    @abc.abstractmethod
    async def save_pending(self, pending: PendingAuthorization) -> None: ...

    @abc.abstractmethod
    async def claim_pending(self, jti: str, *, callback_digest: str, now: datetime) -> ClaimOutcome:
        """Atomically move a live pending record to in-progress.

        Exactly one concurrent caller gets ``CLAIMED``; the others learn what
        state the record is in.
        """

    @abc.abstractmethod
    async def finish_pending(
        self,
        jti: str,
        *,
        status: PendingStatus,
        final_redirect: str | None = None,
        failure: PendingFailure | None = None,
    ) -> None: ...

    @abc.abstractmethod
    async def get_pending(self, jti: str) -> PendingAuthorization | None:
        """The record as it stands, without claiming it (None once it is gone)."""

    # -- accounts -----------------------------------------------------------------

    @abc.abstractmethod
    async def save_account_tokens(
        self,
        owner_id: str,
        grant: TokenGrant,
        *,
        now: datetime,
        event_factory: EventFactory | None = None,
    ) -> Account:
        """Create or update the (owner, tiktok, open_id) account with fresh tokens.

        ``event_factory`` (here and in the other methods that take it): its event is
        appended to the account's outbox in the same atomic write as the change, built
        from the account as that write leaves it; no change, no event."""

    @abc.abstractmethod
    async def save_account_profile(
        self, account_id: str, profile: dict[str, Any], *, now: datetime
    ) -> Account:
        """Store the profile: it is complete, and leaves the filler's queue."""

    # -- pending profiles ---------------------------------------------------------
    # A pending profile carries the time its next fill is due (a new account's:
    # PROFILE_FIRST_FILL_DELAY after its tokens). Claiming one moves that time to
    # the end of a lease in the same atomic update, so two fillers never fetch one
    # profile at once, and one that crashed holds it no longer than its lease.

    @abc.abstractmethod
    async def schedule_profile_fill(self, account_id: str, *, at: datetime) -> None:
        """Mark the account's profile pending, due at ``at``; earlier failures are
        forgotten and any filler's hold is dropped."""

    @abc.abstractmethod
    async def claim_profile_fill(
        self, holder: str, *, now: datetime, until: datetime
    ) -> ProfileClaim | None:
        """Of the connected accounts whose pending profile is due at ``now``, the one
        due the longest, now held by ``holder`` (due again at ``until`` unless saved
        or deferred first); None when no profile is due."""

    @abc.abstractmethod
    async def defer_profile_fill(
        self, account_id: str, holder: str, *, retry_at: datetime
    ) -> None:
        """A failed fill: due again at ``retry_at``, one more failure counted; only
        while ``holder`` holds it (a profile saved or rescheduled meanwhile stays so)."""

    @abc.abstractmethod
    async def count_pending_profiles(self) -> int:
        """Connected accounts whose profile is pending."""

    @abc.abstractmethod
    async def get_account(self, account_id: str) -> Account | None: ...

    @abc.abstractmethod
    async def list_accounts(self, owner_id: str) -> list[Account]: ...

    @abc.abstractmethod
    async def get_account_tokens(self, account_id: str) -> AccountTokens | None:
        """The only way to read tokens back in clear text."""

    # -- token lifecycle ----------------------------------------------------------
    # A refresh takes a lease on the account record, claimed atomically and expiring
    # on its own, so concurrent requests in every gateway process make one call to
    # TikTok and a crashed holder blocks nobody for longer than the lease. The lease
    # only avoids duplicate calls: what a refresh stores is decided by the token
    # generation it read (``AccountTokens.version``), never by the lease.

    @abc.abstractmethod
    async def acquire_refresh_lease(self, account_id: str, holder: str, *, seconds: float) -> bool:
        """Take the lease for ``seconds`` if it is free or expired and the account is
        connected. Expiry is judged by one clock, the store's own: MongoDB's ``$$NOW``,
        the process's monotonic clock for ``MemoryStore``."""

    @abc.abstractmethod
    async def release_refresh_lease(self, account_id: str, holder: str) -> None:
        """Give the lease back (only if ``holder`` still has it)."""

    @abc.abstractmethod
    async def save_refreshed_tokens(
        self, account_id: str, grant: TokenGrant, *, version: int, now: datetime
    ) -> bool:
        """Store a refresh's tokens, expiries and scopes in one atomic update, only if
        the stored tokens are still generation ``version`` (those the refresh sent) and
        the account is not revoked; the generation moves on and the account is
        ``connected`` again (a refusal of the token this refresh replaced may have
        marked it). Whoever holds the lease does not matter.

        Returns False (and writes nothing) when newer tokens were stored meanwhile, the
        account was revoked, or it does not exist.
        """

    @abc.abstractmethod
    async def require_reauthorization(
        self,
        account_id: str,
        *,
        now: datetime,
        version: int | None = None,
        event_factory: EventFactory | None = None,
    ) -> bool:
        """Wipe both tokens and mark the account ``reauthorization_required`` (never a
        revoked one). With ``version``, only if the stored tokens are still that
        generation: TikTok refused the refresh token it holds, not a newer one.
        Returns whether the account was marked."""

    @abc.abstractmethod
    async def revoke_account(
        self,
        account_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        revoked_at_tiktok: bool | None,
        event_factory: EventFactory | None = None,
    ) -> Account | None:
        """Wipe both tokens and mark the account ``revoked``; keeps the first revocation."""

    @abc.abstractmethod
    async def revoke_accounts_by_open_id(
        self,
        open_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        connected_before: datetime | None = None,
        event_factory: EventFactory | None = None,
    ) -> int:
        """Revoke every live account of this TikTok user; returns how many changed.

        With ``connected_before``, grants obtained at or after it are kept: a late
        redelivery of an old removal must not revoke a newer connection.
        """

    @abc.abstractmethod
    async def accounts_due_for_refresh(
        self,
        before: datetime,
        *,
        limit: int,
        now: datetime | None = None,
        used_since: datetime | None = None,
    ) -> list[Account]:
        """Connected accounts whose access token expires before ``before``, soonest first.

        With ``now``, accounts whose ``refresh_retry_at`` is after it (waiting out a
        backoff) are left out; with ``used_since``, so are accounts whose token was
        not handed out at or after it (``token_used_at``), never-used ones included.
        """

    @abc.abstractmethod
    async def mark_token_used(self, account_id: str, *, now: datetime) -> None:
        """Record that the account's access token was handed out at ``now``.

        A use less than ``TOKEN_USE_RESOLUTION`` after the recorded one is not written
        again: a product asking for the token on every call costs no write each time.
        """

    @abc.abstractmethod
    async def defer_refresh(self, account_id: str, *, retry_at: datetime, failures: int) -> None:
        """Keep the account out of ``accounts_due_for_refresh(now=...)`` until ``retry_at``,
        noting ``failures`` refreshes failed in a row."""

    @abc.abstractmethod
    async def clear_refresh_retry(self, account_id: str) -> None:
        """Forget the account's backoff (``refresh_retry_at`` and ``refresh_failures``)."""

    @abc.abstractmethod
    async def expire_refresh_tokens(
        self, *, now: datetime, event_factory: EventFactory | None = None
    ) -> int:
        """Mark ``reauthorization_required`` (tokens wiped) every connected account whose
        refresh token expired at or before ``now``; returns how many changed."""

    @abc.abstractmethod
    async def record_expiry_notices(
        self, *, now: datetime, expiring_by: datetime, limit: int, event_factory: EventFactory
    ) -> int:
        """For up to ``limit`` connected accounts whose refresh token expires after
        ``now`` and at or before ``expiring_by``, soonest first, and whose grant had no
        notice yet: note the notice (``Account.expiry_notice_for``) and record the
        factory's event, in one atomic write each. Returns how many were noticed."""

    # -- key rotation ---------------------------------------------------------------

    @abc.abstractmethod
    async def reseal_tokens(self, *, after: str | None, limit: int) -> ResealBatch:
        """Encrypt again, with the current key, the tokens of up to ``limit`` accounts
        whose id comes after ``after`` (all from the first with None).

        Each account is rewritten only if its tokens are still those that were read,
        so a refresh or a disconnect running meanwhile is never undone.
        """

    # -- account events (issue 15) ----------------------------------------------------
    # An event is appended to its account's ``outbox`` in the same atomic write as the
    # change that causes it. The relay (one process at a time, holding a lease) moves
    # outboxes into the event log, numbering events with an increasing ``seq``; the
    # delivery workers of every process push them, one in flight per event, in order
    # per account.

    @abc.abstractmethod
    async def append_account_event(
        self, account_id: str, event: dict[str, Any], *, only_if: dict[str, Any] | None = None
    ) -> bool:
        """Append ``event`` to the account's outbox; False (nothing written) when the
        account is unknown or one of the ``only_if`` attributes (``Account`` names,
        see ``EVENT_CONDITION_ATTRIBUTES``) differs from the value given."""

    # Leases (the relay's, a delivery's claim) are judged by the store's own clock, as
    # the refresh lease is: MongoDB's $$NOW, the process's monotonic clock in memory.

    @abc.abstractmethod
    async def acquire_relay_lease(self, holder: str, *, seconds: float) -> bool:
        """Take or extend the relay lease for ``seconds``: free, expired, or already
        ``holder``'s."""

    @abc.abstractmethod
    async def release_relay_lease(self, holder: str) -> None:
        """Give the relay lease back (only if ``holder`` still has it)."""

    @abc.abstractmethod
    async def relay_outbox(
        self, holder: str, *, now: datetime, fence_seconds: float, push: bool, limit: int
    ) -> list[StoredEvent]:
        """Move up to ``limit`` outbox events into the event log, oldest account first,
        each account's in its outbox order; returns those newly logged.

        Each seq is allocated only while ``holder``'s lease lasts ``fence_seconds``
        more: a relayer that lost its lease logs nothing more. An event already
        logged (a relayer stopped before removing it from the outbox) is only removed.
        Logged as ``pending`` (due ``now``) with ``push``, ``pull_only`` without.
        """

    @abc.abstractmethod
    async def list_events(
        self, *, after_seq: int, limit: int, status: EventStatus | None = None
    ) -> list[StoredEvent]:
        """Logged events with a seq above ``after_seq``, in seq order."""

    @abc.abstractmethod
    async def get_event(self, event_id: str) -> StoredEvent | None: ...

    @abc.abstractmethod
    async def due_events(self, *, now: datetime, limit: int) -> list[StoredEvent]:
        """Pending events to push now, in seq order: for each account only the earliest
        pending one, and only when it is due and no worker has it in flight."""

    @abc.abstractmethod
    async def claim_event_for_delivery(
        self, event_id: str, holder: str, *, now: datetime, seconds: float
    ) -> StoredEvent | None:
        """Lease for ``seconds`` a pending event due at ``now`` that no worker has in
        flight (None: not claimable)."""

    @abc.abstractmethod
    async def mark_delivered(self, event_id: str, holder: str, *, now: datetime) -> bool:
        """The receiver acknowledged ``holder``'s attempt: delivered, lease dropped."""

    @abc.abstractmethod
    async def mark_attempt_failed(
        self,
        event_id: str,
        holder: str,
        *,
        now: datetime,
        failure: str,
        next_attempt_at: datetime | None,
    ) -> bool:
        """``holder``'s attempt failed: counted, lease dropped; pending again until
        ``next_attempt_at``, or ``failed`` when it is None."""

    @abc.abstractmethod
    async def redeliver_event(self, event_id: str, *, now: datetime) -> StoredEvent | None:
        """A failed event becomes pending again, due now, its attempts reset; any other
        is left as it is. The event as it then stands (None: unknown)."""

    @abc.abstractmethod
    async def oldest_undelivered(self) -> datetime | None:
        """The timestamp of the oldest event still to push (pending or not yet relayed)."""

    # -- TikTok call budgets (services/budget.py) -----------------------------------

    @abc.abstractmethod
    async def admit_call(
        self,
        budget: str,
        *,
        limit: int,
        window_seconds: float,
        background: bool = False,
        background_limit: int | None = None,
        now: datetime | None = None,
    ) -> CallAdmission:
        """Admit one call to ``budget`` (a TikTok endpoint's name) if fewer than
        ``limit`` calls were admitted in the last ``window_seconds``, and, for a
        ``background`` call, fewer than ``background_limit`` background calls: judged
        and recorded in one atomic step, shared by every process using this store.

        ``now`` is the time of the call; None takes the store's own clock (MongoDB's
        ``$$NOW``), one clock for every gateway process and machine.
        """


# The TikTok endpoints a budget can be kept for (TIKTOK_RATE_LIMITS names them).
CALL_BUDGETS = ("user_info", "token", "revoke")


@dataclass(frozen=True)
class CallAdmission:
    """One ``Store.admit_call`` decision, timed by the clock that made it."""

    admitted: bool
    # When it was decided (epoch seconds, by the clock that decided).
    at: float
    # Seconds until a call of this kind could be admitted; 0 when this one was.
    retry_after: float
    # For each call admitted within the window ending now (this one included), how many
    # seconds until it leaves the window, soonest first: its length is the window's use.
    leaving: tuple[float, ...]
    background_used: int = 0

    @property
    def used(self) -> int:
        return len(self.leaving)


def judge_call(
    calls: list[float],
    background_calls: list[float],
    now: float,
    *,
    limit: int,
    window_seconds: float,
    background: bool,
    background_limit: int | None,
    admitted: bool | None = None,
    unit: float = 1.0,
) -> CallAdmission:
    """The sliding-window rule on the logs of admitted calls (admission order, the most
    recent last): room when the ``limit``-th most recent call is at least
    ``window_seconds`` old (the background log likewise against ``background_limit``).
    Times and window are in ``unit`` seconds (0.001: integer milliseconds, exact); the
    answer is in seconds.

    ``admitted`` given: the logs already hold the decision (MongoDB's post-image), only
    describe it. Otherwise decide, and append ``now`` to the logs when admitted, so that
    N+1 admitted calls always span at least the window: no window holds more than N.
    """
    if admitted is None:
        free_at = _free_at(calls, background_calls, limit=limit, window=window_seconds,
                           background=background, background_limit=background_limit)
        admitted = free_at <= now
        if admitted:
            calls.append(now)
            del calls[:-limit]
            if background and background_limit:
                background_calls.append(now)
                del background_calls[:-background_limit]
    retry_after = 0.0
    if not admitted:
        free_at = _free_at(calls, background_calls, limit=limit, window=window_seconds,
                           background=background, background_limit=background_limit)
        retry_after = max(free_at - now, 0.0)
    cutoff = now - window_seconds
    return CallAdmission(
        admitted=admitted,
        at=now * unit,
        retry_after=retry_after * unit,
        leaving=tuple(sorted((t - cutoff) * unit for t in calls if t > cutoff)),
        background_used=sum(1 for t in background_calls if t > cutoff),
    )


def window_ms(window_seconds: float) -> int:
    """A window in whole milliseconds, the stores' precision: rounded up, never down."""
    return math.ceil(round(window_seconds * 1000, 6))


def _free_at(
    calls: list[float],
    background_calls: list[float],
    *,
    limit: int,
    window: float,
    background: bool,
    background_limit: int | None,
) -> float:
    """When the next call of this kind may be admitted (-inf: now)."""
    free_at = calls[-limit] + window if len(calls) >= limit else float("-inf")
    if background:
        if not background_limit:
            return float("inf")
        if len(background_calls) >= background_limit:
            free_at = max(free_at, background_calls[-background_limit] + window)
    return free_at


def epoch_ms(moment: datetime) -> int:
    """``moment`` in whole milliseconds since the epoch, as MongoDB keeps dates."""
    return round(moment.timestamp() * 1000)


@dataclass(frozen=True)
class CallRule:
    """An ``admit_call``'s rule as both stores judge it: times and window in whole
    milliseconds (``epoch_ms``, ``window_ms``), so every comparison is exact."""

    limit: int
    window: int
    background: bool
    background_limit: int | None

    def judge(
        self,
        calls: list[float],
        background_calls: list[float],
        now: float,
        *,
        admitted: bool | None = None,
    ) -> CallAdmission:
        """``judge_call`` on logs of epoch milliseconds; the answer is in seconds."""
        return judge_call(
            calls,
            background_calls,
            now,
            limit=self.limit,
            window_seconds=self.window,
            background=self.background,
            background_limit=self.background_limit,
            admitted=admitted,
            unit=0.001,
        )

"""In-memory store: one process, nothing survives a restart.

Every method runs without awaiting between its read and its write, so on one
event loop each operation is atomic, which is what ``claim_pending`` needs.
"""

from __future__ import annotations

import copy
import heapq
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.base import (
    CLEARED_BY_NEW_GRANT,
    DEFAULT_EVENTS_RETENTION_SECONDS,
    PROFILE_FIRST_FILL_DELAY,
    TOKEN_USE_RESOLUTION,
    Account,
    AccountStatus,
    AccountTokens,
    CallAdmission,
    CallRule,
    ClaimOutcome,
    ClaimResult,
    EventFactory,
    EventStatus,
    PendingAuthorization,
    PendingFailure,
    PendingStatus,
    ProfileClaim,
    ResealBatch,
    Store,
    StoredEvent,
    TokenGrant,
    build_event,
    check_event,
    check_event_condition,
    claim_refusal,
    epoch_ms,
    event_time,
    profile_attributes,
    window_ms,
)
from storage.crypto import TokenCipher, TokenIntegrityError
from storage.tokens import TOKEN_VERSION_FIELD, TokenSealer


# Records go in and out as copies, so no caller shares the stored object. Only
# their lists and dicts are mutable (str, datetime, enum fields are not), so a
# shallow copy plus copies of those is as good as copy.deepcopy at a sixth of the
# cost: this is the callback's hot path.
def _copy_pending(pending: PendingAuthorization) -> PendingAuthorization:
    clone = copy.copy(pending)
    clone.scopes = list(pending.scopes)
    if pending.failure is not None:
        clone.failure = copy.deepcopy(pending.failure)
    return clone


def _copy_account(account: Account) -> Account:
    clone = copy.copy(account)
    clone.scopes = list(account.scopes)
    clone.profile = copy.deepcopy(account.profile)
    return clone


def _event_of(
    event_factory: EventFactory | None, after: Account, before: Account | None
) -> dict[str, Any] | None:
    """``build_event`` on copies of the account after and before the change, and a copy
    of the event it builds."""
    if event_factory is None:
        return None  # nothing to copy
    event = build_event(
        event_factory, _copy_account(after), _copy_account(before) if before else None
    )
    return copy.deepcopy(event)


def _copy_event(stored: StoredEvent) -> StoredEvent:
    clone = copy.copy(stored)
    clone.event = copy.deepcopy(stored.event)
    return clone


@dataclass
class _ProfileFill:
    """When a pending profile is next due for the filler, and who holds it."""

    due_at: datetime
    holder: str | None = None
    failures: int = 0


class MemoryStore(Store):
    def __init__(
        self,
        cipher: TokenCipher | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        events_retention_seconds: int = DEFAULT_EVENTS_RETENTION_SECONDS,
    ) -> None:
        self._sealer = TokenSealer(cipher or TokenCipher.ephemeral())
        # Judges refresh leases: the one clock of this store's one process.
        self._clock = clock
        self._pending: dict[str, PendingAuthorization] = {}
        # (expires_at, jti), soonest first: purging looks at the expired ones only.
        self._expiries: list[tuple[datetime, str]] = []
        self._accounts: dict[str, Account] = {}
        self._sealed_tokens: dict[str, dict[str, Any]] = {}
        self._account_ids: dict[tuple[str, str, str], str] = {}
        # Account id -> (holder, expiry on ``self._clock``).
        self._leases: dict[str, tuple[str, float]] = {}
        # Account id -> token generation; kept when tokens are wiped, so it only grows.
        self._versions: dict[str, int] = {}
        # Budget name -> (admitted calls, admitted background calls), epoch milliseconds.
        self._call_logs: dict[str, tuple[list[float], list[float]]] = {}
        # Account events: outboxes by account id, then the log in seq order.
        self._outboxes: dict[str, list[dict[str, Any]]] = {}
        self._events: dict[str, StoredEvent] = {}
        self._event_ids: list[str] = []
        self._event_seq = 0
        # (holder, expiry on ``self._clock``), for the relay and for each claimed event.
        self._relay_lease: tuple[str, float] | None = None
        self._event_leases: dict[str, tuple[str, float]] = {}
        self._events_retention = timedelta(seconds=events_retention_seconds)
        # Account id -> its pending profile's schedule (MongoStore: profileRetryAt...).
        self._profile_fills: dict[str, _ProfileFill] = {}

    async def initialize(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def save_pending(self, pending: PendingAuthorization) -> None:
        self._purge_expired(pending.created_at)
        self._pending[pending.jti] = _copy_pending(pending)
        heapq.heappush(self._expiries, (pending.expires_at, pending.jti))

    async def claim_pending(self, jti: str, *, callback_digest: str, now: datetime) -> ClaimOutcome:
        pending = self._pending.get(jti)
        if pending is None:
            return ClaimOutcome(ClaimResult.UNKNOWN)
        refusal = claim_refusal(pending, now)
        if refusal is not None:
            return ClaimOutcome(refusal, _copy_pending(pending))
        pending.status = PendingStatus.IN_PROGRESS
        pending.callback_digest = callback_digest
        return ClaimOutcome(ClaimResult.CLAIMED, _copy_pending(pending))

    async def finish_pending(
        self,
        jti: str,
        *,
        status: PendingStatus,
        final_redirect: str | None = None,
        failure: PendingFailure | None = None,
    ) -> None:
        pending = self._pending.get(jti)
        if pending is not None:
            pending.status = status
            pending.final_redirect = final_redirect
            pending.failure = copy.deepcopy(failure)
            # Only the outcome is needed from here on.
            pending.code_verifier = None

    async def get_pending(self, jti: str) -> PendingAuthorization | None:
        pending = self._pending.get(jti)
        return _copy_pending(pending) if pending is not None else None

    def _purge_expired(self, now: datetime) -> None:
        # Mirrors MongoDB's TTL index, so a long-running demo does not grow forever.
        while self._expiries and self._expiries[0][0] <= now:
            _, jti = heapq.heappop(self._expiries)
            pending = self._pending.get(jti)
            if pending is not None and pending.expires_at <= now:
                del self._pending[jti]

    async def save_account_tokens(
        self,
        owner_id: str,
        grant: TokenGrant,
        *,
        now: datetime,
        event_factory: EventFactory | None = None,
    ) -> Account:
        natural_key = (owner_id, "tiktok", grant.open_id)
        account_id = self._account_ids.get(natural_key)
        before = self._accounts.get(account_id) if account_id is not None else None
        if before is None:
            account_id = uuid.uuid4().hex
            previous = Account(
                id=account_id,
                owner_id=owner_id,
                platform_account_id=grant.open_id,
                scopes=[],
                status=AccountStatus.CONNECTED,
                access_token_expires_at=None,
                refresh_token_expires_at=None,
                created_at=now,
                updated_at=now,
            )
        else:
            previous = before
        # A new grant: fresh tokens and expiries, and no trace of an earlier revocation.
        account = replace(
            previous,
            scopes=list(grant.scopes),
            status=AccountStatus.CONNECTED,
            access_token_expires_at=grant.access_token_expires_at,
            refresh_token_expires_at=grant.refresh_token_expires_at,
            updated_at=now,
            connected_at=now,
            **CLEARED_BY_NEW_GRANT,
        )
        # Built before anything is written: a factory that raises changes nothing.
        event = _event_of(event_factory, account, before)
        self._account_ids[natural_key] = account.id
        self._accounts[account.id] = account
        if before is None:
            self._profile_fills[account.id] = _ProfileFill(now + PROFILE_FIRST_FILL_DELAY)
        self._seal(account.id, owner_id, grant)
        self._record(account.id, event)
        # As MongoStore does: a refresh of the previous grant may start at once (one
        # still in flight cannot overwrite these tokens: their generation moved on).
        self._leases.pop(account.id, None)
        return _copy_account(account)

    def _seal(self, account_id: str, owner_id: str, grant: TokenGrant) -> None:
        version = self._versions.get(account_id, 0) + 1
        self._versions[account_id] = version
        sealed = self._sealer.seal(owner_id, grant)
        sealed[TOKEN_VERSION_FIELD] = version
        self._sealed_tokens[account_id] = sealed

    async def save_account_profile(
        self, account_id: str, profile: dict[str, Any], *, now: datetime
    ) -> Account:
        account = self._accounts[account_id]
        for attribute, value in profile_attributes(profile).items():
            setattr(account, attribute, value)
        account.profile = dict(profile)
        account.profile_pending = False
        account.updated_at = now
        self._profile_fills.pop(account_id, None)
        return _copy_account(account)

    async def schedule_profile_fill(self, account_id: str, *, at: datetime) -> None:
        account = self._accounts.get(account_id)
        if account is not None:
            account.profile_pending = True
            self._profile_fills[account_id] = _ProfileFill(at)

    async def claim_profile_fill(
        self, holder: str, *, now: datetime, until: datetime
    ) -> ProfileClaim | None:
        due = [
            (fill.due_at, account_id)
            for account_id, fill in self._profile_fills.items()
            if fill.due_at <= now and self._fill_wanted(account_id)
        ]
        if not due:
            return None
        _, account_id = min(due)
        fill = self._profile_fills[account_id]
        fill.due_at, fill.holder = until, holder
        return ProfileClaim(_copy_account(self._accounts[account_id]), fill.failures)

    def _fill_wanted(self, account_id: str) -> bool:
        account = self._accounts.get(account_id)
        return (
            account is not None
            and account.profile_pending
            and account.status is AccountStatus.CONNECTED
        )

    async def defer_profile_fill(
        self, account_id: str, holder: str, *, retry_at: datetime
    ) -> None:
        fill = self._profile_fills.get(account_id)
        if fill is not None and fill.holder == holder:
            fill.due_at, fill.holder = retry_at, None
            fill.failures += 1

    async def count_pending_profiles(self) -> int:
        return sum(1 for account_id in self._profile_fills if self._fill_wanted(account_id))

    async def get_account(self, account_id: str) -> Account | None:
        account = self._accounts.get(account_id)
        return _copy_account(account) if account else None

    async def list_accounts(self, owner_id: str) -> list[Account]:
        return [_copy_account(a) for a in self._accounts.values() if a.owner_id == owner_id]

    async def get_account_tokens(self, account_id: str) -> AccountTokens | None:
        account = self._accounts.get(account_id)
        sealed = self._sealed_tokens.get(account_id)
        if account is None or sealed is None:
            return None
        return self._sealer.open(account.owner_id, account.platform_account_id, sealed)

    async def acquire_refresh_lease(self, account_id: str, holder: str, *, seconds: float) -> bool:
        account = self._accounts.get(account_id)
        if account is None or account.status is not AccountStatus.CONNECTED:
            return False
        now = self._clock()
        lease = self._leases.get(account_id)
        if lease is not None and lease[1] > now:
            return False
        self._leases[account_id] = (holder, now + seconds)
        return True

    async def release_refresh_lease(self, account_id: str, holder: str) -> None:
        lease = self._leases.get(account_id)
        if lease is not None and lease[0] == holder:
            del self._leases[account_id]

    async def save_refreshed_tokens(
        self, account_id: str, grant: TokenGrant, *, version: int, now: datetime
    ) -> bool:
        account = self._accounts.get(account_id)
        if (
            account is None
            or account.status is AccountStatus.REVOKED
            or self._versions.get(account_id, 0) != version
        ):
            return False
        account.status = AccountStatus.CONNECTED
        account.access_token_expires_at = grant.access_token_expires_at
        account.refresh_token_expires_at = grant.refresh_token_expires_at
        if grant.scopes:
            account.scopes = list(grant.scopes)
        account.updated_at = now
        self._seal(account_id, account.owner_id, grant)
        return True

    async def require_reauthorization(
        self,
        account_id: str,
        *,
        now: datetime,
        version: int | None = None,
        event_factory: EventFactory | None = None,
    ) -> bool:
        account = self._accounts.get(account_id)
        if account is None or account.status is AccountStatus.REVOKED:
            return False
        if version is not None and self._versions.get(account_id, 0) != version:
            return False
        self._change(
            account,
            event_factory,
            status=AccountStatus.REAUTHORIZATION_REQUIRED,
            updated_at=now,
        )
        self._wipe_tokens(account_id)
        return True

    async def revoke_account(
        self,
        account_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        revoked_at_tiktok: bool | None,
        event_factory: EventFactory | None = None,
    ) -> Account | None:
        account = self._accounts.get(account_id)
        if account is None:
            return None
        if account.status is not AccountStatus.REVOKED:
            self._change(
                account,
                event_factory,
                status=AccountStatus.REVOKED,
                revoked_at=now,
                revocation_reason=reason,
                revoked_at_tiktok=revoked_at_tiktok,
                updated_at=now,
            )
            self._wipe_tokens(account_id)
        return _copy_account(account)

    async def revoke_accounts_by_open_id(
        self,
        open_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        connected_before: datetime | None = None,
        event_factory: EventFactory | None = None,
    ) -> int:
        changed = 0
        for account in list(self._accounts.values()):
            live = account.status is not AccountStatus.REVOKED
            older = (
                connected_before is None
                or account.connected_at is None
                or account.connected_at < connected_before
            )
            if account.platform_account_id == open_id and live and older:
                await self.revoke_account(
                    account.id, now=now, reason=reason, revoked_at_tiktok=True,
                    event_factory=event_factory,
                )
                changed += 1
        return changed

    async def accounts_due_for_refresh(
        self,
        before: datetime,
        *,
        limit: int,
        now: datetime | None = None,
        used_since: datetime | None = None,
    ) -> list[Account]:
        due = sorted(
            (a.access_token_expires_at, a.id)
            for a in self._accounts.values()
            if a.status is AccountStatus.CONNECTED
            and a.access_token_expires_at is not None
            and a.access_token_expires_at < before
            and (now is None or a.refresh_retry_at is None or a.refresh_retry_at <= now)
            and (used_since is None or (a.token_used_at is not None
                                        and a.token_used_at >= used_since))
        )
        return [_copy_account(self._accounts[account_id]) for _, account_id in due[:limit]]

    async def mark_token_used(self, account_id: str, *, now: datetime) -> None:
        account = self._accounts.get(account_id)
        if account is None:
            return
        used = account.token_used_at
        if used is None or used <= now - TOKEN_USE_RESOLUTION:
            account.token_used_at = now

    async def defer_refresh(self, account_id: str, *, retry_at: datetime, failures: int) -> None:
        account = self._accounts.get(account_id)
        if account is not None:
            account.refresh_retry_at = retry_at
            account.refresh_failures = failures

    async def clear_refresh_retry(self, account_id: str) -> None:
        account = self._accounts.get(account_id)
        if account is not None:
            account.refresh_retry_at = None
            account.refresh_failures = 0

    async def expire_refresh_tokens(
        self, *, now: datetime, event_factory: EventFactory | None = None
    ) -> int:
        expired = [
            a for a in self._accounts.values()
            if a.status is AccountStatus.CONNECTED
            and a.refresh_token_expires_at is not None
            and a.refresh_token_expires_at <= now
        ]
        for account in expired:
            self._change(
                account,
                event_factory,
                status=AccountStatus.REAUTHORIZATION_REQUIRED,
                updated_at=now,
            )
            self._wipe_tokens(account.id)
        return len(expired)

    async def record_expiry_notices(
        self, *, now: datetime, expiring_by: datetime, limit: int, event_factory: EventFactory
    ) -> int:
        expiring = sorted(
            (a.refresh_token_expires_at, a.id)
            for a in self._accounts.values()
            if a.status is AccountStatus.CONNECTED
            and a.expiry_notice_for is None
            and a.refresh_token_expires_at is not None
            and now < a.refresh_token_expires_at <= expiring_by
        )
        for expires_at, account_id in expiring[:limit]:
            self._change(self._accounts[account_id], event_factory, expiry_notice_for=expires_at)
        return len(expiring[:limit])

    def _change(self, account: Account, event_factory: EventFactory | None, **changes: Any) -> None:
        """Apply ``changes`` to the stored ``account`` and record the factory's event with
        them: one step, as no await comes between."""
        event = _event_of(event_factory, replace(account, **changes), account)
        for name, value in changes.items():
            setattr(account, name, value)
        self._record(account.id, event)

    def _record(self, account_id: str, event: dict[str, Any] | None) -> None:
        if event is not None:
            self._outboxes.setdefault(account_id, []).append(event)

    async def reseal_tokens(self, *, after: str | None, limit: int) -> ResealBatch:
        ids = sorted(i for i in self._accounts if after is None or i > after)[:limit]
        batch = ResealBatch(last_id=ids[-1] if ids else None)
        for account_id in ids:  # no await in here: nothing can change a record meanwhile
            account = self._accounts[account_id]
            sealed = self._sealed_tokens.get(account_id) or {}
            try:
                fresh = self._sealer.reseal(account.owner_id, account.platform_account_id, sealed)
            except TokenIntegrityError:
                batch.unreadable.append(account_id)
                continue
            if fresh is None:
                batch.current += 1
            else:
                self._sealed_tokens[account_id] = sealed | fresh
                batch.resealed += 1
        return batch

    def _wipe_tokens(self, account_id: str) -> None:
        self._sealed_tokens.pop(account_id, None)
        self._leases.pop(account_id, None)

    # -- TikTok call budgets ----------------------------------------------------------

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
        if limit < 1:
            raise ValueError("limit must be at least 1")
        rule = CallRule(limit, window_ms(window_seconds), background, background_limit)
        calls, background_calls = self._call_logs.setdefault(budget, ([], []))
        # No await in here: the decision and its record are one step on this loop.
        return rule.judge(calls, background_calls, epoch_ms(now or datetime.now(UTC)))

    # -- account events ---------------------------------------------------------------
    # No await between a read and its write here either, so each method is atomic.

    async def append_account_event(
        self, account_id: str, event: dict[str, Any], *, only_if: dict[str, Any] | None = None
    ) -> bool:
        check_event(event)
        conditions = check_event_condition(only_if)
        account = self._accounts.get(account_id)
        if account is None:
            return False
        for attribute, expected in conditions.items():
            if getattr(account, attribute) != expected:
                return False
        self._outboxes.setdefault(account_id, []).append(copy.deepcopy(event))
        return True

    async def acquire_relay_lease(self, holder: str, *, seconds: float) -> bool:
        lease, now = self._relay_lease, self._clock()
        if lease is not None and lease[0] != holder and lease[1] > now:
            return False
        self._relay_lease = (holder, now + seconds)
        return True

    async def release_relay_lease(self, holder: str) -> None:
        if self._relay_lease is not None and self._relay_lease[0] == holder:
            self._relay_lease = None

    async def relay_outbox(
        self, holder: str, *, now: datetime, fence_seconds: float, push: bool, limit: int
    ) -> list[StoredEvent]:
        self._purge_events(now)
        queues = [
            [(account_id, event) for event in outbox]
            for account_id, outbox in self._outboxes.items()
            if outbox
        ]
        relayed: list[StoredEvent] = []
        # Oldest first across accounts; merge() keeps each account's outbox order.
        for account_id, event in heapq.merge(*queues, key=lambda item: item[1]["timestamp"]):
            lease, fence = self._relay_lease, self._clock() + fence_seconds
            if len(relayed) >= limit or lease is None or lease[0] != holder or lease[1] <= fence:
                break
            if event["id"] not in self._events:
                self._event_seq += 1
                stored = StoredEvent(
                    seq=self._event_seq,
                    event=event,
                    account_id=account_id,
                    owner_id=self._accounts[account_id].owner_id,
                    status=EventStatus.PENDING if push else EventStatus.PULL_ONLY,
                    recorded_at=now,
                    next_attempt_at=now if push else None,
                )
                self._events[event["id"]] = stored
                self._event_ids.append(event["id"])
                relayed.append(_copy_event(stored))
            self._outboxes[account_id].remove(event)
        return relayed

    def _purge_events(self, now: datetime) -> None:
        # Mirrors the TTL index on the MongoDB event log.
        cutoff = now - self._events_retention
        kept = 0
        for event_id in self._event_ids:
            if self._events[event_id].recorded_at > cutoff:
                break
            del self._events[event_id]
            self._event_leases.pop(event_id, None)
            kept += 1
        del self._event_ids[:kept]

    def _logged(self) -> list[StoredEvent]:
        return [self._events[event_id] for event_id in self._event_ids]

    async def list_events(
        self, *, after_seq: int, limit: int, status: EventStatus | None = None
    ) -> list[StoredEvent]:
        found = [
            _copy_event(stored)
            for stored in self._logged()
            if stored.seq > after_seq and (status is None or stored.status is status)
        ]
        return found[:limit]

    async def get_event(self, event_id: str) -> StoredEvent | None:
        stored = self._events.get(event_id)
        return _copy_event(stored) if stored is not None else None

    async def due_events(self, *, now: datetime, limit: int) -> list[StoredEvent]:
        heads: set[str] = set()
        due: list[StoredEvent] = []
        for stored in self._logged():
            if stored.status is not EventStatus.PENDING or stored.account_id in heads:
                continue
            heads.add(stored.account_id)  # a later event of this account waits for it
            if self._claimable(stored, now):
                due.append(_copy_event(stored))
                if len(due) >= limit:
                    break
        return due

    async def claim_event_for_delivery(
        self, event_id: str, holder: str, *, now: datetime, seconds: float
    ) -> StoredEvent | None:
        stored = self._events.get(event_id)
        if stored is None or not self._claimable(stored, now):
            return None
        self._event_leases[event_id] = (holder, self._clock() + seconds)
        # For whoever reads it: the expiry on the caller's clock.
        stored.lease_holder = holder
        stored.lease_expires_at = now + timedelta(seconds=seconds)
        if stored.first_attempt_at is None:
            stored.first_attempt_at = now
        return _copy_event(stored)

    def _claimable(self, stored: StoredEvent, now: datetime) -> bool:
        lease = self._event_leases.get(stored.id)
        return (
            stored.status is EventStatus.PENDING
            and stored.next_attempt_at is not None
            and stored.next_attempt_at <= now
            and (lease is None or lease[1] <= self._clock())
        )

    def _leased_by(self, event_id: str, holder: str) -> StoredEvent | None:
        stored = self._events.get(event_id)
        lease = self._event_leases.get(event_id)
        if stored is None or lease is None or lease[0] != holder:
            return None
        del self._event_leases[event_id]
        stored.lease_holder = stored.lease_expires_at = None
        stored.attempts += 1
        return stored

    async def mark_delivered(self, event_id: str, holder: str, *, now: datetime) -> bool:
        stored = self._leased_by(event_id, holder)
        if stored is None:
            return False
        stored.status = EventStatus.DELIVERED
        stored.delivered_at = now
        stored.next_attempt_at = stored.last_failure = None
        return True

    async def mark_attempt_failed(
        self,
        event_id: str,
        holder: str,
        *,
        now: datetime,
        failure: str,
        next_attempt_at: datetime | None,
    ) -> bool:
        stored = self._leased_by(event_id, holder)
        if stored is None:
            return False
        stored.last_failure = failure
        stored.next_attempt_at = next_attempt_at
        if next_attempt_at is None:
            stored.status = EventStatus.FAILED
        return True

    async def redeliver_event(self, event_id: str, *, now: datetime) -> StoredEvent | None:
        stored = self._events.get(event_id)
        if stored is None:
            return None
        if stored.status is EventStatus.FAILED:
            self._event_leases.pop(event_id, None)
            stored.status = EventStatus.PENDING
            stored.attempts = 0
            stored.next_attempt_at = now
            stored.first_attempt_at = stored.last_failure = None
        return _copy_event(stored)

    async def oldest_undelivered(self) -> datetime | None:
        times = [event_time(event) for outbox in self._outboxes.values() for event in outbox]
        times += [
            event_time(stored.event)
            for stored in self._events.values()
            if stored.status is EventStatus.PENDING
        ]
        return min(times, default=None)


"""In-memory store: one process, nothing survives a restart.

Every method runs without awaiting between its read and its write, so on one
event loop each operation is atomic, which is what ``claim_pending`` needs.
"""

from __future__ import annotations

import copy
import heapq
import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from storage.base import (
    PROFILE_FIELDS,
    PROFILE_FIRST_FILL_DELAY,
    Account,
    AccountStatus,
    AccountTokens,
    ClaimOutcome,
    ClaimResult,
    PendingAuthorization,
    PendingFailure,
    PendingStatus,
    ProfileClaim,
    ResealBatch,
    Store,
    TokenGrant,
)
from storage.crypto import TokenCipher, TokenIntegrityError
from storage.tokens import TokenSealer

_CLAIM_REFUSALS = {
    PendingStatus.IN_PROGRESS: ClaimResult.IN_PROGRESS,
    PendingStatus.FAILED: ClaimResult.FAILED,
}


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


@dataclass
class _ProfileFill:
    """When a pending profile is next due for the filler, and who holds it."""

    due_at: datetime
    holder: str | None = None
    failures: int = 0


class MemoryStore(Store):
    def __init__(self, cipher: TokenCipher | None = None) -> None:
        self._sealer = TokenSealer(cipher or TokenCipher.ephemeral())
        self._pending: dict[str, PendingAuthorization] = {}
        # (expires_at, jti), soonest first: purging looks at the expired ones only.
        self._expiries: list[tuple[datetime, str]] = []
        self._accounts: dict[str, Account] = {}
        self._sealed_tokens: dict[str, dict[str, Any]] = {}
        self._account_ids: dict[tuple[str, str, str], str] = {}
        self._leases: dict[str, tuple[str, datetime]] = {}
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
        if pending.status is PendingStatus.COMPLETED:
            return ClaimOutcome(ClaimResult.ALREADY_COMPLETED, _copy_pending(pending))
        if pending.status in _CLAIM_REFUSALS:
            return ClaimOutcome(_CLAIM_REFUSALS[pending.status], _copy_pending(pending))
        if pending.expires_at <= now:
            return ClaimOutcome(ClaimResult.EXPIRED, _copy_pending(pending))
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
        self, owner_id: str, grant: TokenGrant, *, now: datetime
    ) -> Account:
        natural_key = (owner_id, "tiktok", grant.open_id)
        account_id = self._account_ids.get(natural_key)
        if account_id is None:
            account_id = uuid.uuid4().hex
            self._account_ids[natural_key] = account_id
            self._profile_fills[account_id] = _ProfileFill(now + PROFILE_FIRST_FILL_DELAY)
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
            previous = self._accounts[account_id]
        # A new grant: fresh tokens and expiries, and no trace of an earlier revocation.
        account = replace(
            previous,
            scopes=list(grant.scopes),
            status=AccountStatus.CONNECTED,
            access_token_expires_at=grant.access_token_expires_at,
            refresh_token_expires_at=grant.refresh_token_expires_at,
            updated_at=now,
            connected_at=now,
            revoked_at=None,
            revocation_reason=None,
            revoked_at_tiktok=None,
        )
        self._accounts[account_id] = account
        self._sealed_tokens[account_id] = self._sealer.seal(owner_id, grant)
        # As MongoStore does: a refresh of the previous grant still in flight must not
        # overwrite these tokens.
        self._leases.pop(account_id, None)
        return _copy_account(account)

    async def save_account_profile(
        self, account_id: str, profile: dict[str, Any], *, now: datetime
    ) -> Account:
        account = self._accounts[account_id]
        for tiktok_field, attribute in PROFILE_FIELDS.items():
            if tiktok_field in profile:
                setattr(account, attribute, profile[tiktok_field])
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

    async def acquire_refresh_lease(
        self, account_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        account = self._accounts.get(account_id)
        if account is None or account.status is not AccountStatus.CONNECTED:
            return False
        lease = self._leases.get(account_id)
        if lease is not None and lease[1] > now:
            return False
        self._leases[account_id] = (holder, until)
        return True

    async def release_refresh_lease(self, account_id: str, holder: str) -> None:
        lease = self._leases.get(account_id)
        if lease is not None and lease[0] == holder:
            del self._leases[account_id]

    async def save_refreshed_tokens(
        self, account_id: str, holder: str, grant: TokenGrant, *, now: datetime
    ) -> bool:
        lease = self._leases.get(account_id)
        account = self._accounts.get(account_id)
        if lease is None or lease[0] != holder or account is None:
            return False
        del self._leases[account_id]
        account.access_token_expires_at = grant.access_token_expires_at
        account.refresh_token_expires_at = grant.refresh_token_expires_at
        if grant.scopes:
            account.scopes = list(grant.scopes)
        account.updated_at = now
        self._sealed_tokens[account_id] = self._sealer.seal(account.owner_id, grant)
        return True

    async def require_reauthorization(self, account_id: str, *, now: datetime) -> None:
        account = self._accounts.get(account_id)
        if account is None or account.status is AccountStatus.REVOKED:
            return
        self._wipe_tokens(account_id)
        account.status = AccountStatus.REAUTHORIZATION_REQUIRED
        account.updated_at = now

    async def revoke_account(
        self,
        account_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        revoked_at_tiktok: bool | None,
    ) -> Account | None:
        account = self._accounts.get(account_id)
        if account is None:
            return None
        if account.status is not AccountStatus.REVOKED:
            self._wipe_tokens(account_id)
            account.status = AccountStatus.REVOKED
            account.revoked_at = now
            account.revocation_reason = reason
            account.revoked_at_tiktok = revoked_at_tiktok
            account.updated_at = now
        return _copy_account(account)

    async def revoke_accounts_by_open_id(
        self,
        open_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        connected_before: datetime | None = None,
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
                    account.id, now=now, reason=reason, revoked_at_tiktok=True
                )
                changed += 1
        return changed

    async def accounts_due_for_refresh(self, before: datetime, *, limit: int) -> list[Account]:
        due = sorted(
            (a.access_token_expires_at, a.id)
            for a in self._accounts.values()
            if a.status is AccountStatus.CONNECTED
            and a.access_token_expires_at is not None
            and a.access_token_expires_at < before
        )
        return [_copy_account(self._accounts[account_id]) for _, account_id in due[:limit]]

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

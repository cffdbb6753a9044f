"""The store interface and the records it holds.

Implementations: ``storage.memory.MemoryStore`` (one process, nothing persists)
and ``storage.mongodb.MongoStore``. Both raise ``StoreUnavailable`` for every
infrastructure failure, so callers never see driver exceptions.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

PLATFORM = "tiktok"


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


@dataclass
class AccountTokens:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    access_token_expires_at: datetime
    refresh_token_expires_at: datetime


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


PROFILE_FIELDS = {
    # TikTok user-info field -> account attribute
    "union_id": "union_id",
    "display_name": "display_name",
    "avatar_url": "avatar_url",
    "username": "username",
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
        self, owner_id: str, grant: TokenGrant, *, now: datetime
    ) -> Account:
        """Create or update the (owner, tiktok, open_id) account with fresh tokens."""

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
    # A refresh is guarded by a lease on the account record, claimed atomically
    # and expiring on its own, so one refresh runs across every gateway process
    # and a crashed holder blocks nobody for longer than the lease.

    @abc.abstractmethod
    async def acquire_refresh_lease(
        self, account_id: str, holder: str, *, now: datetime, until: datetime
    ) -> bool:
        """Take the lease if it is free or expired and the account is connected."""

    @abc.abstractmethod
    async def release_refresh_lease(self, account_id: str, holder: str) -> None:
        """Give the lease back (only if ``holder`` still has it)."""

    @abc.abstractmethod
    async def save_refreshed_tokens(
        self, account_id: str, holder: str, grant: TokenGrant, *, now: datetime
    ) -> bool:
        """Store the new tokens and expiries and drop the lease, in one atomic update.

        Returns False (and writes nothing) if ``holder`` no longer holds the lease.
        """

    @abc.abstractmethod
    async def require_reauthorization(self, account_id: str, *, now: datetime) -> None:
        """Wipe both tokens and mark the account ``reauthorization_required``."""

    @abc.abstractmethod
    async def revoke_account(
        self,
        account_id: str,
        *,
        now: datetime,
        reason: int | str | None,
        revoked_at_tiktok: bool | None,
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
    ) -> int:
        """Revoke every live account of this TikTok user; returns how many changed.

        With ``connected_before``, grants obtained at or after it are kept: a late
        redelivery of an old removal must not revoke a newer connection.
        """

    @abc.abstractmethod
    async def accounts_due_for_refresh(self, before: datetime, *, limit: int) -> list[Account]:
        """Connected accounts whose access token expires before ``before``, soonest first."""

    # -- key rotation ---------------------------------------------------------------

    @abc.abstractmethod
    async def reseal_tokens(self, *, after: str | None, limit: int) -> ResealBatch:
        """Encrypt again, with the current key, the tokens of up to ``limit`` accounts
        whose id comes after ``after`` (all from the first with None).

        Each account is rewritten only if its tokens are still those that were read,
        so a refresh or a disconnect running meanwhile is never undone.
        """

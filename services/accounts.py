"""Connected accounts after the callback: hand out tokens, refresh, disconnect.

``refresh_account`` is the one refresh path, used by the access-token endpoint
and the background refresher alike.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from core.clock import utcnow
from core.errors import (
    Conflict,
    GatewayError,
    NotFound,
    ProviderRejected,
    ProviderUnavailable,
    ServiceUnavailable,
)
from services.metrics import GatewayMetrics
from services.tiktok import TikTokClient
from storage.base import Account, AccountStatus, AccountTokens, Store, TokenGrant

log = logging.getLogger("gateway.accounts")

# TikTok's answer to a refresh token it no longer honours.
REFUSED_REFRESH_ERRORS = frozenset({"invalid_grant"})
REVOKE_ATTEMPTS = 3


class RefreshOutcome(enum.StrEnum):
    REFRESHED = "refreshed"
    NOT_DUE = "not_due"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"
    REFRESH_TOKEN_EXPIRED = "refresh_token_expired"  # noqa: S105 - an outcome name
    UNAVAILABLE = "unavailable"
    BUSY = "busy"


@dataclass(frozen=True)
class _Attempt:
    outcome: RefreshOutcome
    # What TikTok answered when the outcome is UNAVAILABLE (Retry-After, logId).
    failure: GatewayError | None = None


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    expires_at: datetime
    scopes: list[str]
    open_id: str


@dataclass(frozen=True)
class Disconnected:
    status: str
    revoked_at_tiktok: bool


class AccountService:
    def __init__(
        self,
        *,
        store: Store,
        tiktok: TikTokClient,
        refresh_skew_seconds: int = 300,
        lease_seconds: float = 15.0,
        wait_poll_seconds: float = 0.05,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._store = store
        self._tiktok = tiktok
        self.refresh_skew = timedelta(seconds=refresh_skew_seconds)
        self._lease = timedelta(seconds=lease_seconds)
        self._poll = wait_poll_seconds
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics or GatewayMetrics()
        # Names this process's lease holders, so logs can tell processes apart.
        self._holder_prefix = secrets.token_hex(4)

    async def list_accounts(self, owner_id: str) -> list[Account]:
        now = self._clock()
        return [_as_seen(a, now) for a in await self._store.list_accounts(owner_id)]

    async def view_account(self, owner_id: str, account_id: str) -> Account:
        """The account as the product sees it (``get_account`` is the stored record)."""
        return _as_seen(await self.get_account(owner_id, account_id), self._clock())

    async def get_account(self, owner_id: str, account_id: str) -> Account:
        account = await self._store.get_account(account_id)
        # Another owner's account and a missing one look the same: ids cannot be probed.
        if account is None or account.owner_id != owner_id:
            raise NotFound(
                "This TikTok account is not connected.",
                technical_message="no such account for this owner",
            )
        return account

    async def access_token(self, owner_id: str, account_id: str) -> AccessToken:
        """A usable access token, refreshed first when it is about to expire."""
        account = await self.get_account(owner_id, account_id)
        deadline = self._clock() + self._lease * 2
        due: AccountTokens | None = None  # the tokens this request found due
        while True:
            _raise_if_unusable(account)
            tokens = await self._store.get_account_tokens(account.id)
            if tokens is None:
                raise _reauthorization_conflict("reauthorization_required")
            fresh = tokens.access_token_expires_at - self._clock() > self.refresh_skew
            # Replaced since we found it due (by us, or by a concurrent holder): that is
            # the token to hand out, even if TikTok made it shorter-lived than the skew.
            if fresh or _replaced(tokens, due):
                return await self._handed_out(account, tokens)
            due = tokens
            attempt = await self._refresh(account, force=False, due=due)
            outcome = attempt.outcome
            if outcome is RefreshOutcome.UNAVAILABLE:
                failure = attempt.failure
                raise ProviderUnavailable(
                    technical_message="TikTok refresh failed; the current tokens are untouched",
                    details={
                        **(failure.details if failure else {}),
                        "dependency": "tiktok",
                        "endpoint": "refresh",
                    },
                    # TikTok's own Retry-After (429) when it sent one.
                    retry_after=(failure.retry_after if failure else None) or 5,
                )
            if outcome is RefreshOutcome.BUSY:
                # Another request (maybe in another process) holds the lease: wait for it.
                if self._clock() > deadline:
                    raise ServiceUnavailable(
                        technical_message="a concurrent refresh did not finish in time",
                        details={"dependency": "tiktok", "endpoint": "refresh"},
                        retry_after=1,
                    )
                await self._sleep(self._poll)
            reloaded = await self._store.get_account(account.id)
            if reloaded is None:
                raise NotFound(technical_message="account disappeared during refresh")
            account = reloaded

    async def _handed_out(self, account: Account, tokens: AccountTokens) -> AccessToken:
        """The access token as handed out, its use noted for the background refresher."""
        try:
            await self._store.mark_token_used(account.id, now=self._clock())
        except GatewayError as exc:
            # Only keep-warm depends on it: the token itself is good to hand out.
            log.warning("could not note the token use of account %s: %s", account.id,
                        exc.technical_message or exc.message)
        return _access_token(account, tokens)

    async def refresh_account(self, account: Account, *, force: bool = False) -> RefreshOutcome:
        """Refresh one account's tokens under the lease. Never raises for TikTok faults."""
        return (await self._refresh(account, force=force)).outcome

    async def _refresh(
        self, account: Account, *, force: bool, due: AccountTokens | None = None
    ) -> _Attempt:
        """``_attempt_refresh``, counted by outcome (``error`` when it raised)."""
        outcome = "error"
        try:
            attempt = await self._attempt_refresh(account, force=force, due=due)
            outcome = attempt.outcome.value
            return attempt
        finally:
            self._metrics.refresh(outcome)

    async def _attempt_refresh(
        self, account: Account, *, force: bool, due: AccountTokens | None = None
    ) -> _Attempt:
        now = self._clock()
        if account.status is not AccountStatus.CONNECTED:
            return _Attempt(RefreshOutcome.REAUTHORIZATION_REQUIRED)
        if account.refresh_token_expires_at and account.refresh_token_expires_at <= now:
            # No point asking TikTok: the refresh token is dead.
            await self._store.require_reauthorization(account.id, now=now)
            return _Attempt(RefreshOutcome.REFRESH_TOKEN_EXPIRED)
        holder = f"{self._holder_prefix}-{secrets.token_hex(6)}"
        if not await self._store.acquire_refresh_lease(
            account.id, holder, now=now, until=now + self._lease
        ):
            return _Attempt(RefreshOutcome.BUSY)
        try:
            tokens = await self._store.get_account_tokens(account.id)
            if tokens is None:
                await self._store.require_reauthorization(account.id, now=now)
                return _Attempt(RefreshOutcome.REAUTHORIZATION_REQUIRED)
            not_due = tokens.access_token_expires_at - now > self.refresh_skew
            if not force and (not_due or _replaced(tokens, due)):
                # Someone refreshed between our read and our lease.
                return _Attempt(RefreshOutcome.NOT_DUE)
            try:
                response = await self._tiktok.refresh(tokens.refresh_token)
            except ProviderRejected as exc:
                if exc.details.get("providerError") in REFUSED_REFRESH_ERRORS:
                    await self._store.require_reauthorization(account.id, now=self._clock())
                    log.warning("refresh token refused for account %s", account.id)
                    return _Attempt(RefreshOutcome.REAUTHORIZATION_REQUIRED)
                log.error("refresh for account %s refused: %s", account.id, exc.technical_message)
                return _Attempt(RefreshOutcome.UNAVAILABLE, exc)
            except GatewayError as exc:
                log.warning("refresh for account %s failed: %s", account.id, exc.technical_message)
                return _Attempt(RefreshOutcome.UNAVAILABLE, exc)
            refreshed_at = self._clock()
            saved = await self._store.save_refreshed_tokens(
                account.id,
                holder,
                TokenGrant(
                    # Tokens are sealed under the stored identity, whatever TikTok echoes.
                    open_id=account.platform_account_id,
                    access_token=response.access_token,
                    refresh_token=response.refresh_token,
                    access_token_expires_at=refreshed_at + timedelta(seconds=response.expires_in),
                    refresh_token_expires_at=refreshed_at
                    + timedelta(seconds=response.refresh_expires_in),
                    scopes=response.scopes or account.scopes,
                ),
                now=refreshed_at,
            )
            if not saved:
                log.error("refresh lease of account %s expired before the new tokens were saved",
                          account.id)
                return _Attempt(RefreshOutcome.UNAVAILABLE)
            log.info("refreshed account %s (log_id=%s)", account.id, response.log_id or "-")
            return _Attempt(RefreshOutcome.REFRESHED)
        finally:
            await self._store.release_refresh_lease(account.id, holder)

    async def disconnect(self, owner_id: str, account_id: str) -> Disconnected:
        """Revoke at TikTok (bounded retries), then wipe the tokens whatever TikTok said.

        Revoke takes the access token, and whether TikTok accepts an expired one is
        undocumented: one that has expired or is about to is refreshed first, through
        the one refresh path. A dead refresh token leaves nothing to revoke with.
        """
        account = await self.get_account(owner_id, account_id)
        if account.status is AccountStatus.REVOKED:
            return Disconnected("revoked", bool(account.revoked_at_tiktok))
        tokens = await self._store.get_account_tokens(account.id)
        if tokens is not None:
            tokens = await self._revocable(account, tokens)
        revoked_at_tiktok = False
        if tokens is not None:
            revoked_at_tiktok = await self._revoke_at_tiktok(account.id, tokens.access_token)
        revoked = await self._store.revoke_account(
            account.id, now=self._clock(), reason="disconnected",
            revoked_at_tiktok=revoked_at_tiktok,
        )
        # A concurrent disconnect may have won: report what is stored.
        stored = bool(revoked.revoked_at_tiktok) if revoked else revoked_at_tiktok
        return Disconnected("revoked", stored)

    async def _revocable(self, account: Account, tokens: AccountTokens) -> AccountTokens | None:
        """Tokens whose access token is live for a while yet, refreshed if need be; None
        when the refresh token turned out dead (the account then needs reauthorization)."""
        deadline = self._clock() + self._lease * 2
        while tokens.access_token_expires_at - self._clock() <= self.refresh_skew:
            outcome = await self.refresh_account(account, force=True)
            if outcome in (RefreshOutcome.REAUTHORIZATION_REQUIRED,
                           RefreshOutcome.REFRESH_TOKEN_EXPIRED):
                return None
            if outcome is RefreshOutcome.BUSY:
                await self._sleep(self._poll)
            current = await self._store.get_account_tokens(account.id)
            # Refreshed here or by another holder (or replaced by a reconnect).
            if current is None or outcome is RefreshOutcome.REFRESHED or _replaced(current, tokens):
                return current
            if outcome is not RefreshOutcome.BUSY or self._clock() > deadline:
                # TikTok failed: the old token is still worth a revoke.
                return tokens
        return tokens

    async def _revoke_at_tiktok(self, account_id: str, access_token: str) -> bool:
        for attempt in range(REVOKE_ATTEMPTS):
            try:
                await self._tiktok.revoke(access_token)
                return True
            except ProviderRejected as exc:
                log.warning("TikTok refused to revoke account %s: %s", account_id,
                            exc.technical_message)
                return False
            except GatewayError as exc:
                log.warning("revoke attempt %d for account %s failed: %s", attempt + 1,
                            account_id, exc.technical_message)
                if attempt + 1 < REVOKE_ATTEMPTS:
                    await self._sleep(0.2 * (2**attempt))
        return False


def _replaced(tokens: AccountTokens, due: AccountTokens | None) -> bool:
    """Whether ``tokens`` were refreshed since ``due`` was read."""
    return due is not None and (
        tokens.access_token != due.access_token
        or tokens.access_token_expires_at != due.access_token_expires_at
    )


def _as_seen(account: Account, now: datetime) -> Account:
    """A connected account whose refresh token has expired needs reauthorization, even
    before the refresher records it: the product never sees it ``connected``."""
    expires = account.refresh_token_expires_at
    if account.status is AccountStatus.CONNECTED and expires is not None and expires <= now:
        return replace(account, status=AccountStatus.REAUTHORIZATION_REQUIRED)
    return account


def _raise_if_unusable(account: Account) -> None:
    if account.status is AccountStatus.REVOKED:
        raise _reauthorization_conflict("revoked")
    if account.status is AccountStatus.REAUTHORIZATION_REQUIRED:
        raise _reauthorization_conflict("reauthorization_required")


def _reauthorization_conflict(reason: str) -> Conflict:
    return Conflict(
        "This TikTok account needs to be connected again.",
        technical_message=f"account is {reason}; send the user through authorize again",
        details={"reason": reason},
    )


def _access_token(account: Account, tokens: AccountTokens) -> AccessToken:
    return AccessToken(
        access_token=tokens.access_token,
        expires_at=tokens.access_token_expires_at,
        scopes=list(account.scopes),
        open_id=account.platform_account_id,
    )

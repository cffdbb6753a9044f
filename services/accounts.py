"""Connected accounts after the callback: hand out tokens, refresh, disconnect.

``refresh_account`` is the one refresh path, used by the access-token endpoint
and the background refresher alike.

TikTok rotates refresh tokens: its answer to a refresh is the only live
credential, the token sent dies with it. So a refresh stores its answer by a
compare-and-set on the token generation it read (``AccountTokens.version``),
never on still holding its lease (the lease only keeps concurrent requests,
across processes, to one call); a write that fails keeps the answer in this
process's memory (``UnsavedGrants``) and writes it again until it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from core.clock import utcnow
from core.errors import (
    Conflict,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    ProviderRejected,
    ProviderUnavailable,
    ServiceUnavailable,
)
from services.events import (
    REFRESH_REFUSED,
    REFRESH_TOKEN_EXPIRED,
    SOURCE_PRODUCT,
    AccountEvents,
)
from services.metrics import GatewayMetrics
from services.tiktok import TikTokClient
from storage.base import Account, AccountStatus, AccountTokens, Store, TokenGrant

if TYPE_CHECKING:
    from services.config import Config

log = logging.getLogger("gateway.accounts")
P = ParamSpec("P")
_T = TypeVar("_T")

# TikTok's answer to a refresh token it no longer honours.
REFUSED_REFRESH_ERRORS = frozenset({"invalid_grant"})
REVOKE_ATTEMPTS = 3
# A lease outlives everything its holder does until the new tokens are stored: the
# answer of the store call that took it, the token read, the call to TikTok, and the
# save (a read and a write). One MongoDB call takes at most a new connection
# (MONGODB_TIMEOUT_MS) and the operation (MONGODB_OPERATION_TIMEOUT_MS).
LEASE_STORE_CALLS = 4
LEASE_MARGIN_SECONDS = 2.0
# Writing a grant again after the store failed: 0.2 s, then twice as long, up to 5 s.
SAVE_RETRY_FIRST_SECONDS = 0.2
SAVE_RETRY_MAX_SECONDS = 5.0
# A request waiting for another's refresh looks again this often, at most.
WAIT_POLL_MAX_SECONDS = 0.5
FLUSH_POLL_SECONDS = 0.05


def refresh_lease_seconds(config: Config) -> float:
    """The refresh lease for ``config``: longer than a call to TikTok (connect and
    request timeouts) plus the store calls made under the lease (none that can hang
    for the in-memory store)."""
    tiktok = config.tiktok_connect_timeout + config.tiktok_request_timeout
    store_call = 0.0
    if config.mongodb_uri:
        store_call = (config.mongodb_timeout_ms + config.mongodb_operation_timeout_ms) / 1000
    return tiktok + LEASE_STORE_CALLS * store_call + LEASE_MARGIN_SECONDS


class RefreshOutcome(enum.StrEnum):
    REFRESHED = "refreshed"
    NOT_DUE = "not_due"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"
    REFRESH_TOKEN_EXPIRED = "refresh_token_expired"  # noqa: S105 - an outcome name
    UNAVAILABLE = "unavailable"
    # The request reached TikTok (maybe) but its answer never came: tokens kept.
    UNKNOWN = "unknown"
    # Newer tokens were stored meanwhile (a reconnect): they stay and are handed out.
    SUPERSEDED = "superseded"
    BUSY = "busy"


@dataclass(frozen=True)
class _Attempt:
    outcome: RefreshOutcome
    # What TikTok answered when the outcome is UNAVAILABLE (Retry-After, logId).
    failure: GatewayError | None = None


@dataclass(frozen=True)
class AccessToken:
    access_token: str = field(repr=False)
    expires_at: datetime
    scopes: list[str]
    open_id: str


@dataclass(frozen=True)
class Disconnected:
    status: str
    revoked_at_tiktok: bool


@dataclass(eq=False)
class _Unsaved:
    account_id: str
    grant: TokenGrant = field(repr=False)  # tokens: never in a repr or a log
    version: int  # the generation the refresh sent to TikTok
    holder: str  # its lease, released once the grant is settled (if still held)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    retrying: asyncio.Task[None] | None = field(default=None, repr=False)
    # None until settled; then True (stored) or False (newer tokens were stored).
    stored: bool | None = None


class UnsavedGrants:
    """Refresh answers this process got from TikTok and has not stored yet.

    A grant is registered before its first write, so nothing can lose it but the
    process itself: a write that fails (``StoreUnavailable``) is retried in the
    background with backoff until it lands or finds newer tokens stored, after the
    request that caused it has answered 503 too. It lives in this process's memory
    only (its tokens are never logged): one ``UnsavedGrants`` per process, shared by
    its ``AccountService`` objects, flushed by a graceful shutdown. A process killed while
    the store is down loses it, and the user must connect the account again.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        first_delay: float = SAVE_RETRY_FIRST_SECONDS,
        max_delay: float = SAVE_RETRY_MAX_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._unsaved: dict[str, _Unsaved] = {}
        self._refreshing = 0
        # Background writes, until they end (a write just landed may still be releasing).
        self._retries: dict[asyncio.Task[None], _Unsaved] = {}

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._unsaved

    def __len__(self) -> int:
        return len(self._unsaved)

    def run_to_the_end(self, refresh: Awaitable[_T]) -> Awaitable[_T]:
        """A call to TikTok and the save of its answer, run on even if its caller is
        cancelled (a shutdown, a cut request): once sent, TikTok rotates the refresh
        token it carries, so its answer is the account's only live credential. A
        shutdown waits for it (``flush``)."""
        self._refreshing += 1
        task = asyncio.ensure_future(refresh)
        task.add_done_callback(self._refreshed)
        return asyncio.shield(task)

    def _refreshed(self, task: asyncio.Future[Any]) -> None:
        self._refreshing -= 1
        if not task.cancelled() and task.exception() is not None:
            log.warning("a token refresh whose caller had gone failed: %r", task.exception())

    async def save(
        self, account_id: str, grant: TokenGrant, *, version: int, holder: str
    ) -> bool:
        """Store ``grant`` over generation ``version``: True once stored, False when
        newer tokens were. Raises ``StoreUnavailable`` if the write fails: the grant
        is kept and written again in the background."""
        unsaved = _Unsaved(account_id, grant, version, holder)
        self._unsaved[account_id] = unsaved
        try:
            return await self._write(unsaved, release=False)  # the refresh releases it
        except BaseException as exc:  # the store failed, or this task was cancelled
            if unsaved.stored is None:
                log.error(
                    "the new tokens of account %s could not be stored (%s): kept in this "
                    "process's memory and written again until they are",
                    account_id,
                    getattr(exc, "technical_message", None) or type(exc).__name__,
                )
                self._retry_in_background(unsaved)
            raise

    async def settle(self, account_id: str) -> bool | None:
        """If a grant of ``account_id`` is unsaved, write it now: True (stored) or False
        (newer tokens were). None when there is none. Raises ``StoreUnavailable``."""
        unsaved = self._unsaved.get(account_id)
        if unsaved is None:
            return None
        return await self._write(unsaved)

    async def _write(self, unsaved: _Unsaved, *, release: bool = True) -> bool:
        async with unsaved.lock:
            if unsaved.stored is not None:
                return unsaved.stored
            account_id = unsaved.account_id
            stored = await self._store.save_refreshed_tokens(
                account_id, unsaved.grant, version=unsaved.version, now=self._clock()
            )
            if not stored:
                # Newer tokens, or these: an earlier write may have landed unanswered.
                current = await self._store.get_account_tokens(account_id)
                stored = current is not None and (
                    current.refresh_token == unsaved.grant.refresh_token
                )
                if not stored:
                    log.warning(
                        "account %s: newer tokens were stored (a reconnect), or the account "
                        "was disconnected, while this refresh ran: this refresh's tokens "
                        "are dropped",
                        account_id,
                    )
            unsaved.stored = stored
            if self._unsaved.get(account_id) is unsaved:
                del self._unsaved[account_id]
            if release:
                # Its holder could not give it back (the store was failing): it would
                # hold the next refresh until it runs out.
                with contextlib.suppress(GatewayError):
                    await self._store.release_refresh_lease(account_id, unsaved.holder)
            return stored

    def _retry_in_background(self, unsaved: _Unsaved) -> None:
        if unsaved.retrying is None:
            task = unsaved.retrying = asyncio.ensure_future(self._retry(unsaved))
            self._retries[task] = unsaved
            task.add_done_callback(lambda done: self._retries.pop(done, None))

    async def _retry(self, unsaved: _Unsaved) -> None:
        delay = self._first_delay
        while unsaved.stored is None:
            await self._sleep(delay)
            try:
                if await self._write(unsaved):
                    log.info("the new tokens of account %s are stored", unsaved.account_id)
            except GatewayError as exc:
                delay = min(delay * 2, self._max_delay)
                log.warning(
                    "the new tokens of account %s are still not stored (%s); next attempt "
                    "in %gs",
                    unsaved.account_id,
                    exc.technical_message or exc.message,
                    delay,
                )
            except Exception:
                delay = min(delay * 2, self._max_delay)
                log.exception("storing the new tokens of account %s failed", unsaved.account_id)

    async def flush(self, timeout: float, refresh_wait: float | None = None) -> int:
        """At shutdown, before the store closes: wait up to ``refresh_wait`` seconds
        (default ``timeout``) for the refreshes under way, then write every unsaved grant
        (at least once each) for up to ``timeout`` seconds in all until it lands.
        Returns how many are lost, each logged as an error."""
        loop = asyncio.get_running_loop()
        refresh_wait = timeout if refresh_wait is None else refresh_wait
        if self._refreshing:
            log.info("waiting up to %gs for %d token refresh(es) under way",
                     refresh_wait, self._refreshing)
        refreshes_end, deadline = loop.time() + refresh_wait, loop.time() + timeout
        while self._refreshing and loop.time() < refreshes_end:
            await asyncio.sleep(FLUSH_POLL_SECONDS)
        if self._unsaved:
            log.warning("storing the new tokens of %d account(s) before shutting down "
                        "(for up to %gs)", len(self._unsaved), max(deadline - loop.time(), 0))
        while self._unsaved:
            for unsaved in list(self._unsaved.values()):
                try:
                    await self._write(unsaved)
                except GatewayError:
                    pass  # the store still fails: again until the deadline
                except Exception:
                    log.exception("storing the new tokens of account %s failed",
                                  unsaved.account_id)
            if not self._unsaved or loop.time() >= deadline:
                break
            await asyncio.sleep(min(self._first_delay, deadline - loop.time()))
        lost = list(self._unsaved.values())
        for unsaved in lost:
            log.error(
                "shutting down with the new tokens of account %s not stored: they are lost, "
                "and the user must connect the account again",
                unsaved.account_id,
            )
        # No background write may outlive the store: those waiting for their next attempt
        # stop now; one writing (a grant that just landed may be releasing its lease)
        # finishes, until the deadline.
        tasks = dict(self._retries)
        writing = {t for t, unsaved in tasks.items() if unsaved.lock.locked()}
        for task in tasks.keys() - writing:
            task.cancel()
        if writing:
            _, late = await asyncio.wait(writing, timeout=max(deadline - loop.time(), 0.1))
            for task in late:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._refreshing:
            log.error("%d token refresh(es) still under way at shutdown: what TikTok answers "
                      "them cannot be stored", self._refreshing)
        return len(lost)


def _counted_by_outcome(
    attempt: Callable[Concatenate[AccountService, P], Awaitable[_Attempt]],
) -> Callable[Concatenate[AccountService, P], Awaitable[_Attempt]]:
    """``attempt``, its outcome counted in the refresh metric (``error`` when it raised)."""

    @functools.wraps(attempt)
    async def counted(service: AccountService, /, *args: P.args, **kwargs: P.kwargs) -> _Attempt:
        outcome = "error"
        try:
            result = await attempt(service, *args, **kwargs)
            outcome = result.outcome.value
            return result
        finally:
            service._metrics.refresh(outcome)

    return counted


class AccountService:
    def __init__(
        self,
        *,
        store: Store,
        tiktok: TikTokClient,
        refresh_skew_seconds: int = 300,
        lease_seconds: float | None = None,
        wait_poll_seconds: float = 0.05,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: GatewayMetrics | None = None,
        events: AccountEvents | None = None,
    ) -> None:
        """``lease_seconds``: how long a refresh holds the account's lease; by default
        a call to TikTok and a margin (``refresh_lease_seconds(config)`` adds the
        store's calls). It must outlive a call to TikTok, or a second request would
        refresh with the token the first one is sending. One per process: its
        ``unsaved`` grants are the process's."""
        longest_call = tiktok.longest_call_seconds
        if lease_seconds is None:
            lease_seconds = longest_call + LEASE_MARGIN_SECONDS
        if lease_seconds <= longest_call:
            raise ValueError(
                f"a refresh lease of {lease_seconds:g}s does not outlive a call to TikTok "
                f"({longest_call:g}s: its connect and request timeouts); make it longer"
            )
        self._store = store
        self._tiktok = tiktok
        self.refresh_skew = timedelta(seconds=refresh_skew_seconds)
        self.lease_seconds = lease_seconds
        self._poll = wait_poll_seconds
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._metrics = metrics or GatewayMetrics()
        self.unsaved = UnsavedGrants(store, clock=clock, sleep=sleep)
        # Account events: recorded with the changes made here (and by the refresher).
        self.events = events or AccountEvents()
        # Names this process's lease holders, so logs can tell processes apart.
        self._holder_prefix = secrets.token_hex(4)

    async def close(self, timeout: float) -> int:
        """On shutdown, before the store closes: ``UnsavedGrants.flush``. A refresh
        already sent to TikTok is waited for up to its lease (TikTok's timeouts and a
        margin) even past ``timeout``: abandoning it would lose the rotated grant."""
        return await self.unsaved.flush(timeout, refresh_wait=max(timeout, self.lease_seconds))

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

    async def access_token(
        self, owner_id: str, account_id: str, *, refused: str | None = None
    ) -> AccessToken:
        """A usable access token, refreshed first when it is about to expire.

        ``refused``: an access token this endpoint handed out and TikTok refused
        (``access_token_invalid``). While it is still the stored one, it is refreshed
        at once, whatever its expiry says; once a newer one is stored, that one is
        handed out. So many callers reporting the same token cause one refresh."""
        account = await self.get_account(owner_id, account_id)
        due: AccountTokens | None = None  # the tokens this request found due
        busy_since: float | None = None
        poll = self._poll
        while True:
            if await self.unsaved.settle(account.id) is not None:
                # This process held newer tokens than the store: they are stored now
                # (or superseded), never refreshed again. Still failing: 503.
                account = await self._reload(account.id)
            _raise_if_unusable(account)
            tokens = await self._store.get_account_tokens(account.id)
            if tokens is None:
                raise _reauthorization_conflict("reauthorization_required")
            fresh = tokens.access_token_expires_at - self._clock() > self.refresh_skew
            if _is_refused(tokens, refused):
                fresh = False
            # Replaced since we found it due (by us, or by a concurrent holder): that is
            # the token to hand out, even if TikTok made it shorter-lived than the skew.
            if fresh or _replaced(tokens, due):
                return await self._handed_out(account, tokens)
            due = tokens
            attempt = await self._refresh(account, force=False, due=due, refused=refused)
            outcome = attempt.outcome
            if outcome in (RefreshOutcome.UNAVAILABLE, RefreshOutcome.UNKNOWN):
                failure = attempt.failure
                raise ProviderUnavailable(
                    technical_message=(
                        "TikTok's answer to the refresh never arrived; the current tokens "
                        "are kept" if outcome is RefreshOutcome.UNKNOWN
                        else "TikTok refresh failed; the current tokens are untouched"
                    ),
                    details={
                        **(failure.details if failure else {}),
                        "dependency": "tiktok",
                        "endpoint": "refresh",
                    },
                    # TikTok's own Retry-After (429) when it sent one.
                    retry_after=(failure.retry_after if failure else None) or 5,
                )
            if outcome is RefreshOutcome.BUSY:
                # Another request (maybe in another process) holds the lease. The lease
                # outlives its holder's calls, so within the lease (and a margin) its new
                # tokens are stored or the lease is free to take.
                now = self._monotonic()
                busy_since = now if busy_since is None else busy_since
                if now - busy_since > self.lease_seconds + LEASE_MARGIN_SECONDS:
                    raise ServiceUnavailable(
                        technical_message="a concurrent refresh did not finish in time",
                        details={"dependency": "tiktok", "endpoint": "refresh"},
                        retry_after=1,
                    )
                await self._sleep(poll)
                poll = min(poll * 1.5, max(WAIT_POLL_MAX_SECONDS, self._poll))
            account = await self._reload(account.id)

    async def _reload(self, account_id: str) -> Account:
        account = await self._store.get_account(account_id)
        if account is None:
            raise NotFound(technical_message="account disappeared during refresh")
        return account

    async def _handed_out(self, account: Account, tokens: AccountTokens) -> AccessToken:
        """The access token as handed out, its use noted for the background refresher."""
        try:
            await self._store.mark_token_used(account.id, now=self._clock())
        except GatewayError as exc:
            # Only keep-warm depends on it: the token itself is good to hand out.
            log.warning("could not note the token use of account %s: %s", account.id,
                        exc.technical_message or exc.message)
        return _access_token(account, tokens)

    async def refresh_account(
        self, account: Account, *, force: bool = False, due_within: timedelta | None = None
    ) -> RefreshOutcome:
        """Refresh one account's tokens under the lease. Never raises for TikTok faults.

        Unless ``force``, only tokens that expire within ``due_within`` (default: the
        refresh skew) are refreshed; the background refresher passes its own window."""
        return (await self._refresh(account, force=force, due_within=due_within)).outcome

    @_counted_by_outcome
    async def _refresh(
        self,
        account: Account,
        *,
        force: bool,
        due: AccountTokens | None = None,
        due_within: timedelta | None = None,
        refused: str | None = None,
    ) -> _Attempt:
        # A grant this process got but could not store is the live credential: store
        # it, never refresh over it (the stored refresh token is dead).
        stored = await self.unsaved.settle(account.id)
        if stored is not None:
            return _Attempt(RefreshOutcome.REFRESHED if stored else RefreshOutcome.SUPERSEDED)
        now = self._clock()
        if account.status is not AccountStatus.CONNECTED:
            return _Attempt(RefreshOutcome.REAUTHORIZATION_REQUIRED)
        if account.refresh_token_expires_at and account.refresh_token_expires_at <= now:
            # No point asking TikTok: the refresh token is dead.
            await self._require_reauthorization(account, REFRESH_TOKEN_EXPIRED, now=now)
            return _Attempt(RefreshOutcome.REFRESH_TOKEN_EXPIRED)
        holder = f"{self._holder_prefix}-{secrets.token_hex(6)}"
        if not await self._store.acquire_refresh_lease(
            account.id, holder, seconds=self.lease_seconds
        ):
            return _Attempt(RefreshOutcome.BUSY)
        handed_over = False
        try:
            tokens = await self._store.get_account_tokens(account.id)
            if tokens is None:
                # No refresh token left to present: as good as refused.
                await self._require_reauthorization(account, REFRESH_REFUSED, now=now)
                return _Attempt(RefreshOutcome.REAUTHORIZATION_REQUIRED)
            window = self.refresh_skew if due_within is None else due_within
            not_due = tokens.access_token_expires_at - now > window
            not_due = not_due and not _is_refused(tokens, refused)
            if not force and (not_due or _replaced(tokens, due)):
                # Someone refreshed between our read and our lease.
                return _Attempt(RefreshOutcome.NOT_DUE)
            handed_over = True  # the lease is released when the call and save end
            return await self.unsaved.run_to_the_end(
                self._refresh_and_release(account, tokens, holder)
            )
        finally:
            if not handed_over:
                await self._release(account.id, holder)

    async def _refresh_and_release(
        self, account: Account, tokens: AccountTokens, holder: str
    ) -> _Attempt:
        try:
            return await self._refresh_at_tiktok(account, tokens, holder)
        finally:
            await self._release(account.id, holder)

    async def _refresh_at_tiktok(
        self, account: Account, tokens: AccountTokens, holder: str
    ) -> _Attempt:
        try:
            response = await self._tiktok.refresh(tokens.refresh_token)
        except OutcomeUnknown as exc:
            log.warning(
                "refresh of account %s: %s. TikTok may have rotated the refresh token: "
                "the stored tokens are kept, and the next refresh tells (refused: the "
                "account must be connected again)",
                account.id,
                exc.technical_message,
            )
            return _Attempt(RefreshOutcome.UNKNOWN, exc)
        except ProviderRejected as exc:
            if exc.details.get("providerError") in REFUSED_REFRESH_ERRORS:
                # Only if the refused token is still the stored one (same generation).
                if await self._require_reauthorization(
                    account, REFRESH_REFUSED, now=self._clock(), version=tokens.version
                ):
                    log.warning("refresh token refused for account %s", account.id)
                    return _Attempt(RefreshOutcome.REAUTHORIZATION_REQUIRED)
                log.info("account %s: TikTok refused a refresh token that newer stored "
                         "tokens replaced meanwhile; those stay", account.id)
                return _Attempt(RefreshOutcome.SUPERSEDED)
            log.error("refresh for account %s refused: %s", account.id, exc.technical_message)
            return _Attempt(RefreshOutcome.UNAVAILABLE, exc)
        except GatewayError as exc:
            log.warning("refresh for account %s failed: %s", account.id, exc.technical_message)
            return _Attempt(RefreshOutcome.UNAVAILABLE, exc)
        refreshed_at = self._clock()
        grant = TokenGrant(
            # Tokens are sealed under the stored identity, whatever TikTok echoes.
            open_id=account.platform_account_id,
            access_token=response.access_token,
            refresh_token=response.refresh_token,
            access_token_expires_at=refreshed_at + timedelta(seconds=response.expires_in),
            refresh_token_expires_at=refreshed_at + timedelta(seconds=response.refresh_expires_in),
            scopes=response.scopes or account.scopes,
        )
        # Over the generation this refresh read, whoever holds the lease by now.
        if not await self.unsaved.save(account.id, grant, version=tokens.version, holder=holder):
            return _Attempt(RefreshOutcome.SUPERSEDED)
        log.info("refreshed account %s (log_id=%s)", account.id, response.log_id or "-")
        return _Attempt(RefreshOutcome.REFRESHED)

    async def _require_reauthorization(
        self, account: Account, reason: str, *, now: datetime, version: int | None = None
    ) -> bool:
        """Mark the account ``reauthorization_required``, with its event."""
        marked = await self._store.require_reauthorization(
            account.id,
            now=now,
            version=version,
            event_factory=self.events.reauthorization_required(reason),
        )
        if marked:
            self.events.relay_soon()
        return marked

    async def _release(self, account_id: str, holder: str) -> None:
        try:
            await self._store.release_refresh_lease(account_id, holder)
        except GatewayError as exc:
            # It expires on its own; what the refresh got is stored or kept in memory.
            log.warning("could not release the refresh lease of account %s: %s", account_id,
                        exc.technical_message or exc.message)

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
            event_factory=self.events.revoked(SOURCE_PRODUCT),
        )
        self.events.relay_soon()
        # A concurrent disconnect may have won: report what is stored.
        stored = bool(revoked.revoked_at_tiktok) if revoked else revoked_at_tiktok
        return Disconnected("revoked", stored)

    async def _revocable(self, account: Account, tokens: AccountTokens) -> AccountTokens | None:
        """Tokens whose access token is live for a while yet, refreshed if need be; None
        when the refresh token turned out dead (the account then needs reauthorization)."""
        # A concurrent holder's refresh is stored, or its lease free, within this.
        deadline = self._monotonic() + self.lease_seconds + LEASE_MARGIN_SECONDS
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
            if outcome is not RefreshOutcome.BUSY or self._monotonic() > deadline:
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


def _is_refused(tokens: AccountTokens, refused: str | None) -> bool:
    """Whether the stored access token is the one a caller reports TikTok refused."""
    return refused is not None and hmac.compare_digest(
        tokens.access_token.encode(), refused.encode()
    )


def _replaced(tokens: AccountTokens, due: AccountTokens | None) -> bool:
    """Whether ``tokens`` were stored (a refresh, a reconnect) since ``due`` was read."""
    return due is not None and (
        tokens.version != due.version
        or tokens.access_token != due.access_token
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

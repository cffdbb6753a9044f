"""The connection flow: start an authorization, complete it from TikTok's callback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# Re-exported: code written before core.clock existed imports utcnow from here.
from core.clock import utcnow as utcnow
from core.errors import (
    AuthorizationDenied,
    GatewayError,
    InvalidState,
    ScopeMissing,
    ServiceUnavailable,
    StateConflict,
    ValidationFailed,
)
from services import pkce
from services.events import AccountEvents
from services.metrics import GatewayMetrics
from services.redirects import AllowedOrigins, with_query
from services.scopes import BASIC_SCOPE, KNOWN_SCOPES, parse_granted, user_fields_for
from services.state import StateCodec
from services.tiktok import INTERACTIVE, ProfileRefused, TikTokClient, clip
from storage.base import (
    ClaimOutcome,
    ClaimResult,
    PendingAuthorization,
    PendingFailure,
    PendingStatus,
    Store,
    TokenGrant,
)

log = logging.getLogger("gateway.connect")

MAX_SCOPES = 20
# How often a repeated callback looks at the record while the first one runs:
# soon at first (a double click lands within the first one's exchange), then less.
REPEAT_POLL_FIRST_SECONDS = 0.02
REPEAT_POLL_MAX_SECONDS = 0.25
STILL_CONNECTING = (
    "We are still connecting your TikTok account. Please reload this page in a moment."
)


@dataclass(frozen=True)
class AuthorizationStart:
    authorization_url: str
    state: str
    expires_at: datetime


@dataclass(frozen=True)
class CallbackParams:
    state: str = field(repr=False)
    code: str | None = field(repr=False)  # single-use, but redeemable until used
    error: str | None
    error_description: str | None
    granted_scopes: str | None


@dataclass(frozen=True)
class Connected:
    redirect_url: str
    account_id: str


class ConnectionService:
    def __init__(
        self,
        *,
        store: Store,
        tiktok: TikTokClient,
        states: StateCodec,
        origins: AllowedOrigins,
        default_scopes: tuple[str, ...],
        pkce_mode: str,
        callback_budget_seconds: float = 10.0,
        clock: Callable[[], datetime] = utcnow,
        metrics: GatewayMetrics | None = None,
        events: AccountEvents | None = None,
    ) -> None:
        self._callback_budget = callback_budget_seconds
        self._events = events or AccountEvents()
        self._store = store
        self._tiktok = tiktok
        self._states = states
        self._origins = origins
        self._default_scopes = default_scopes
        self._pkce_mode = pkce_mode
        self._clock = clock
        self._metrics = metrics or GatewayMetrics()

    async def start(
        self,
        owner_id: str,
        redirect_uri: str,
        scopes: list[str] | None,
        *,
        force_consent: bool = False,
    ) -> AuthorizationStart:
        redirect_uri = self._origins.check(redirect_uri)
        requested = self._requested_scopes(scopes)
        now = self._clock()
        state, claims = self._states.mint(owner_id, redirect_uri, now)
        verifier = pkce.new_verifier() if self._pkce_mode != "off" else None
        await self._store.save_pending(
            PendingAuthorization(
                jti=claims.jti,
                owner_id=owner_id,
                redirect_uri=redirect_uri,
                scopes=requested,
                code_verifier=verifier,
                created_at=now,
                expires_at=claims.expires_at,
            )
        )
        challenge = pkce.challenge(verifier, self._pkce_mode) if verifier else None
        return AuthorizationStart(
            authorization_url=self._tiktok.authorize_url(
                state, requested, challenge, force_consent=force_consent
            ),
            state=state,
            expires_at=claims.expires_at,
        )

    def _requested_scopes(self, scopes: list[str] | None) -> list[str]:
        if scopes is None:
            # TIKTOK_SCOPES too: without user.info.basic every default flow would
            # fail after consent, at the profile call.
            scopes = list(self._default_scopes)
        unknown = [s for s in scopes if s not in KNOWN_SCOPES]
        if unknown:
            raise ValidationFailed(
                "One of the requested TikTok permissions does not exist.",
                technical_message="unknown scope requested",
                details={
                    "unknownScopes": unknown[:MAX_SCOPES],
                    "knownScopes": sorted(KNOWN_SCOPES),
                },
            )
        requested = list(dict.fromkeys(scopes))
        if BASIC_SCOPE not in requested:
            # The account cannot be identified or shown without it.
            requested.insert(0, BASIC_SCOPE)
        return requested

    def refuse(self, error: GatewayError) -> None:
        """A callback whose link was malformed (``complete`` never ran): counted with
        the others, so a flood of broken links shows in the metrics."""
        self._metrics.callback_refused(error.code)

    async def complete(self, params: CallbackParams) -> Connected:
        """Run the callback; exactly one caller per state gets past the claim."""
        with self._metrics.callback():
            return await self._complete(params)

    async def _complete(self, params: CallbackParams) -> Connected:
        deadline = time.monotonic() + self._callback_budget
        now = self._clock()
        claims = self._states.verify(params.state, now)
        # Same code (or same TikTok error) + same state = the same callback repeated.
        digest = hashlib.sha256(
            f"{params.code or ''}\x1f{params.error or ''}".encode()
        ).hexdigest()
        outcome = await self._store.claim_pending(claims.jti, callback_digest=digest, now=now)
        if outcome.result is ClaimResult.EXPIRED:
            # The same answer as when the state's own expiry notices it first.
            raise InvalidState(technical_message="state expired")
        if outcome.result is not ClaimResult.CLAIMED or outcome.pending is None:
            return await self._answer_repeat(claims.jti, outcome, digest, deadline)
        pending = outcome.pending
        # From the claim on, every way out records an outcome: a state left
        # in_progress would keep its repeats waiting until it expires.
        try:
            if pending.owner_id != claims.owner_id or pending.redirect_uri != claims.redirect_uri:
                raise StateConflict(technical_message="state does not match its pending record")
            connected = await self._connect(pending, params, deadline)
            await self._store.finish_pending(
                claims.jti, status=PendingStatus.COMPLETED, final_redirect=connected.redirect_url
            )
        except (Exception, asyncio.CancelledError) as exc:
            await self._record_failure(claims.jti, exc)
            raise
        return connected

    async def _answer_repeat(
        self, jti: str, outcome: ClaimOutcome, digest: str, deadline: float
    ) -> Connected:
        """Another request claimed this state. The same callback repeated (a double
        click, a reload) gets what the first one answered, waiting for it if need be;
        anything else is refused."""
        pending = outcome.pending
        delay = REPEAT_POLL_FIRST_SECONDS
        while True:
            if pending is None:
                raise StateConflict(technical_message=f"state cannot be used: {outcome.result}")
            if pending.callback_digest != digest:
                raise StateConflict(
                    technical_message=f"state cannot be used: {pending.status} with another code"
                )
            if pending.status is PendingStatus.COMPLETED and pending.final_redirect:
                return Connected(redirect_url=pending.final_redirect, account_id="")
            if pending.status is PendingStatus.FAILED and pending.failure is not None:
                raise _replayed(pending.failure)
            if pending.status is not PendingStatus.IN_PROGRESS:
                raise StateConflict(technical_message=f"state cannot be used: {pending.status}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Not CONFLICT: the first one may still connect the account, and
                # this same URL will then answer its redirect.
                raise ServiceUnavailable(
                    STILL_CONNECTING,
                    technical_message="the same callback is still in progress elsewhere",
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, REPEAT_POLL_MAX_SECONDS)
            pending = await self._store.get_pending(jti)

    async def _record_failure(self, jti: str, exc: BaseException) -> None:
        try:
            await self._store.finish_pending(
                jti, status=PendingStatus.FAILED, failure=_failure_of(exc)
            )
        except Exception as store_exc:  # the original error is the one to answer
            log.warning(
                "could not mark a failed callback's state as failed (%s); "
                "until it expires, its repeats answer 503",
                getattr(store_exc, "technical_message", None) or type(store_exc).__name__,
            )

    async def _connect(
        self, pending: PendingAuthorization, params: CallbackParams, deadline: float
    ) -> Connected:
        if params.error:
            technical = f"TikTok returned error {clip(params.error)!r}"
            if params.error_description:
                technical += f": {clip(params.error_description)}"
            raise AuthorizationDenied(
                technical_message=technical, details={"providerError": clip(params.error)}
            )
        if not params.code:
            raise ValidationFailed(technical_message="callback has neither code nor error")
        # The redirect URI is re-checked: the allow-list may have shrunk since minting.
        redirect_uri = self._origins.check(pending.redirect_uri)
        if params.granted_scopes is not None:
            # Refuse before the exchange, so no token is obtained that we would not keep.
            _require_basic_scope(parse_granted(params.granted_scopes))
        tokens = await self._tiktok.exchange_code(
            params.code, pending.code_verifier, deadline=deadline, priority=INTERACTIVE
        )
        granted = tokens.scopes or parse_granted(params.granted_scopes)
        if BASIC_SCOPE not in granted:
            # We will not keep these tokens: hand them back rather than leave them live.
            with contextlib.suppress(GatewayError):
                await self._tiktok.revoke(tokens.access_token)
            _require_basic_scope(granted)
        now = self._clock()
        account = await self._store.save_account_tokens(
            pending.owner_id,
            TokenGrant(
                open_id=tokens.open_id,
                access_token=tokens.access_token,
                refresh_token=tokens.refresh_token,
                access_token_expires_at=now + timedelta(seconds=tokens.expires_in),
                refresh_token_expires_at=now + timedelta(seconds=tokens.refresh_expires_in),
                scopes=granted,
            ),
            now=now,
            event_factory=self._events.connected(),
        )
        self._events.relay_soon()
        # The tokens are safe in the store from here: the account is connected.
        try:
            user = await self._tiktok.fetch_user(
                tokens.access_token, user_fields_for(granted), deadline=deadline,
                priority=INTERACTIVE,
            )
        except ProfileRefused:
            # TikTok refused the token it has just issued: the user's retry is what
            # fixes that. The profile stays pending, due for the filler later.
            raise
        except ServiceUnavailable as exc:
            # TikTok busy (429, 5xx, timeout, no free connection or budget in time):
            # the profile is the filler's to load, the user is connected.
            await self._leave_profile_pending(account.id, exc)
        else:
            await self._store.save_account_profile(account.id, user.fields, now=self._clock())
            log.info("connected account %s for owner (log_id=%s)", account.id,
                     user.log_id or "-")
        return Connected(
            redirect_url=with_query(redirect_uri, {"platform": "tiktok", "status": "connected"}),
            account_id=account.id,
        )

    async def _leave_profile_pending(self, account_id: str, cause: ServiceUnavailable) -> None:
        self._metrics.profile_left_pending()
        log.info("account %s connected, its profile pending (%s, log_id=%s)", account_id,
                 cause.technical_message or cause.message, cause.details.get("logId") or "-")
        try:
            await self._store.schedule_profile_fill(account_id, at=self._clock())
        except GatewayError as exc:
            # Still connected: a new account is due for the filler anyway
            # (PROFILE_FIRST_FILL_DELAY); a reconnected one keeps its earlier profile.
            log.warning("could not queue account %s for its profile (%s)", account_id,
                        exc.technical_message or exc.message)


def _require_basic_scope(granted: list[str]) -> None:
    if BASIC_SCOPE not in granted:
        raise ScopeMissing(
            technical_message=f"granted scopes lack {BASIC_SCOPE}",
            # Only scope names TikTok has: before the exchange the list is the callback
            # link's own query, which anyone can write, and is not echoed as is.
            details={"grantedScopes": [s for s in granted if s in KNOWN_SCOPES][:MAX_SCOPES]},
        )


def _failure_of(exc: BaseException) -> PendingFailure:
    """What the callback answers for ``exc``, as the error writer renders it."""
    if isinstance(exc, asyncio.CancelledError):
        exc = ServiceUnavailable(technical_message="the callback was interrupted")
    if not isinstance(exc, GatewayError):
        # A bug: the generic 500, never its details.
        return PendingFailure(
            status=500, code=GatewayError.code, message=GatewayError.default_message
        )
    return PendingFailure(
        status=exc.status,
        code=exc.code,
        message=exc.message,
        technical_message=exc.technical_message,
        details=dict(exc.details),
        retry_after=exc.retry_after,
    )


def _replayed(failure: PendingFailure) -> GatewayError:
    error = GatewayError(
        failure.message,
        technical_message=failure.technical_message,
        details=dict(failure.details),
        retry_after=failure.retry_after,
        status=failure.status,
    )
    error.code = failure.code
    return error

"""TikTok's OAuth 2.0 and user-info endpoints, as TikTok really behaves.

Every outbound call goes through ``_fetch``, which logs without secrets and turns
transport failures into one domain exception. The HTTP client is injected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from core.errors import OutcomeUnknown, ProfileRefused, ProviderRejected, ProviderUnavailable
from services.budget import ENDPOINT_BUDGETS, CallBudget, Priority
from services.http_client import (
    capacity_of,
    close_http_client,
    is_refused,
    is_timeout,
    make_http_client,
    nothing_sent,
)
from services.metrics import GatewayMetrics

if TYPE_CHECKING:
    from services.config import Config

log = logging.getLogger("gateway.tiktok")

TOKEN_PATH = "/v2/oauth/token/"  # noqa: S105 - a URL path, not a secret
USER_INFO_PATH = "/v2/user/info/"
REVOKE_PATH = "/v2/oauth/revoke/"
# TikTok's revoke page describes success as an empty body (its older page shows {}).
EMPTY_SUCCESS_ENDPOINTS = frozenset({"revoke"})
# TikTok's token errors that mean "try later", not "your request is wrong".
TRANSIENT_TOKEN_ERRORS = frozenset({"server_error", "temporarily_unavailable"})
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_PROVIDER_TEXT = 200
RETRY_AFTER_CAP_SECONDS = 2.0
# A retry with less time than this left is not worth starting.
MIN_ATTEMPT_SECONDS = 0.5
# A callback's profile call waits this long at most for a user-info permit: past it the
# account is connected with its profile pending, and the filler fetches it later.
PROFILE_PERMIT_PATIENCE_SECONDS = 0.5
# What a call that waited for a free connection keeps of its request timeout, at least.
MIN_REQUEST_SECONDS = 0.1


@dataclass(frozen=True)
class TokenResponse:
    # Required from a code exchange; empty when a refresh answer leaves it out.
    open_id: str
    # Never in repr(): a response logged or shown in a traceback must not leak them.
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    refresh_expires_in: int
    scopes: list[str]
    log_id: str | None


@dataclass(frozen=True)
class UserInfo:
    fields: dict[str, Any]
    log_id: str | None


@dataclass
class _Reply:
    status: int
    body: Any
    retry_after: float | None
    log_id: str | None


class _Retryable(Exception):
    def __init__(self, error: ProviderUnavailable, delay: float | None) -> None:
        self.error = error
        self.delay = delay


# What a call asks of the shared TikTok budget (services/budget.py): interactive work
# (a callback, a product asking for a token) comes first; background work (the
# profile filler, keep-warm refreshes) only takes what it leaves.
INTERACTIVE = "interactive"
BACKGROUND = "background"


def clip(text: Any) -> str:
    """Provider text is untrusted: bounded, single-line, never trusted as markup."""
    return " ".join(str(text).split())[:MAX_PROVIDER_TEXT]


def _retry_after(response: HTTPResponse) -> float | None:
    value = response.headers.get("Retry-After")
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


class TikTokClient:
    def __init__(
        self,
        http: AsyncHTTPClient | None,
        *,
        client_key: str,
        client_secret: str,
        redirect_uri: str,
        api_base_url: str,
        authorize_url: str,
        connect_timeout: float,
        request_timeout: float,
        profile_retries: int = 2,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        metrics: GatewayMetrics | None = None,
        http_factory: Callable[[], AsyncHTTPClient] | None = None,
        max_in_flight: int | None = None,
        budget: CallBudget | None = None,
    ) -> None:
        self._http = http
        # TikTok's rate limits: every call takes a permit first (services/budget.py).
        self._budget = budget
        # Calls past ``max_in_flight`` wait here, not in the HTTP client's queue: curl's
        # queue has no timeout, and a call it sends late may carry a code whose
        # callback has already answered. Here the wait is bounded and cancellable.
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        # Without ``http``: makes the client on first use (inside the running loop);
        # this object then owns it and ``close()`` closes it.
        self._http_factory = http_factory
        self._owns_http = False
        self._user_info_urls: dict[tuple[str, ...], str] = {}
        self._client_key = client_key
        self._client_secret = client_secret
        self._redirect_uri = redirect_uri
        self._api = api_base_url.rstrip("/")
        self._authorize_url = authorize_url
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._profile_retries = profile_retries
        # The longest one call to TikTok takes, connection wait included (``_fetch``).
        self.longest_call_seconds = connect_timeout + request_timeout
        self._sleep = sleep
        self._metrics = metrics or GatewayMetrics()

    def authorize_url(
        self,
        state: str,
        scopes: list[str],
        code_challenge: str | None,
        *,
        force_consent: bool = False,
    ) -> str:
        """TikTok's consent URL; ``force_consent`` shows the consent page even to a user
        TikTok would authorize silently, so they can pick another account."""
        params = {
            "client_key": self._client_key,
            "response_type": "code",
            "scope": ",".join(scopes),
            "redirect_uri": self._redirect_uri,
            "state": state,
        }
        if code_challenge:
            params["code_challenge"] = code_challenge
            params["code_challenge_method"] = "S256"
        if force_consent:
            params["disable_auto_auth"] = "1"
        separator = "&" if "?" in self._authorize_url else "?"
        return self._authorize_url + separator + urlencode(params)

    async def exchange_code(
        self,
        code: str,
        code_verifier: str | None,
        *,
        deadline: float | None = None,
        priority: str | None = None,
    ) -> TokenResponse:
        """Trade an authorization code for tokens; sent at most once.

        ``deadline`` (``time.monotonic()`` seconds): the caller's own budget. Waiting
        for a pooled connection may last until then, instead of the connect timeout.
        ``priority``: INTERACTIVE (None) or BACKGROUND, for the shared budget.
        """
        form = {
            "client_key": self._client_key,
            "client_secret": self._client_secret,
            "code": code,
            "grant_type": "authorization_code",
            "redirect_uri": self._redirect_uri,
        }
        if code_verifier:
            form["code_verifier"] = code_verifier
        reply = await self._post_form(
            TOKEN_PATH, form, "token", deadline=deadline, priority=priority
        )
        return self._token_response(reply, require_open_id=True)

    async def refresh(self, refresh_token: str) -> TokenResponse:
        """Trade a refresh token for new tokens; the refresh token may rotate.

        Raises ``OutcomeUnknown`` when the request was sent but its answer never came.
        """
        form = {
            "client_key": self._client_key,
            "client_secret": self._client_secret,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
        }
        reply = await self._post_form(TOKEN_PATH, form, "refresh")
        return self._token_response(reply, require_open_id=False)

    async def revoke(self, token: str) -> str | None:
        """Revoke an access token at TikTok; returns TikTok's log_id.

        Raises ``ProviderRejected`` when TikTok refuses, ``ProviderUnavailable``
        when it cannot be reached: the caller decides whether to retry.
        """
        form = {
            "client_key": self._client_key,
            "client_secret": self._client_secret,
            "token": token,
        }
        reply = await self._post_form(REVOKE_PATH, form, "revoke")
        error = reply.body.get("error")
        failed = isinstance(error, str) and error or (
            isinstance(error, dict) and error.get("code") not in (None, "", "ok")
        )
        if failed or reply.status != 200:
            code = clip(error if isinstance(error, str) else (error or {}).get("code", "unknown"))
            details = {"providerError": code, "dependency": "tiktok", "endpoint": "revoke"}
            if reply.log_id:
                details["logId"] = reply.log_id
            raise ProviderRejected(
                technical_message=f"TikTok revoke endpoint refused the request: {code}",
                details=details,
            )
        return reply.log_id

    async def fetch_user(
        self,
        access_token: str,
        fields: list[str],
        *,
        deadline: float | None = None,
        priority: str | None = None,
    ) -> UserInfo:
        """GET user info, retrying transient failures a bounded number of times.

        ``deadline`` (``time.monotonic()`` seconds) caps the whole, retries and the
        wait for a pooled connection included, so one callback never hangs the
        browser for long. ``priority``: INTERACTIVE (None) or BACKGROUND. Raises
        ``ProfileRefused`` when TikTok refuses the call, ``ProviderUnavailable``
        when it cannot answer it.
        """
        url = self._user_info_url(fields)
        attempt = 0
        while True:
            timeout = self._request_timeout
            if deadline is not None:
                timeout = min(timeout, max(deadline - time.monotonic(), MIN_ATTEMPT_SECONDS))
            try:
                reply = await self._fetch(
                    HTTPRequest(url, headers={"Authorization": f"Bearer {access_token}"}),
                    "user_info",
                    timeout,
                    deadline=deadline,
                    priority=priority,
                )
                return self._user_info(reply)
            except _Retryable as retry:
                backoff = 0.2 * (2**attempt) * random.uniform(0.5, 1.5)  # noqa: S311
                wait = min(max(retry.delay or 0.0, backoff), RETRY_AFTER_CAP_SECONDS)
                out_of_time = deadline is not None and (
                    time.monotonic() + wait + MIN_ATTEMPT_SECONDS > deadline
                )
                if attempt >= self._profile_retries or out_of_time:
                    raise retry.error from None
                await self._sleep(wait)
                attempt += 1

    def _user_info_url(self, fields: list[str]) -> str:
        # Fields come from a few fixed scope sets: each URL is built once.
        key = tuple(fields)
        url = self._user_info_urls.get(key)
        if url is None:
            url = f"{self._api}{USER_INFO_PATH}?{urlencode({'fields': ','.join(fields)})}"
            self._user_info_urls[key] = url
        return url

    async def _post_form(
        self,
        path: str,
        form: dict[str, str],
        endpoint: str,
        *,
        deadline: float | None = None,
        priority: str | None = None,
    ) -> _Reply:
        request = HTTPRequest(
            f"{self._api}{path}",
            method="POST",
            # Exactly this type: a charset suffix has been seen refused by TikTok.
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Cache-Control": "no-cache",
            },
            body=urlencode(form),
        )
        try:
            return await self._fetch(request, endpoint, deadline=deadline, priority=priority)
        except _Retryable as retry:
            # The request may have reached TikTok: a code is single-use, so never resend.
            raise retry.error from None

    async def _fetch(
        self,
        request: HTTPRequest,
        endpoint: str,
        timeout: float | None = None,
        *,
        deadline: float | None = None,
        priority: str | None = None,  # what the shared budget draws on (services/budget.py)
    ) -> _Reply:
        request.connect_timeout = min(self._connect_timeout, timeout or self._connect_timeout)
        request.request_timeout = timeout or self._request_timeout
        request.headers.setdefault("Accept", "application/json")
        if self._http is None:
            # Created on first use, inside the running loop, never at import time.
            if self._http_factory is not None:
                self._http, self._owns_http = self._http_factory(), True
            else:
                self._http = AsyncHTTPClient()
        started = time.monotonic()
        if self._budget is not None:
            await self._take_permit(self._budget, request, endpoint, started, priority,
                                    patience=PROFILE_PERMIT_PATIENCE_SECONDS
                                    if endpoint == "user_info" and deadline is not None
                                    else None)
            started = time.monotonic()
        slots = self._slots
        if slots is None:
            return await self._send(request, endpoint, started)
        await self._take_slot(slots, request, endpoint, started, deadline)
        try:
            return await self._send(request, endpoint, started)
        finally:
            slots.release()

    async def _take_slot(
        self,
        slots: asyncio.Semaphore,
        request: HTTPRequest,
        endpoint: str,
        started: float,
        deadline: float | None,
    ) -> None:
        """Wait for a free slot, in arrival order. A call with a ``deadline`` (a
        callback's budget) waits until it leaves just enough time for the call, so a
        burst queues instead of failing; its request timeout then counts from the
        slot, but never past the deadline. Without one, it waits at most the connect
        timeout, like a connection would, and the time waited comes off the request
        timeout, which stays the whole bound."""
        if not slots.locked():
            await slots.acquire()  # a free slot: no wait
            return
        if deadline is None:
            patience = request.connect_timeout
        else:
            patience = max(deadline - started - MIN_ATTEMPT_SECONDS, 0.0)
        try:
            await asyncio.wait_for(slots.acquire(), patience)
        except TimeoutError:
            self._log(request, endpoint, started, "failed (timeout waiting for a connection)",
                      None)
            raise _Retryable(
                self._unavailable(endpoint, "timeout waiting for a free connection"), None
            ) from None
        now = time.monotonic()
        allowed = request.request_timeout or self._request_timeout
        if deadline is not None:
            request.request_timeout = max(min(allowed, deadline - now), MIN_REQUEST_SECONDS)
            return
        request.request_timeout = max(allowed - (now - started), MIN_REQUEST_SECONDS)

    async def _take_permit(
        self,
        budget: CallBudget,
        request: HTTPRequest,
        endpoint: str,
        started: float,
        priority: str | None,
        *,
        patience: float | None = None,
    ) -> None:
        """A permit from the endpoint's budget, with the caller's priority (None: the
        context's); the time waited comes off the request timeout, which stays the
        whole bound, or ``patience`` when shorter. No room in time: ``RateLimited``,
        and nothing is sent."""
        allowed = request.request_timeout or self._request_timeout
        wait = allowed - MIN_ATTEMPT_SECONDS
        if patience is not None:
            wait = min(wait, patience)
        await budget.acquire(
            ENDPOINT_BUDGETS.get(endpoint, endpoint),
            # The budget tells priorities apart by identity: its own enum members.
            priority=Priority(priority) if priority else None,
            deadline=started + wait,
        )
        waited = time.monotonic() - started
        request.request_timeout = max(allowed - waited, MIN_REQUEST_SECONDS)

    async def _send(self, request: HTTPRequest, endpoint: str, started: float) -> _Reply:
        http = self._http
        if http is None:  # _fetch made it; a close() meanwhile is a caller's bug
            raise RuntimeError("the TikTok client was closed")
        for refused_attempt in range(2):
            try:
                response = await http.fetch(request, raise_error=False)
                break
            except (OSError, HTTPClientError) as exc:
                # Refused (simple: ECONNREFUSED, curl: 599 with libcurl's code 7):
                # nothing was sent, the one failure that is always safe to retry.
                if is_refused(exc) and refused_attempt == 0:
                    continue
                if isinstance(exc, OSError):
                    reason = type(exc).__name__
                else:
                    # 599: timeout or connection lost; raised even with raise_error=False.
                    reason = "timeout" if is_timeout(exc) else "connection error"
                self._log(request, endpoint, started, f"failed ({reason})", None)
                if nothing_sent(exc):
                    raise _Retryable(self._unavailable(endpoint, reason), None) from None
                unknown = self._unavailable(
                    endpoint, f"{reason} after the request was sent: no answer",
                    kind=OutcomeUnknown,
                )
                raise _Retryable(unknown, None) from None
        body: Any = None
        log_id = response.headers.get("X-Tt-Logid")
        try:
            body = json.loads(response.body or b"")
        except ValueError:
            body = None
        if not response.body and response.code == 200 and endpoint in EMPTY_SUCCESS_ENDPOINTS:
            body = {}
        if isinstance(body, dict):
            log_id = _extract_log_id(body) or log_id
        self._log(request, endpoint, started, str(response.code), log_id)
        reply = _Reply(response.code, body, _retry_after(response), log_id)
        if response.code in RETRYABLE_STATUSES or response.code >= 500:
            raise _Retryable(
                self._unavailable(endpoint, f"HTTP {response.code}", reply), reply.retry_after
            )
        if not isinstance(body, dict):
            raise _Retryable(self._unavailable(endpoint, "unreadable body", reply), None)
        return reply

    def close(self) -> None:
        """Close the HTTP client if this object made it (its idle connections too)."""
        if self._owns_http:
            client, self._http, self._owns_http = self._http, None, False
            close_http_client(client)

    def _unavailable(
        self,
        endpoint: str,
        reason: str,
        reply: _Reply | None = None,
        *,
        kind: type[ProviderUnavailable] = ProviderUnavailable,
    ) -> ProviderUnavailable:
        details: dict[str, Any] = {"dependency": "tiktok", "endpoint": endpoint}
        if reply and reply.log_id:
            details["logId"] = reply.log_id
        retry_after = 5
        if reply and reply.retry_after:
            retry_after = max(1, min(int(reply.retry_after), 60))
        return kind(
            technical_message=f"TikTok {endpoint} endpoint: {reason}",
            details=details,
            retry_after=retry_after,
        )

    def _log(
        self, request: HTTPRequest, endpoint: str, started: float, outcome: str, log_id: str | None
    ) -> None:
        """The one record (and metric sample) of each call, whatever its end."""
        seconds = time.monotonic() - started
        # The HTTP status, or what ended the call without one.
        result = outcome if outcome.isdigit() else (
            "timeout" if "timeout" in outcome.lower() else "connection_error"
        )
        self._metrics.tiktok_request(endpoint, result, seconds)
        log.info(
            "tiktok %s %s %s -> %s in %.0f ms log_id=%s",
            endpoint,
            request.method,
            request.url.split("?", 1)[0],
            outcome,
            seconds * 1000,
            log_id or "-",
            extra={
                "endpoint": endpoint,
                "outcome": result,
                "duration_ms": round(seconds * 1000, 1),
                "log_id": log_id,
            },
        )

    def _token_response(self, reply: _Reply, *, require_open_id: bool) -> TokenResponse:
        body = reply.body
        error = body.get("error")
        # TikTok answers some errors with HTTP 200: judge the body, not the status.
        if error or reply.status != 200:
            code = clip(error if isinstance(error, str) else "unknown_error")
            details = {"providerError": code, "dependency": "tiktok"}
            if reply.log_id:
                details["logId"] = reply.log_id
            technical = f"TikTok token endpoint refused the request: {code}"
            if body.get("error_description"):
                technical += f" ({clip(body['error_description'])})"
            if code in TRANSIENT_TOKEN_ERRORS:
                raise ProviderUnavailable(technical_message=technical, details=details)
            if code in ("invalid_client", "unauthorized_client"):
                log.error("TikTok rejected the client credentials: check TIKTOK_CLIENT_KEY/SECRET")
            raise ProviderRejected(technical_message=technical, details=details)
        try:
            open_id = body.get("open_id")
            return TokenResponse(
                # A refresh keeps the account's stored identity: its open_id is not needed.
                open_id=_nonempty_str(open_id) if require_open_id else _str_or_empty(open_id),
                access_token=_nonempty_str(body["access_token"]),
                refresh_token=_nonempty_str(body["refresh_token"]),
                expires_in=_positive_int(body["expires_in"]),
                refresh_expires_in=_positive_int(body["refresh_expires_in"]),
                scopes=[s for s in str(body.get("scope") or "").split(",") if s.strip()],
                log_id=reply.log_id,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise self._unavailable("token", f"unexpected token body ({exc!r})", reply) from None

    def _user_info(self, reply: _Reply) -> UserInfo:
        body = reply.body
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        code = error.get("code")
        user = (body.get("data") or {}).get("user") if isinstance(body.get("data"), dict) else None
        if reply.status == 200 and code == "ok" and isinstance(user, dict):
            return UserInfo(fields=user, log_id=reply.log_id)
        details: dict[str, Any] = {
            "dependency": "tiktok",
            "endpoint": "user_info",
            "providerError": clip(code or f"HTTP {reply.status}"),
        }
        if reply.log_id:
            details["logId"] = reply.log_id
        # Not retryable (401/400...): the profile stays pending and the caller answers 503.
        raise ProfileRefused(
            "We connected your TikTok account but could not load its profile. "
            "Please try again in a moment.",
            technical_message=f"TikTok user info failed: {details['providerError']}",
            details=details,
        )


def tiktok_client_for(
    config: Config,
    http_client: AsyncHTTPClient | None = None,
    *,
    metrics: GatewayMetrics | None = None,
    http_factory: Callable[[], AsyncHTTPClient] | None = None,
    budget: CallBudget | None = None,
) -> TikTokClient:
    """The gateway's TikTok client for ``config``: it calls through ``http_client`` when
    given, else through one pooled client (TIKTOK_HTTP_CLIENT) made on first use, in
    the running loop, by ``http_factory`` (default: ``make_http_client(config)``).

    At most TIKTOK_MAX_CONNECTIONS calls go out at once, fewer if a given client runs
    fewer: calls beyond that wait in the gateway, for a bounded time, not in it."""
    max_in_flight = config.tiktok_max_connections
    if http_client is not None:
        max_in_flight = min(max_in_flight, capacity_of(http_client) or max_in_flight)
    if http_client is None and http_factory is None:
        http_factory = lambda: make_http_client(config)  # noqa: E731 - one line, one use
    return TikTokClient(
        http_client,
        client_key=config.tiktok_client_key,
        client_secret=config.tiktok_client_secret,
        redirect_uri=config.tiktok_redirect_uri,
        api_base_url=config.tiktok_api_base_url,
        authorize_url=config.tiktok_authorize_url,
        connect_timeout=config.tiktok_connect_timeout,
        request_timeout=config.tiktok_request_timeout,
        metrics=metrics,
        http_factory=None if http_client else http_factory,
        max_in_flight=max_in_flight,
        budget=budget,
    )


def _extract_log_id(body: dict[str, Any]) -> str | None:
    if isinstance(body.get("log_id"), str):
        return clip(body["log_id"])
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("log_id"), str):
        return clip(error["log_id"])
    return None


def _nonempty_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _str_or_empty(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _positive_int(value: Any) -> int:
    """A lifetime in seconds: a JSON integer, or one sent as a string of digits."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("expected a positive integer")
    return value

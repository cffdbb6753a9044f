"""The demo's stand-in product: one signed-in user who connects TikTok through the
gateway's public API, exactly as a real product's backend would.

It mints the product's bearer JWT server-side with ``AUTH_JWT_SECRET`` (the secret
never leaves this process), calls ``POST /oauth/tiktok/authorize`` and
``DELETE /accounts/{id}`` over HTTP, and hands the browser nothing but the
``authorizationUrl``. To show what the gateway stored it reads the account through
``AccountService`` and the store, and masks the tokens before they reach a page.
Two demo-only controls have no public endpoint: a forced refresh (the public
endpoint refreshes only close to expiry) and the sandbox's simulated removal.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import jwt
from tornado.httpclient import AsyncHTTPClient

from services.accounts import AccountService, RefreshOutcome
from services.config import Config
from storage.base import Account, AccountStatus, Store

log = logging.getLogger("gateway.demo")

DEMO_USER_ID = "demo-user"
DEMO_USER_NAME = "Dana Demo"
PRODUCT_NAME = "Acme Studio"
CALLBACK_PATH = "/oauth/tiktok/callback"
DEMO_PATH = "/demo"
# The bearer is minted per call, for this server-to-server call only.
BEARER_TTL_SECONDS = 60
CALL_TIMEOUT_SECONDS = 20.0
MASK = "\u2022\u2022\u2022\u2022"  # ••••
# TikTok's reason code for a user removing the app (TIKTOK_API.md).
REMOVED_BY_USER = 1


class DemoFailed(Exception):
    """A call the demo made failed; ``message`` is fit for the page."""

    def __init__(self, status: int, message: str, code: str = "", request_id: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True)
class AccountCard:
    """What the demo page shows of one account: tokens only ever masked."""

    id: str
    display_name: str
    username: str | None
    avatar_url: str | None
    open_id: str
    scopes: list[str]
    status: str
    access_token_expires_at: datetime | None
    access_token: str | None  # masked
    refresh_token: str | None  # masked
    revocation: str | None
    updated_at: datetime

    @property
    def initials(self) -> str:
        words = [w for w in self.display_name.split() if w[:1].isalnum()]
        return "".join(w[0] for w in words[:2]).upper() or "?"


def mask_token(token: str) -> str:
    """``act.••••1234``: the kind prefix TikTok puts on a token and its last four
    characters, enough to tell two tokens apart, never enough to use one."""
    if len(token) < 16:
        return MASK
    prefix, dot, _ = token.partition(".")
    head = f"{prefix}." if dot and len(prefix) <= 4 else ""
    return f"{head}{MASK}{token[-4:]}"


def gateway_url_of(redirect_uri: str, prefix: str = "") -> str:
    """The gateway's own base URL, from its configured public callback URL.

    Never from the request's Host header: the demo sends a freshly minted bearer to
    this URL, and a client-chosen host would receive it.
    """
    suffix = f"{prefix}{CALLBACK_PATH}"
    if redirect_uri.endswith(suffix):
        return redirect_uri[: -len(CALLBACK_PATH)]
    parts = urlsplit(redirect_uri)
    return f"{parts.scheme}://{parts.netloc}{prefix}"


def _revocation_text(account: Account) -> str | None:
    if account.status is AccountStatus.REAUTHORIZATION_REQUIRED:
        return "TikTok refused the refresh token: connect again to restore the account."
    if account.status is not AccountStatus.REVOKED:
        return None
    if account.revocation_reason == "disconnected":
        at_tiktok = "revoked at TikTok too" if account.revoked_at_tiktok else (
            "TikTok could not be reached to revoke it"
        )
        return f"Disconnected here; tokens wiped ({at_tiktok})."
    return (
        "Removed in TikTok (authorization.removed webhook, reason "
        f"{account.revocation_reason}); tokens wiped."
    )


class DemoProduct:
    """The backend of the demo's product, for its one demo user."""

    def __init__(
        self,
        *,
        config: Config,
        accounts: AccountService,
        store: Store,
        prefix: str = "",
        http_client: AsyncHTTPClient | None = None,
    ) -> None:
        self._config = config
        self._accounts = accounts
        self._store = store
        self._http = http_client
        self.gateway_url = gateway_url_of(config.tiktok_redirect_uri, prefix)
        self.page_url = self.gateway_url + DEMO_PATH
        # In demo mode TikTok is the sandbox, which serves its controls next to its API.
        self.sandbox_url = config.tiktok_api_base_url
        self.user_id = DEMO_USER_ID

    # -- what a product backend does, over the gateway's public API --------------

    async def start_connection(self) -> str:
        """``POST /oauth/tiktok/authorize`` for the demo user; the URL to send the browser to."""
        body = await self._call(
            "POST",
            f"{self.gateway_url}/oauth/tiktok/authorize",
            {"redirectUri": self.page_url},
            bearer=True,
        )
        url = body.get("authorizationUrl")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise DemoFailed(502, "The gateway answered without an authorization URL.")
        return url

    async def disconnect(self, account_id: str) -> bool:
        """``DELETE /accounts/{id}``; whether TikTok confirmed the revocation."""
        account = await self._accounts.get_account(self.user_id, account_id)
        body = await self._call(
            "DELETE", f"{self.gateway_url}/accounts/{account.id}", None, bearer=True
        )
        return bool(body.get("revokedAtTikTok"))

    # -- what only the demo does -------------------------------------------------

    async def cards(self) -> list[AccountCard]:
        accounts = await self._accounts.list_accounts(self.user_id)
        accounts.sort(key=lambda a: a.updated_at, reverse=True)
        return [await self._card(account) for account in accounts]

    async def refresh(self, account_id: str) -> datetime | None:
        """Refresh now, whatever the expiry; the expiry before it."""
        account = await self._accounts.get_account(self.user_id, account_id)
        before = account.access_token_expires_at
        outcome = await self._accounts.refresh_account(account, force=True)
        if outcome in (RefreshOutcome.UNAVAILABLE, RefreshOutcome.UNKNOWN, RefreshOutcome.BUSY):
            raise DemoFailed(
                503, "TikTok did not answer the refresh in time. Please try again."
            )
        return before

    async def simulate_removal(self, account_id: str) -> None:
        """Ask the sandbox to act as if the user removed the app in TikTok: it revokes
        the grant and sends the gateway a signed ``authorization.removed`` webhook."""
        account = await self._accounts.get_account(self.user_id, account_id)
        body = await self._call(
            "POST",
            f"{self.sandbox_url}/sandbox/webhooks",
            {
                "url": f"{self.gateway_url}/webhooks/tiktok",
                "open_id": account.platform_account_id,
                "reason": REMOVED_BY_USER,
            },
            bearer=False,
        )
        if not body.get("delivered"):
            raise DemoFailed(
                502,
                "The sandbox's webhook did not reach the gateway "
                f"(HTTP {body.get('status', '?')}).",
            )

    # -- plumbing ------------------------------------------------------------------

    async def _card(self, account: Account) -> AccountCard:
        tokens = None
        if account.status is AccountStatus.CONNECTED:
            tokens = await self._store.get_account_tokens(account.id)
        return AccountCard(
            id=account.id,
            display_name=account.display_name or "TikTok user",
            username=account.username,
            avatar_url=account.avatar_url
            if (account.avatar_url or "").startswith(("https://", "http://"))
            else None,
            open_id=account.platform_account_id,
            scopes=list(account.scopes),
            status=account.status.value,
            access_token_expires_at=account.access_token_expires_at if tokens else None,
            access_token=mask_token(tokens.access_token) if tokens else None,
            refresh_token=mask_token(tokens.refresh_token) if tokens else None,
            revocation=_revocation_text(account),
            updated_at=account.updated_at,
        )

    def _bearer(self) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": self.user_id, "iat": now, "exp": now + BEARER_TTL_SECONDS}
        if self._config.auth_jwt_issuer:
            claims["iss"] = self._config.auth_jwt_issuer
        if self._config.auth_jwt_audience:
            claims["aud"] = self._config.auth_jwt_audience
        return jwt.encode(claims, self._config.auth_jwt_secret, algorithm="HS256")

    async def _call(
        self, method: str, url: str, payload: dict[str, Any] | None, *, bearer: bool
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if bearer:
            headers["Authorization"] = f"Bearer {self._bearer()}"
        client = self._http or AsyncHTTPClient()
        try:
            response = await client.fetch(
                url,
                method=method,
                headers=headers,
                body=json.dumps(payload) if payload is not None else None,
                raise_error=False,
                follow_redirects=False,
                request_timeout=CALL_TIMEOUT_SECONDS,
            )
        except OSError as exc:
            log.warning("demo call %s %s failed: %s", method, urlsplit(url).path, exc)
            raise DemoFailed(503, "The demo could not reach the gateway or the sandbox.") from None
        log.info("demo call %s %s -> %d", method, urlsplit(url).path, response.code)
        try:
            body = json.loads(response.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        if response.code == 599:
            raise DemoFailed(503, "The demo could not reach the gateway or the sandbox.")
        if response.code >= 400:
            message = body.get("message") or body.get("error")
            raise DemoFailed(
                response.code,
                message if isinstance(message, str) else f"HTTP {response.code}",
                code=str(body.get("error", "")),
                request_id=str(body.get("requestId", "")),
            )
        return body

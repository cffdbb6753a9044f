"""The demo's stand-in product: the backend of a product with one signed-in user, which
connects TikTok through the gateway's public API over HTTP, as a real product would.

It knows the gateway by its URL and the shared ``AUTH_JWT_SECRET`` only. It mints its
bearer JWT server-side (the secret never leaves this process) and calls
``POST /oauth/tiktok/authorize``, ``GET /accounts``, ``GET /accounts/{id}``,
``POST /accounts/{id}/access-token`` (to show the token, masked, and with
``refusedAccessToken`` to refresh at once) and ``DELETE /accounts/{id}``; the browser
gets nothing but the ``authorizationUrl``.
One demo-only control has no product equivalent: the sandbox's simulated removal.

It also receives the gateway's account events as a product does (``receive_event``:
its webhook, ``PRODUCT_WEBHOOK_URL``), checks each signature with the
``standardwebhooks`` package and keeps the last ``EVENTS_KEPT`` to show.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import jwt
from standardwebhooks import Webhook, WebhookVerificationError
from tornado.escape import url_escape
from tornado.httpclient import AsyncHTTPClient

log = logging.getLogger("gateway.demo")

DEMO_USER_ID = "demo-user"
DEMO_USER_NAME = "Dana Demo"
PRODUCT_NAME = "Acme Studio"
CALLBACK_PATH = "/oauth/tiktok/callback"
DEMO_PATH = "/demo"
# The bearer is minted per call, for this server-to-server call only.
BEARER_TTL_SECONDS = 60
# The product's backend may read tokens (a user's own session token may not).
BEARER_SCOPE = "tiktok.tokens"
CALL_TIMEOUT_SECONDS = 20.0
MASK = "\u2022\u2022\u2022\u2022"  # ••••
# TikTok's reason code for a user removing the app (TIKTOK_API.md).
REMOVED_BY_USER = 1
EPOCH = datetime.fromtimestamp(0, UTC)
# Where the demo product receives account events (scripts/demo.py points
# PRODUCT_WEBHOOK_URL here), and how many it keeps to show.
WEBHOOK_PATH = "/demo/product/webhook"
EVENTS_KEPT = 20
# After an action that changes an account, the page waits this long at most for its event.
EVENT_WAIT_SECONDS = 3.0
EVENT_POLL_SECONDS = 0.05


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
    """What the demo page shows of one account: the access token only ever masked."""

    id: str
    display_name: str
    username: str | None
    avatar_url: str | None
    open_id: str
    scopes: list[str]
    status: str
    access_token_expires_at: datetime | None
    access_token: str | None  # masked
    # Why there is no token to show (revoked, refused, or the gateway could not say).
    note: str | None
    updated_at: datetime | None

    @property
    def initials(self) -> str:
        words = [w for w in self.display_name.split() if w[:1].isalnum()]
        return "".join(w[0] for w in words[:2]).upper() or "?"


@dataclass(frozen=True)
class ReceivedEvent:
    """An account event the demo product received, its signature verified."""

    id: str
    type: str
    timestamp: datetime | None
    account: str  # the account's display name, else its open_id
    account_status: str
    # What the event carries beyond the account: reconnected, reason, source.
    detail: str


def describe_event(event: Mapping[str, Any]) -> ReceivedEvent:
    data = event.get("data")
    data = data if isinstance(data, dict) else {}
    account = data.get("account")
    account = account if isinstance(account, dict) else {}
    extras = {k: v for k, v in data.items() if k != "account"}
    return ReceivedEvent(
        id=str(event.get("id", "")),
        type=str(event.get("type", "")),
        timestamp=_moment(event.get("timestamp")),
        account=_text(account.get("displayName"))
        or str(account.get("platformAccountId") or account.get("id") or "?"),
        account_status=str(account.get("status", "")),
        detail=", ".join(f"{name}={json.dumps(value)}" for name, value in extras.items()),
    )


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


def _moment(value: Any) -> datetime | None:
    """The gateway's ISO-8601 ``Z`` timestamps."""
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class ProductBearer:
    """How this backend signs its user in at the gateway, as a product's backend does:
    a short-lived HS256 JWT with the secret, issuer and audience the gateway trusts."""

    secret: str | bytes = field(repr=False)
    issuer: str | None = None
    audience: str | None = None

    def token(self, user_id: str) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "scope": BEARER_SCOPE,
            "iat": now,
            "exp": now + BEARER_TTL_SECONDS,
        }
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience
        return jwt.encode(claims, self.secret, algorithm="HS256")


class DemoProduct:
    """The backend of the demo's product, for its one demo user."""

    def __init__(
        self,
        *,
        gateway_url: str,
        sandbox_url: str,
        bearer: ProductBearer,
        http_client: AsyncHTTPClient | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        self.gateway_url = gateway_url
        self.page_url = gateway_url + DEMO_PATH
        # In demo mode TikTok is the sandbox, which serves its controls next to its API.
        self.sandbox_url = sandbox_url
        self.user_id = DEMO_USER_ID
        self._bearer = bearer
        self._http = http_client
        # What this backend learnt of an account beyond its status, by account id:
        # the disconnects it made, the removals it had the sandbox send.
        self._notes: dict[str, str] = {}
        # Account events: verified with the secret the gateway signs with (None: the
        # gateway does not push them).
        self._webhook = Webhook(webhook_secret) if webhook_secret else None
        self.events: deque[ReceivedEvent] = deque(maxlen=EVENTS_KEPT)
        self._received = 0
        self._awaited: int | None = None

    @property
    def receives_events(self) -> bool:
        return self._webhook is not None

    # -- account events, as a product receives them ---------------------------------

    def receive_event(self, body: bytes, headers: Mapping[str, str]) -> ReceivedEvent | None:
        """One delivery to the product's webhook: the event, once its signature is
        verified (``DemoFailed`` otherwise); None for one already received (deliveries
        are at least once)."""
        if self._webhook is None:
            raise DemoFailed(404, "This demo product does not receive account events.")
        try:
            event = self._webhook.verify(body, dict(headers))
        except WebhookVerificationError as exc:
            log.warning("demo product refused an account event: %s", exc)
            raise DemoFailed(400, "The signature does not verify.") from None
        received = describe_event(event)
        if any(kept.id == received.id for kept in self.events):
            return None
        self.events.appendleft(received)
        self._received += 1
        log.info("demo product received account event %s (%s), signature verified",
                 received.id, received.type)
        return received

    def expect_event(self) -> None:
        """An action that changes an account starts: the page shown after it waits
        for its event (``wait_for_event``)."""
        self._awaited = self._received

    async def wait_for_event(self, timeout: float = EVENT_WAIT_SECONDS) -> None:
        """Until an event arrives after ``expect_event`` (the gateway pushes it within
        moments), or ``timeout``; at once when no action awaits one."""
        awaited, self._awaited = self._awaited, None
        if awaited is None or self._webhook is None:
            return
        deadline = time.monotonic() + timeout
        while self._received <= awaited and time.monotonic() < deadline:
            await asyncio.sleep(EVENT_POLL_SECONDS)

    # -- what a product backend does, over the gateway's public API --------------

    async def start_connection(self) -> str:
        """``POST /oauth/tiktok/authorize`` for the demo user; the URL to send the browser to."""
        body = await self._gateway(
            "POST", "/oauth/tiktok/authorize", {"redirectUri": self.page_url}
        )
        self.expect_event()  # the page the callback returns to shows the connection's
        url = body.get("authorizationUrl")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise DemoFailed(502, "The gateway answered without an authorization URL.")
        return url

    async def cards(self) -> list[AccountCard]:
        """``GET /accounts``, and each connected account's token to show it masked."""
        body = await self._gateway("GET", "/accounts")
        accounts = body.get("accounts")
        if not isinstance(accounts, list):
            raise DemoFailed(502, "The gateway answered without the list of accounts.")
        cards = [await self._card(a) for a in accounts if isinstance(a, dict) and a.get("id")]
        cards.sort(key=lambda card: card.updated_at or EPOCH, reverse=True)
        return cards

    async def refresh(self, account_id: str) -> None:
        """Have the gateway refresh at once, as a product does when TikTok answers
        ``access_token_invalid``: ``POST /accounts/{id}/access-token`` reporting the
        token it was handed as refused. (A token TikTok still takes refreshes only
        close to expiry.)"""
        path = f"/accounts/{url_escape(account_id, plus=False)}/access-token"
        current = await self._gateway("POST", path)
        refreshed = await self._gateway(
            "POST", path, {"refusedAccessToken": current.get("accessToken")}
        )
        if refreshed.get("accessToken") == current.get("accessToken"):
            raise DemoFailed(503, "The gateway did not refresh the tokens. Please try again.")

    async def disconnect(self, account_id: str) -> bool:
        """``DELETE /accounts/{id}``; whether TikTok confirmed the revocation."""
        self.expect_event()
        body = await self._gateway("DELETE", f"/accounts/{url_escape(account_id, plus=False)}")
        revoked_at_tiktok = bool(body.get("revokedAtTikTok"))
        at_tiktok = (
            "revoked at TikTok too"
            if revoked_at_tiktok
            else "TikTok could not be reached to revoke it"
        )
        self._notes[account_id] = f"Disconnected here; tokens wiped ({at_tiktok})."
        return revoked_at_tiktok

    # -- what only the demo does -------------------------------------------------

    async def simulate_removal(self, account_id: str) -> None:
        """Ask the sandbox to act as if the user removed the app in TikTok: it revokes
        the grant and sends the gateway a signed ``authorization.removed`` webhook."""
        account = await self._gateway("GET", f"/accounts/{url_escape(account_id, plus=False)}")
        self.expect_event()
        body = await self._call(
            "POST",
            f"{self.sandbox_url}/sandbox/webhooks",
            {
                "url": f"{self.gateway_url}/webhooks/tiktok",
                "open_id": account.get("platformAccountId"),
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
        self._notes[account_id] = (
            f"Removed in TikTok (authorization.removed webhook, reason {REMOVED_BY_USER}); "
            "tokens wiped."
        )

    # -- plumbing ------------------------------------------------------------------

    async def _card(self, account: dict[str, Any]) -> AccountCard:
        account_id = str(account["id"])
        status = str(account.get("status", ""))
        token: dict[str, Any] = {}
        note = None
        if status == "connected":
            self._notes.pop(account_id, None)  # connected again since
            try:
                token = await self._gateway(
                    "POST", f"/accounts/{url_escape(account_id, plus=False)}/access-token"
                )
            except DemoFailed as exc:
                note = f"The gateway did not hand out the access token: {exc.message}"
        elif status == "reauthorization_required":
            note = "TikTok refused the refresh token: connect again to restore the account."
        else:
            note = self._notes.get(account_id, "Revoked; the gateway wiped the tokens.")
        access_token = _text(token.get("accessToken"))
        avatar_url = _text(account.get("avatarUrl"))
        scopes = account.get("scopes")
        return AccountCard(
            id=account_id,
            display_name=_text(account.get("displayName")) or "TikTok user",
            username=_text(account.get("username")),
            avatar_url=avatar_url
            if (avatar_url or "").startswith(("https://", "http://"))
            else None,
            open_id=str(account.get("platformAccountId", "")),
            scopes=[s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else [],
            status=status,
            access_token_expires_at=_moment(token.get("expiresAt")) if access_token else None,
            access_token=mask_token(access_token) if access_token else None,
            note=note,
            updated_at=_moment(account.get("updatedAt")),
        )

    async def _gateway(
        self, method: str, path: str, payload: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self._call(method, f"{self.gateway_url}{path}", payload, bearer=True)

    async def _call(
        self, method: str, url: str, payload: dict[str, Any] | None, *, bearer: bool
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if bearer:
            headers["Authorization"] = f"Bearer {self._bearer.token(self.user_id)}"
        client = self._http or AsyncHTTPClient()
        # The access-token endpoint takes an empty body; Tornado wants one for a POST.
        body = json.dumps(payload) if payload is not None else "" if method == "POST" else None
        try:
            response = await client.fetch(
                url,
                method=method,
                headers=headers,
                body=body,
                raise_error=False,
                follow_redirects=False,
                request_timeout=CALL_TIMEOUT_SECONDS,
            )
        except OSError as exc:
            log.warning("demo call %s %s failed: %s", method, urlsplit(url).path, exc)
            raise DemoFailed(503, "The demo could not reach the gateway or the sandbox.") from None
        log.info("demo call %s %s -> %d", method, urlsplit(url).path, response.code)
        try:
            answer = json.loads(response.body or b"{}")
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            answer = {}
        if response.code == 599:
            raise DemoFailed(503, "The demo could not reach the gateway or the sandbox.")
        if response.code >= 400:
            message = answer.get("message") or answer.get("error")
            raise DemoFailed(
                response.code,
                message if isinstance(message, str) else f"HTTP {response.code}",
                code=str(answer.get("error", "")),
                request_id=str(answer.get("requestId", "")),
            )
        return answer

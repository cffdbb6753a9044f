"""Driving a whole connection the way a product backend and a browser would, and the
sandbox (TikTok) for tests that skip the browser: its tokens, a TikTok client on it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.ioloop import IOLoop

from sandbox import Sandbox, SandboxClient
from services.product_auth import TOKENS_SCOPE
from services.tiktok import TikTokClient
from storage.base import TokenGrant
from tests.support import (
    CLIENT_KEY,
    CLIENT_SECRET,
    CONNECTED,
    LOOPBACK,
    PRODUCT_REDIRECT,
    REDIRECT_URI,
    bearer,
    utc_now,
)

# The gateway's TIKTOK_PKCE mode -> the sandbox's verification mode that matches it.
SANDBOX_PKCE = {"hex": "hex", "s256": "s256", "off": "optional"}


def sandbox_clients() -> list[SandboxClient]:
    """The gateway's TikTok app as the sandbox registers it."""
    return [SandboxClient(client_key=CLIENT_KEY, client_secret=CLIENT_SECRET,
                          redirect_uris=[REDIRECT_URI])]


def make_sandbox(pkce: str = "hex", **kwargs: Any) -> Sandbox:
    return Sandbox(sandbox_clients(), pkce=pkce, **kwargs)


@contextlib.contextmanager
def live_sandbox(
    io_loop: IOLoop, sandbox: Sandbox | None = None, **kwargs: Any
) -> Iterator[Sandbox]:
    """``sandbox`` (default: ``make_sandbox(**kwargs)``) listening on a free loopback
    port, its base URL in ``.url``; closed in ``io_loop`` on the way out."""
    sandbox = sandbox or make_sandbox(**kwargs)
    sandbox.url = f"http://{LOOPBACK}:{sandbox.listen()}"  # type: ignore[attr-defined]
    try:
        yield sandbox
    finally:
        io_loop.run_sync(sandbox.close)


def tiktok_for(
    sandbox_url: str, *, request_timeout: float = 4.0, http: Any = None
) -> TikTokClient:
    """The gateway's TikTok client on the sandbox at ``sandbox_url``, without a gateway
    (``http``: its HTTP client, default Tornado's shared one)."""
    return TikTokClient(
        http,
        client_key=CLIENT_KEY,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        api_base_url=sandbox_url,
        authorize_url=f"{sandbox_url}/v2/auth/authorize/",
        connect_timeout=2.0,
        request_timeout=request_timeout,
    )


def sandbox_grant(
    sandbox: Sandbox,
    *,
    expires_in: timedelta,
    refresh_expires_in: timedelta = timedelta(days=180),
    refresh_token: str | None = None,
) -> TokenGrant:
    """Real sandbox tokens for a new authorization (the user consenting), issued without
    HTTP, stored as expiring ``expires_in`` / ``refresh_expires_in`` from now."""
    code = sandbox.issue_code(CLIENT_KEY, REDIRECT_URI, ["user.info.basic"], code_challenge=None)
    client = sandbox.state.clients[CLIENT_KEY]
    tokens = sandbox.state.exchange_code(client, code, REDIRECT_URI, None)
    now = utc_now()
    return TokenGrant(
        open_id=str(tokens["open_id"]),
        access_token=str(tokens["access_token"]),
        refresh_token=refresh_token or str(tokens["refresh_token"]),
        access_token_expires_at=now + expires_in,
        refresh_token_expires_at=now + refresh_expires_in,
        scopes=["user.info.basic"],
    )


def sandbox_settings(sandbox_url: str) -> dict[str, str]:
    return {
        "TIKTOK_API_BASE_URL": sandbox_url,
        "TIKTOK_AUTHORIZE_URL": f"{sandbox_url}/v2/auth/authorize/",
    }


async def authorize(
    client: AsyncHTTPClient,
    gateway_url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> HTTPResponse:
    """``POST /oauth/tiktok/authorize`` as the product backend sends it (``body``
    default: the product's redirect URI; ``headers`` default: its bearer); any answer."""
    return await client.fetch(
        f"{gateway_url}/oauth/tiktok/authorize",
        method="POST",
        body=json.dumps(body if body is not None else {"redirectUri": PRODUCT_REDIRECT}),
        headers=headers if headers is not None else bearer(),
        raise_error=False,
    )


async def start(
    client: AsyncHTTPClient,
    gateway_url: str,
    owner: str = "user-123",
    scopes: list[str] | None = None,
) -> dict[str, Any]:
    """An authorization started for ``owner``: the gateway's answer (``state``,
    ``authorizationUrl``...)."""
    body: dict[str, Any] = {"redirectUri": PRODUCT_REDIRECT}
    if scopes is not None:
        body["scopes"] = scopes
    response = await authorize(client, gateway_url, body, bearer(owner))
    assert response.code == 200, response.body
    started: dict[str, Any] = json.loads(response.body)
    return started


async def consent(
    client: AsyncHTTPClient, gateway_url: str, authorization_url: str, **knobs: str
) -> str:
    """What the browser does at TikTok: returns the callback URL TikTok redirects to.

    The registered redirect URI names the public host; the test server listens on
    ``gateway_url``, which is where the browser's request would arrive.
    """
    url = authorization_url + ("&" + urlencode(knobs) if knobs else "")
    response = await client.fetch(url, follow_redirects=False, raise_error=False)
    assert response.code == 302, response.body
    callback_url = response.headers["Location"]
    assert callback_url.startswith(REDIRECT_URI + "?"), callback_url
    return gateway_url + "/oauth/tiktok/callback" + callback_url[len(REDIRECT_URI):]


async def api_call(
    client: AsyncHTTPClient, gateway_url: str, method: str, path: str,
    headers: dict[str, str] | None = None,
) -> HTTPResponse:
    """``method path`` as the product backend calls the gateway's API; any answer. A POST
    carries an empty body; methods the routes do not allow are sent as they are."""
    return await client.fetch(
        gateway_url + path,
        method=method,
        headers=headers or {},
        body=b"" if method == "POST" else None,
        allow_nonstandard_methods=True,
        raise_error=False,
    )


async def token_request(
    client: AsyncHTTPClient, gateway_url: str, account_id: str,
    headers: dict[str, str] | None = None,
) -> HTTPResponse:
    """``POST /accounts/{id}/access-token`` (``headers`` default: the owner's bearer with
    the tokens scope); any answer."""
    return await api_call(client, gateway_url, "POST", f"/accounts/{account_id}/access-token",
                          headers or bearer(scope=TOKENS_SCOPE))


async def disconnect(client: AsyncHTTPClient, gateway_url: str, account_id: str) -> HTTPResponse:
    """``DELETE /accounts/{id}`` by its owner; any answer."""
    return await api_call(client, gateway_url, "DELETE", f"/accounts/{account_id}", bearer())


async def follow(client: AsyncHTTPClient, url: str) -> HTTPResponse:
    return await client.fetch(url, follow_redirects=False, raise_error=False)


async def callback(
    client: AsyncHTTPClient, gateway_url: str, params: Mapping[str, Any] | None = None, **more: Any
) -> HTTPResponse:
    """The callback with the query ``params`` and ``more`` (lists repeat a parameter)."""
    query = urlencode({**(params or {}), **more}, doseq=True)
    return await follow(client, f"{gateway_url}/oauth/tiktok/callback?{query}")


async def connect(
    client: AsyncHTTPClient,
    gateway_url: str,
    owner: str = "user-123",
    scopes: list[str] | None = None,
) -> dict[str, Any]:
    """A whole connection: start, consent at the sandbox, callback, redirected as
    connected. The authorize answer (``state``...)."""
    started = await start(client, gateway_url, owner=owner, scopes=scopes)
    callback_url = await consent(client, gateway_url, started["authorizationUrl"])
    assert location(await follow(client, callback_url)) == CONNECTED
    return started


async def consented(
    client: AsyncHTTPClient,
    gateway_url: str,
    owner: str = "user-123",
    scopes: list[str] | None = None,
    **knobs: str,
) -> str:
    """An authorization started for ``owner`` and consented to at the sandbox (``knobs``:
    see ``consent``): the callback URL TikTok sends the browser to, not yet followed."""
    started = await start(client, gateway_url, owner=owner, scopes=scopes)
    return await consent(client, gateway_url, started["authorizationUrl"], **knobs)


async def fetch_with_request_id(
    client: AsyncHTTPClient, url: str, request_id: str, *, method: str = "GET",
    body: Any = None, headers: dict[str, str] | None = None,
) -> HTTPResponse:
    """One request, not followed, carrying ``request_id``, which the gateway must echo."""
    response = await client.fetch(
        url, method=method, body=body, follow_redirects=False, raise_error=False,
        headers={**(headers or {}), "X-Request-ID": request_id},
    )
    assert response.headers["X-Request-ID"] == request_id
    return response


def location(response: HTTPResponse) -> str:
    assert response.code == 302, response.body
    return response.headers["Location"]


def assert_one_state_connected_once(responses: list[HTTPResponse], connected: str) -> None:
    """The same callback URL sent many times at once: one request claims the state and
    connects; every repeat waits for its outcome and answers the same ``connected``
    redirect (a callback with another code stays ``400 CONFLICT``: see the callers)."""
    assert [r.code for r in responses] == [302] * len(responses), [
        (r.code, r.body) for r in responses if r.code != 302
    ]
    for response in responses:
        assert location(response) == connected


class RefreshLog:
    """Every refresh the sandbox was asked for, in order: the refresh token presented,
    and TikTok's (the sandbox's) answer, or None when it refused the token."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    @property
    def presented(self) -> list[str]:
        return [token for token, _ in self.calls]

    @property
    def answers(self) -> list[dict[str, Any] | None]:
        return [answer for _, answer in self.calls]


def record_refreshes(sandbox: Sandbox) -> RefreshLog:
    """Record what the sandbox's token endpoint does with each refresh from now on."""
    from sandbox.state import OAuthError

    record = RefreshLog()
    honour = sandbox.state.refresh

    def refresh(client: Any, refresh_token: str) -> dict[str, object]:
        try:
            answer = honour(client, refresh_token)
        except OAuthError:
            record.calls.append((refresh_token, None))
            raise
        record.calls.append((refresh_token, dict(answer)))
        return answer

    sandbox.state.refresh = refresh  # type: ignore[method-assign]
    return record

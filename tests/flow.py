"""Driving a whole connection the way a product backend and a browser would."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from sandbox import Sandbox, SandboxClient
from tests.support import (
    CLIENT_KEY,
    CLIENT_SECRET,
    PRODUCT_REDIRECT,
    REDIRECT_URI,
    bearer,
)


def make_sandbox(pkce: str = "hex", **kwargs: Any) -> Sandbox:
    return Sandbox(
        [SandboxClient(client_key=CLIENT_KEY, client_secret=CLIENT_SECRET,
                       redirect_uris=[REDIRECT_URI])],
        pkce=pkce,
        **kwargs,
    )


def sandbox_settings(sandbox_url: str) -> dict[str, str]:
    return {
        "TIKTOK_API_BASE_URL": sandbox_url,
        "TIKTOK_AUTHORIZE_URL": f"{sandbox_url}/v2/auth/authorize/",
    }


async def start(
    client: AsyncHTTPClient,
    gateway_url: str,
    owner: str = "user-123",
    scopes: list[str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"redirectUri": PRODUCT_REDIRECT}
    if scopes is not None:
        body["scopes"] = scopes
    response = await client.fetch(
        f"{gateway_url}/oauth/tiktok/authorize",
        method="POST",
        body=json.dumps(body),
        headers=bearer(owner),
    )
    return json.loads(response.body)


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


async def follow(client: AsyncHTTPClient, url: str) -> HTTPResponse:
    return await client.fetch(url, follow_redirects=False, raise_error=False)


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

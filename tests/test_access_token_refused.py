"""``POST /accounts/{id}/access-token`` with ``refusedAccessToken``: the product's
answer to TikTok's ``access_token_invalid`` on a token the gateway handed out, over
real HTTP against the sandbox."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from server import make_app
from services.product_auth import TOKENS_SCOPE
from tests import flow
from tests.flow import sandbox_settings
from tests.support import assert_envelope, bearer, make_config, store_of

OWNER = "user-123"
gen_test = pytest.mark.gen_test(timeout=20)


@pytest.fixture
def app(sandbox):
    return make_app(make_config(**sandbox_settings(sandbox.url)))


async def hand_out(
    http_client: AsyncHTTPClient, base_url: str, account_id: str, body: Any = None
) -> HTTPResponse:
    return await http_client.fetch(
        f"{base_url}/accounts/{account_id}/access-token",
        method="POST",
        headers=bearer(OWNER, scope=TOKENS_SCOPE),
        body=b"" if body is None else body if isinstance(body, bytes) else json.dumps(body),
        raise_error=False,
    )


async def connected(http_client: AsyncHTTPClient, base_url: str) -> tuple[str, str]:
    """A freshly connected account's id and the access token first handed out."""
    await flow.connect(http_client, base_url, owner=OWNER)
    response = await http_client.fetch(f"{base_url}/accounts", headers=bearer(OWNER))
    [account] = json.loads(response.body)["accounts"]
    account_id = str(account["id"])
    return account_id, token_of(await hand_out(http_client, base_url, account_id))


def token_of(response: HTTPResponse) -> str:
    assert response.code == 200, response.body
    return str(json.loads(response.body)["accessToken"])


@gen_test
async def test_a_refused_token_is_refreshed_at_once_and_reporting_it_again_refreshes_nothing(
    http_client, base_url, app, sandbox
):
    account_id, first = await connected(http_client, base_url)
    # Two hours left: an ordinary request hands the same token out again.
    assert token_of(await hand_out(http_client, base_url, account_id)) == first
    assert sandbox.stats["token_refresh"] == 0

    second = token_of(
        await hand_out(http_client, base_url, account_id, {"refusedAccessToken": first})
    )
    assert second != first
    assert sandbox.stats["token_refresh"] == 1
    stored = await store_of(app).get_account_tokens(account_id)
    assert stored is not None and stored.access_token == second

    # A late report of the old token gets the new one: no second rotation.
    late = await hand_out(http_client, base_url, account_id, {"refusedAccessToken": first})
    assert token_of(late) == second
    assert sandbox.stats["token_refresh"] == 1
    # Reporting the current one refreshes again.
    third = token_of(
        await hand_out(http_client, base_url, account_id, {"refusedAccessToken": second})
    )
    assert third not in (first, second)
    assert sandbox.stats["token_refresh"] == 2


@gen_test
async def test_many_reports_of_one_refused_token_share_one_refresh(
    http_client, base_url, app, sandbox
):
    account_id, first = await connected(http_client, base_url)
    # A slow (but successful) TikTok, so every report arrives while the refresh runs.
    sandbox.add_fault("token", status=200, delay=0.3)
    client = AsyncHTTPClient(force_instance=True, max_clients=20)
    try:
        responses = await asyncio.gather(
            *(
                hand_out(client, base_url, account_id, {"refusedAccessToken": first})
                for _ in range(8)
            )
        )
    finally:
        client.close()
    tokens = {token_of(response) for response in responses}
    assert len(tokens) == 1 and tokens != {first}
    assert sandbox.stats["token_refresh"] == 1


@gen_test
async def test_a_token_that_was_never_the_stored_one_refreshes_nothing(
    http_client, base_url, app, sandbox
):
    account_id, current = await connected(http_client, base_url)
    for body in ({"refusedAccessToken": "act.never-handed-out"}, {}, b"  "):
        assert token_of(await hand_out(http_client, base_url, account_id, body)) == current
    assert sandbox.stats["token_refresh"] == 0


@gen_test
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"refusedAccessToken=act.x", "The request body must be JSON."),
        (["act.x"], "The request body must be a JSON object."),
        ({"refusedAccessToken": 5}, None),
        ({"refusedAccessToken": ""}, None),
        ({"refusedAccessToken": "a" * 5000}, None),
        (b"{" + b" " * 9000 + b"}", "The request is too large."),
    ],
    ids=["form", "list", "number", "empty", "too-long", "too-large"],
)
async def test_a_malformed_report_is_a_400_envelope(
    http_client, base_url, app, sandbox, body, message
):
    account_id, _ = await connected(http_client, base_url)
    response = await hand_out(http_client, base_url, account_id, body)
    envelope = assert_envelope(response, 400, "VALIDATION_ERROR")
    if message is None:
        assert envelope["details"] == {"field": "refusedAccessToken"}
        assert "refusedAccessToken" in envelope["message"]
    else:
        assert envelope["message"] == message
    assert sandbox.stats["token_refresh"] == 0

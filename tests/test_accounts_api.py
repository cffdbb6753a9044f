"""The accounts API over real HTTP, against the sandbox, with accounts connected
through the real flow first.

Every error row of every endpoint is exercised; token values are looked up in the
store and searched for in every body the read endpoints answer.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient

from core.errors import Unauthenticated
from server import build_gateway, make_app, routes
from services.accounts import AccountService
from services.product_auth import TOKENS_SCOPE, Principal
from services.refresher import Refresher
from storage.base import AccountStatus, AccountTokens, TokenGrant
from tests import flow
from tests.fixtures_mongo import collect_leaked_driver_sockets, mongo_settings
from tests.flow import (
    api_call,
    consent,
    disconnect,
    follow,
    location,
    sandbox_settings,
    token_request,
)
from tests.support import (
    CLIENT_KEY,
    CLIENT_SECRET,
    PRODUCT_REDIRECT,
    assert_envelope,
    bearer,
    initialized_store,
    make_config,
    product_token,
    store_of,
)

OWNER = "user-123"
INTRUDER = "user-666"
ACCOUNT_KEYS = {
    "id",
    "platform",
    "platformAccountId",
    "displayName",
    "avatarUrl",
    "username",
    "scopes",
    "status",
    "profileStatus",
    "accessTokenExpiresAt",
    "refreshTokenExpiresAt",
    "createdAt",
    "updatedAt",
}
SCOPES = ["user.info.basic", "user.info.profile"]
# Enough that the sandbox's 2 h access token is always due for a refresh.
ALWAYS_DUE = "90000"

gen_test = pytest.mark.gen_test(timeout=20)


@pytest.fixture
def skew() -> str | None:
    """REFRESH_SKEW_SECONDS; ``always_due`` overrides it by parametrization."""
    return None


always_due = pytest.mark.parametrize("skew", [ALWAYS_DUE], ids=["always-due"])


@pytest.fixture
def app(sandbox, skew):
    settings = sandbox_settings(sandbox.url) | {"TIKTOK_REQUEST_TIMEOUT_SECONDS": "1"}
    if skew is not None:
        settings["REFRESH_SKEW_SECONDS"] = skew
    return make_app(make_config(**settings))


def tokens_bearer(owner: str = OWNER, scope: Any = TOKENS_SCOPE) -> dict[str, str]:
    """The product backend's bearer: it may read tokens."""
    return bearer(owner, scope=scope)


async def account_shown(http_client, base_url, account_id: str) -> dict[str, Any]:
    """The account as ``GET /accounts/{id}`` shows its owner."""
    response = await api_call(http_client, base_url, "GET", f"/accounts/{account_id}", bearer())
    assert response.code == 200, response.body
    return dict(json.loads(response.body))


async def connect(http_client, base_url, owner: str = OWNER) -> dict[str, Any]:
    """Connect the sandbox's user through the real flow; the account as GET /accounts shows it."""
    await flow.connect(http_client, base_url, owner=owner, scopes=SCOPES)
    response = await api_call(http_client, base_url, "GET", "/accounts", bearer(owner))
    assert response.code == 200, response.body
    [account] = json.loads(response.body)["accounts"]
    return account


async def stored_tokens(app, account_id: str) -> AccountTokens | None:
    return await store_of(app).get_account_tokens(account_id)


async def assert_wiped(app, account_id: str, *, revoked_at_tiktok: bool) -> None:
    """Disconnected: its tokens gone from the store, the account kept as revoked (at
    TikTok too, or not)."""
    assert await stored_tokens(app, account_id) is None
    stored = await store_of(app).get_account(account_id)
    assert stored is not None and stored.status is AccountStatus.REVOKED
    assert stored.revoked_at_tiktok is revoked_at_tiktok


async def connect_with_tokens(http_client, base_url, app) -> tuple[dict[str, Any], AccountTokens]:
    """``connect``, and the account's tokens as the store holds them now."""
    account = await connect(http_client, base_url)
    tokens = await stored_tokens(app, account["id"])
    assert tokens is not None
    return account, tokens


async def user_info_status(http_client, sandbox, access_token: str) -> int:
    """What TikTok (the sandbox) thinks of an access token."""
    response = await http_client.fetch(
        f"{sandbox.url}/v2/user/info/?fields=open_id",
        headers={"Authorization": f"Bearer {access_token}"},
        raise_error=False,
    )
    return response.code


async def refresh_at_sandbox(http_client, sandbox, refresh_token: str) -> dict[str, Any]:
    response = await http_client.fetch(
        f"{sandbox.url}/v2/oauth/token/",
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=urlencode(
            {
                "client_key": CLIENT_KEY,
                "client_secret": CLIENT_SECRET,
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
            }
        ),
        raise_error=False,
    )
    return json.loads(response.body)


def parse_utc(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def to_millis(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def assert_same_envelope(first, second) -> None:
    """Two error answers that tell the caller exactly the same thing."""
    a, b = json.loads(first.body), json.loads(second.body)
    for body in (a, b):
        body.pop("requestId"), body.pop("timestamp")
    assert (first.code, a) == (second.code, b)


# -- reading accounts ----------------------------------------------------------------


@gen_test
async def test_list_and_get_describe_the_account_and_never_a_token(
    http_client, base_url, app, sandbox
):
    account, tokens = await connect_with_tokens(http_client, base_url, app)
    user = sandbox.users[0]

    assert set(account) == ACCOUNT_KEYS
    assert account["platform"] == "tiktok"
    assert account["platformAccountId"] == user.open_id
    assert account["displayName"] == user.display_name
    assert account["avatarUrl"] == user.avatar_url
    assert account["username"] == user.username
    assert account["scopes"] == SCOPES
    assert account["status"] == "connected"
    assert account["profileStatus"] == "complete"
    created = parse_utc(account["createdAt"])
    assert created <= parse_utc(account["updatedAt"])
    assert parse_utc(account["accessTokenExpiresAt"]) == to_millis(tokens.access_token_expires_at)
    assert parse_utc(account["refreshTokenExpiresAt"]) == to_millis(
        tokens.refresh_token_expires_at
    )

    listed = await api_call(http_client, base_url, "GET", "/accounts", bearer())
    one = await api_call(http_client, base_url, "GET", f"/accounts/{account['id']}", bearer())
    assert one.code == 200
    assert json.loads(one.body) == account
    assert json.loads(listed.body) == {"accounts": [account]}
    for response in (listed, one):
        assert response.headers["Cache-Control"] == "no-store"
        text = response.body.decode()
        assert tokens.access_token not in text and tokens.refresh_token not in text
        assert "act." not in text and "rft." not in text

    # Another owner sees none of it.
    theirs = await api_call(http_client, base_url, "GET", "/accounts", bearer(INTRUDER))
    assert json.loads(theirs.body) == {"accounts": []}


@gen_test
@always_due
async def test_reads_stay_token_free_after_a_refresh_and_a_disconnect(
    http_client, base_url, app
):
    account = await connect(http_client, base_url)
    seen = [await stored_tokens(app, account["id"])]
    path = f"/accounts/{account['id']}"
    assert (await token_request(http_client, base_url, account["id"])).code == 200
    seen.append(await stored_tokens(app, account["id"]))
    bodies = [(await api_call(http_client, base_url, "GET", p, bearer())).body.decode()
              for p in ("/accounts", path)]
    assert (await disconnect(http_client, base_url, account["id"])).code == 200
    bodies += [(await api_call(http_client, base_url, "GET", p, bearer())).body.decode()
               for p in ("/accounts", path)]
    assert json.loads(bodies[-1])["status"] == "revoked"
    assert json.loads(bodies[-1])["accessTokenExpiresAt"] is None
    for tokens in seen:
        for text in bodies:
            assert tokens.access_token not in text and tokens.refresh_token not in text


# -- 401, 403, 404, 405 ----------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/accounts"),
    ("GET", "/accounts/{id}"),
    ("POST", "/accounts/{id}/access-token"),
    ("DELETE", "/accounts/{id}"),
]
BAD_BEARERS = {
    "missing": {},
    "not-bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
    "wrong-secret": {
        "Authorization": "Bearer "
        + product_token(OWNER, secret="another-secret-" + "x" * 40, scope=TOKENS_SCOPE)
    },
    "expired": {
        "Authorization": "Bearer " + product_token(OWNER, exp=1_000_000, scope=TOKENS_SCOPE)
    },
}


@gen_test
@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=lambda v: str(v))
@pytest.mark.parametrize("bad", sorted(BAD_BEARERS))
async def test_no_or_invalid_bearer_is_401(http_client, base_url, app, sandbox, method, path, bad):
    account = await connect(http_client, base_url)
    response = await api_call(
        http_client, base_url, method, path.format(id=account["id"]), BAD_BEARERS[bad]
    )
    assert_envelope(response, 401, "UNAUTHORIZED")
    assert sandbox.stats["revoke"] == 0 and sandbox.stats["token_refresh"] == 0
    assert (await store_of(app).get_account(account["id"])).status is AccountStatus.CONNECTED


@gen_test
@pytest.mark.parametrize(("method", "path"), ENDPOINTS[1:], ids=lambda v: str(v))
async def test_another_owners_unknown_and_malformed_ids_are_the_same_404(
    http_client, base_url, app, sandbox, method, path
):
    account = await connect(http_client, base_url)
    theirs = await api_call(
        http_client, base_url, method, path.format(id=account["id"]), tokens_bearer(INTRUDER)
    )
    assert_envelope(theirs, 404, "NOT_FOUND")
    for other_id in (uuid.uuid4().hex, "5f0c6c3e9d1b2a3c4d5e6f70", "not%20an%20id", "%2E%2E"):
        response = await api_call(
            http_client, base_url, method, path.format(id=other_id), tokens_bearer()
        )
        assert_envelope(response, 404, "NOT_FOUND")
        assert_same_envelope(theirs, response)
    # Nothing happened to the account.
    assert sandbox.stats["revoke"] == 0 and sandbox.stats["token_refresh"] == 0
    assert (await store_of(app).get_account(account["id"])).status is AccountStatus.CONNECTED


@gen_test
@pytest.mark.parametrize(
    "scope",
    [None, "", "tiktok.read", "openid profile", "tiktok.tokens.extra", ["tiktok.read"],
     "tiktok.tokens,openid", 42],
    ids=lambda v: repr(v),
)
async def test_reading_tokens_without_the_tokens_scope_is_403(
    http_client, base_url, app, sandbox, scope
):
    account = await connect(http_client, base_url)
    headers = bearer() if scope is None else bearer(OWNER, scope=scope)
    for account_id in (account["id"], uuid.uuid4().hex):
        # The scope is checked before the account: a session token cannot probe ids.
        response = await token_request(http_client, base_url, account_id, headers)
        body = assert_envelope(response, 403, "PERMISSION_DENIED")
        assert body["details"] == {"requiredScope": TOKENS_SCOPE}
        assert "act." not in response.body.decode()
    # The same bearer may read the account itself.
    one = await api_call(http_client, base_url, "GET", f"/accounts/{account['id']}", headers)
    assert one.code == 200


@gen_test
@pytest.mark.parametrize(
    "scope",
    [TOKENS_SCOPE, f"openid {TOKENS_SCOPE} profile", [TOKENS_SCOPE], ["openid", TOKENS_SCOPE]],
    ids=lambda v: repr(v),
)
async def test_the_tokens_scope_as_string_or_list(http_client, base_url, app, scope):
    account = await connect(http_client, base_url)
    response = await token_request(http_client, base_url, account["id"],
                                   tokens_bearer(scope=scope))
    assert response.code == 200, response.body


@gen_test
async def test_wrong_methods_get_the_405_envelope(http_client, base_url, app):
    account = await connect(http_client, base_url)
    for method, path in (
        ("PUT", f"/accounts/{account['id']}"),
        ("GET", f"/accounts/{account['id']}/access-token"),
        ("POST", "/accounts"),
    ):
        response = await api_call(http_client, base_url, method, path, tokens_bearer())
        assert_envelope(response, 405, "METHOD_NOT_ALLOWED")


# -- access tokens -----------------------------------------------------------------------


@gen_test
async def test_a_fresh_token_is_handed_out_without_refreshing(
    http_client, base_url, app, sandbox
):
    account, before = await connect_with_tokens(http_client, base_url, app)
    for _ in range(3):
        response = await token_request(http_client, base_url, account["id"])
        assert response.code == 200, response.body
        assert response.headers["Cache-Control"] == "no-store"
        body = json.loads(response.body)
        assert body == {
            "accessToken": before.access_token,
            "expiresAt": account["accessTokenExpiresAt"],
            "scopes": SCOPES,
            "openId": sandbox.users[0].open_id,
        }
    assert sandbox.stats["token_refresh"] == 0
    assert await stored_tokens(app, account["id"]) == before
    assert await user_info_status(http_client, sandbox, body["accessToken"]) == 200


@gen_test
@always_due
async def test_a_due_token_is_refreshed_and_the_rotated_refresh_token_stored(
    http_client, base_url, app, sandbox
):
    account, before = await connect_with_tokens(http_client, base_url, app)
    response = await token_request(http_client, base_url, account["id"])
    assert response.code == 200, response.body
    body = json.loads(response.body)
    after = await stored_tokens(app, account["id"])

    assert sandbox.stats["token_refresh"] == 1
    assert body["accessToken"] == after.access_token != before.access_token
    assert after.refresh_token != before.refresh_token
    assert after.access_token_expires_at > before.access_token_expires_at
    assert after.refresh_token_expires_at > before.refresh_token_expires_at
    assert parse_utc(body["expiresAt"]) <= after.access_token_expires_at
    assert (after.access_token_expires_at - parse_utc(body["expiresAt"])).total_seconds() < 0.001
    assert body["openId"] == sandbox.users[0].open_id and body["scopes"] == SCOPES
    # The new token works; TikTok rotated the refresh token, so the old one is dead.
    assert await user_info_status(http_client, sandbox, after.access_token) == 200
    refused = await refresh_at_sandbox(http_client, sandbox, before.refresh_token)
    assert refused["error"] == "invalid_grant"
    shown = await account_shown(http_client, base_url, account["id"])
    assert shown["status"] == "connected"
    assert shown["accessTokenExpiresAt"] == body["expiresAt"]
    # Each later request refreshes once more, with the stored (rotated) refresh token.
    refreshes = sandbox.stats["token_refresh"]  # our own refused attempt counted too
    again = await token_request(http_client, base_url, account["id"])
    assert again.code == 200 and sandbox.stats["token_refresh"] == refreshes + 1
    assert json.loads(again.body)["accessToken"] == (
        await stored_tokens(app, account["id"])
    ).access_token != after.access_token


@gen_test
@always_due
async def test_concurrent_requests_share_one_refresh_even_when_every_token_is_due(
    http_client, base_url, app, sandbox
):
    """Requests waiting on another's refresh take its new token, though it is "due" too."""
    account, before = await connect_with_tokens(http_client, base_url, app)
    # A slow (but successful) TikTok, so every request arrives while the refresh runs.
    sandbox.add_fault("token", status=200, delay=0.3)
    client = AsyncHTTPClient(force_instance=True, max_clients=20)
    try:
        responses = await asyncio.gather(
            *(
                client.fetch(
                    f"{base_url}/accounts/{account['id']}/access-token",
                    method="POST", body=b"", headers=tokens_bearer(), raise_error=False,
                )
                for _ in range(8)
            )
        )
    finally:
        client.close()
    assert [r.code for r in responses] == [200] * 8
    tokens = {json.loads(r.body)["accessToken"] for r in responses}
    assert len(tokens) == 1 and tokens != {before.access_token}
    assert sandbox.stats["token_refresh"] == 1


@gen_test
@always_due
async def test_a_refused_refresh_token_needs_reauthorization(http_client, base_url, app, sandbox):
    account = await connect(http_client, base_url)
    # The user removed the app in TikTok: TikTok answers invalid_grant, with HTTP 200.
    sandbox.revoke_all_for(sandbox.users[0].open_id)
    response = await token_request(http_client, base_url, account["id"])
    body = assert_envelope(response, 409, "CONFLICT")
    assert body["details"] == {"reason": "reauthorization_required"}
    assert sandbox.stats["token_refresh"] == 1
    assert await stored_tokens(app, account["id"]) is None
    shown = await account_shown(http_client, base_url, account["id"])
    assert shown["status"] == "reauthorization_required"
    assert shown["accessTokenExpiresAt"] is None
    # Asked again: the same answer, without asking TikTok again.
    again = await token_request(http_client, base_url, account["id"])
    assert assert_envelope(again, 409, "CONFLICT")["details"] == {
        "reason": "reauthorization_required"
    }
    assert sandbox.stats["token_refresh"] == 1

    # Connecting again brings the account back, same id.
    reconnected = await connect(http_client, base_url)
    assert reconnected["id"] == account["id"] and reconnected["status"] == "connected"


@gen_test
@always_due
@pytest.mark.parametrize(
    ("fault", "retry_after"),
    [
        ({"status": 500}, "5"),
        ({"status": 503}, "5"),
        ({"status": 429, "retry_after": 9}, "9"),
        ({"status": 200, "delay": 2.0}, "5"),  # longer than the 1 s request timeout
        ({"status": 200, "body": "<html>bad gateway</html>"}, "5"),
    ],
    ids=["500", "503", "429", "timeout", "garbage"],
)
async def test_tiktok_unavailable_is_503_and_leaves_the_tokens_alone(
    http_client, base_url, app, sandbox, fault, retry_after
):
    account, before = await connect_with_tokens(http_client, base_url, app)
    stored_before = await store_of(app).get_account(account["id"])
    sandbox.add_fault("token", **fault)
    response = await token_request(http_client, base_url, account["id"])
    body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["Retry-After"] == retry_after
    assert body["details"]["dependency"] == "tiktok"
    assert body["details"]["endpoint"] == "refresh"
    assert sandbox.stats["token_refresh"] == 1  # not retried within the request
    assert await stored_tokens(app, account["id"]) == before
    stored_after = await store_of(app).get_account(account["id"])
    assert stored_after.status is AccountStatus.CONNECTED
    assert stored_after.updated_at == stored_before.updated_at
    # The untouched refresh token still works once TikTok is back.
    recovered = await token_request(http_client, base_url, account["id"])
    assert recovered.code == 200, recovered.body
    assert json.loads(recovered.body)["accessToken"] != before.access_token


# -- disconnecting ---------------------------------------------------------------------


@gen_test
async def test_disconnect_revokes_at_tiktok_wipes_and_is_idempotent(
    http_client, base_url, app, sandbox
):
    account, tokens = await connect_with_tokens(http_client, base_url, app)
    response = await disconnect(http_client, base_url, account["id"])
    assert response.code == 200, response.body
    assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": True}
    assert sandbox.stats["revoke"] == 1
    # Dead at TikTok, gone from the store.
    assert await user_info_status(http_client, sandbox, tokens.access_token) == 401
    await assert_wiped(app, account["id"], revoked_at_tiktok=True)

    again = await disconnect(http_client, base_url, account["id"])
    assert (again.code, json.loads(again.body)) == (200, json.loads(response.body))
    assert sandbox.stats["revoke"] == 1

    token = await token_request(http_client, base_url, account["id"])
    assert assert_envelope(token, 409, "CONFLICT")["details"] == {"reason": "revoked"}
    listed = json.loads((await api_call(http_client, base_url, "GET", "/accounts", bearer())).body)
    assert [a["status"] for a in listed["accounts"]] == ["revoked"]
    assert sandbox.stats["token_refresh"] == 0

    # Connecting again restores the same account.
    reconnected = await connect(http_client, base_url)
    assert reconnected["id"] == account["id"] and reconnected["status"] == "connected"
    fresh = await token_request(http_client, base_url, account["id"])
    assert fresh.code == 200


@gen_test
async def test_disconnect_when_tiktok_cannot_revoke_still_wipes(
    http_client, base_url, app, sandbox
):
    account, tokens = await connect_with_tokens(http_client, base_url, app)
    sandbox.add_fault("revoke", status=500, count=3)
    response = await disconnect(http_client, base_url, account["id"])
    assert response.code == 200, response.body
    assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": False}
    assert sandbox.stats["revoke"] == 3  # bounded retries
    await assert_wiped(app, account["id"], revoked_at_tiktok=False)
    # TikTok never heard of it: the token still works there, but we forgot it.
    assert await user_info_status(http_client, sandbox, tokens.access_token) == 200

    again = await disconnect(http_client, base_url, account["id"])
    assert json.loads(again.body) == {"status": "revoked", "revokedAtTikTok": False}
    assert sandbox.stats["revoke"] == 3


@gen_test
async def test_disconnect_when_tiktok_refuses_does_not_retry(http_client, base_url, app, sandbox):
    account = await connect(http_client, base_url)
    sandbox.add_fault("revoke", status=401, count=3)  # invalid_client: retrying cannot help
    response = await disconnect(http_client, base_url, account["id"])
    assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": False}
    assert sandbox.stats["revoke"] == 1
    await assert_wiped(app, account["id"], revoked_at_tiktok=False)


# -- expiries and disconnecting, on every store ----------------------------------------


class TestOnEveryStore:
    """The memory store and MongoDB (SecantusDB, both drivers), over HTTP."""

    @pytest.fixture(params=["memory", "motor", "pymongo"])
    def app(self, request, io_loop, sandbox, mongo_database_name):
        settings = sandbox_settings(sandbox.url) | {"TIKTOK_REQUEST_TIMEOUT_SECONDS": "1"}
        if request.param != "memory":
            server = request.getfixturevalue("mongo_server")
            settings |= mongo_settings(server.uri, mongo_database_name, request.param)
        app = make_app(make_config(**settings))
        yield app
        io_loop.run_sync(store_of(app).close)
        if request.param == "pymongo":
            collect_leaked_driver_sockets()

    async def connect(self, http_client, base_url, app) -> dict[str, Any]:
        await initialized_store(app)
        return await connect(http_client, base_url)

    async def change_expiries(
        self, app, account_id: str, *, access: timedelta | None = None,
        refresh: timedelta | None = None,
    ) -> AccountTokens:
        """The same tokens, stored with other expiries (from now)."""
        store = store_of(app)
        account = await store.get_account(account_id)
        tokens = await stored_tokens(app, account_id)
        assert account is not None and tokens is not None
        now = datetime.now(UTC)
        grant = TokenGrant(
            open_id=account.platform_account_id,
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            access_token_expires_at=now + access if access else tokens.access_token_expires_at,
            refresh_token_expires_at=(
                now + refresh if refresh else tokens.refresh_token_expires_at
            ),
            scopes=account.scopes,
        )
        await store.save_account_tokens(account.owner_id, grant, now=now)
        return tokens

    @gen_test
    async def test_disconnect_refreshes_an_expired_access_token_then_revokes(
        self, http_client, base_url, app, sandbox
    ):
        account = await self.connect(http_client, base_url, app)
        # Two hours on, the access token has expired, at TikTok and in the store.
        old = await self.change_expiries(app, account["id"], access=-timedelta(seconds=1))
        sandbox.advance_clock(sandbox.state.access_ttl)
        assert await user_info_status(http_client, sandbox, old.access_token) == 401
        issued: list[dict[str, Any]] = []
        refresh = sandbox.state.refresh

        def recording_refresh(client: Any, refresh_token: str) -> dict[str, Any]:
            issued.append(refresh(client, refresh_token))
            return issued[-1]

        sandbox.state.refresh = recording_refresh

        response = await disconnect(http_client, base_url, account["id"])

        assert response.code == 200, response.body
        assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": True}
        assert (sandbox.stats["token_refresh"], sandbox.stats["revoke"]) == (1, 1)
        [rotated] = issued
        # The grant is gone at TikTok: the fresh access token and the rotated refresh
        # token are refused (the old refresh token was already rotated away).
        assert await user_info_status(http_client, sandbox, rotated["access_token"]) == 401
        for token in (rotated["refresh_token"], old.refresh_token):
            refused = await refresh_at_sandbox(http_client, sandbox, token)
            assert refused["error"] == "invalid_grant"
        await assert_wiped(app, account["id"], revoked_at_tiktok=True)

    @gen_test
    async def test_when_the_refresh_fails_the_old_token_is_still_revoked(
        self, http_client, base_url, app, sandbox
    ):
        account = await self.connect(http_client, base_url, app)
        old = await self.change_expiries(app, account["id"], access=-timedelta(seconds=1))
        sandbox.add_fault("token", status=503)
        response = await disconnect(http_client, base_url, account["id"])
        # The sandbox, like RFC 7009, takes an expired token; TikTok's answer is its own.
        assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": True}
        assert (sandbox.stats["token_refresh"], sandbox.stats["revoke"]) == (1, 1)
        assert (await refresh_at_sandbox(http_client, sandbox, old.refresh_token))["error"] == (
            "invalid_grant"
        )
        await assert_wiped(app, account["id"], revoked_at_tiktok=True)

    @gen_test
    async def test_an_empty_revoke_answer_is_success(self, http_client, base_url, app, sandbox):
        account = await self.connect(http_client, base_url, app)
        tokens = await stored_tokens(app, account["id"])
        sandbox.revoke_empty_body = True  # as TikTok's revoke page describes success
        response = await disconnect(http_client, base_url, account["id"])
        assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": True}
        assert (sandbox.stats["revoke"], sandbox.stats["token_refresh"]) == (1, 0)
        assert await user_info_status(http_client, sandbox, tokens.access_token) == 401
        await assert_wiped(app, account["id"], revoked_at_tiktok=True)

    @gen_test
    async def test_disconnect_with_a_dead_refresh_token_wipes_without_revoking(
        self, http_client, base_url, app, sandbox
    ):
        account = await self.connect(http_client, base_url, app)
        await self.change_expiries(app, account["id"], access=timedelta(seconds=60))  # in skew
        sandbox.revoke_all_for(account["platformAccountId"])  # removed in the TikTok app
        response = await disconnect(http_client, base_url, account["id"])
        assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": False}
        # TikTok refused the refresh (invalid_grant): nothing was left to revoke with.
        assert (sandbox.stats["token_refresh"], sandbox.stats["revoke"]) == (1, 0)
        await assert_wiped(app, account["id"], revoked_at_tiktok=False)

    @gen_test
    async def test_a_token_handed_out_keeps_the_account_warm(
        self, http_client, base_url, app, sandbox
    ):
        account = await self.connect(http_client, base_url, app)
        gateway = app.settings["gateway"]
        # A window so wide that the token is due: only the keep-warm rule decides.
        ahead = 2 * sandbox.state.access_ttl
        refresher = Refresher(
            store=gateway.store, ahead_seconds=ahead,
            accounts=AccountService(store=gateway.store, tiktok=gateway.tiktok,
                                    refresh_skew_seconds=ahead),
        )
        assert (await refresher.run_once()).due == 0  # never handed out: on demand only
        assert (await store_of(app).get_account(account["id"])).token_used_at is None

        before = datetime.now(UTC)
        assert (await token_request(http_client, base_url, account["id"])).code == 200
        used = (await store_of(app).get_account(account["id"])).token_used_at
        assert before - timedelta(seconds=1) <= used <= datetime.now(UTC)
        assert (await refresher.run_once()).outcomes == {"refreshed": 1}
        assert sandbox.stats["token_refresh"] == 1

    @gen_test
    async def test_an_expired_refresh_token_reads_as_reauthorization_required(
        self, http_client, base_url, app, sandbox
    ):
        account = await self.connect(http_client, base_url, app)
        expires = parse_utc(account["refreshTokenExpiresAt"])
        assert expires > datetime.now(UTC) + timedelta(days=30)
        await self.change_expiries(app, account["id"], refresh=-timedelta(seconds=1))
        path = f"/accounts/{account['id']}"

        async def seen() -> list[dict[str, Any]]:
            listed = await api_call(http_client, base_url, "GET", "/accounts", bearer())
            one = await api_call(http_client, base_url, "GET", path, bearer())
            return [*json.loads(listed.body)["accounts"], json.loads(one.body)]

        # Read before anything recorded it: never shown connected.
        for shown in await seen():
            assert shown["status"] == "reauthorization_required"
            assert shown["accessTokenExpiresAt"] is None
            assert shown["refreshTokenExpiresAt"] is None
        stored = await store_of(app).get_account(account["id"])
        assert stored.status is AccountStatus.CONNECTED

        # The refresher's next round records it, without calling TikTok.
        gateway = app.settings["gateway"]
        refresher = Refresher(
            store=gateway.store,
            accounts=AccountService(store=gateway.store, tiktok=gateway.tiktok,
                                    refresh_skew_seconds=3600),
        )
        summary = await refresher.run_once()
        assert summary.outcomes == {"refresh_token_expired": 1}
        assert sandbox.stats["token"] == 1  # the callback's exchange only
        stored = await store_of(app).get_account(account["id"])
        assert stored.status is AccountStatus.REAUTHORIZATION_REQUIRED
        assert await stored_tokens(app, account["id"]) is None
        assert [shown["status"] for shown in await seen()] == ["reauthorization_required"] * 2
        token = await token_request(http_client, base_url, account["id"])
        assert assert_envelope(token, 409, "CONFLICT")["details"] == {
            "reason": "reauthorization_required"
        }


# -- a host application's own resolver (embedding) ----------------------------------------


class TestHostResolver:
    """``resolve_user`` may answer a plain user id or a Principal."""

    @pytest.fixture
    def app(self, sandbox):
        async def resolve(handler: tornado.web.RequestHandler) -> str | Principal:
            user = handler.get_signed_cookie("host_user")
            if not user:
                raise Unauthenticated(technical_message="host session cookie missing")
            if handler.request.headers.get("X-Host-Backend") == "yes":
                return Principal(user.decode(), frozenset({TOKENS_SCOPE}))
            return user.decode()

        gateway = build_gateway(make_config(**sandbox_settings(sandbox.url)), resolve_user=resolve)
        return tornado.web.Application(routes(gateway), cookie_secret="host-secret-for-tests")

    def headers(self, app, **extra: str) -> dict[str, str]:
        cookie = tornado.web.create_signed_value(
            app.settings["cookie_secret"], "host_user", OWNER
        ).decode()
        return {"Cookie": f"host_user={cookie}", **extra}

    @gen_test
    async def test_plain_user_id_reads_accounts_but_not_tokens(self, http_client, base_url, app):
        started = json.loads(
            (
                await http_client.fetch(
                    base_url + "/oauth/tiktok/authorize",
                    method="POST",
                    body=json.dumps({"redirectUri": PRODUCT_REDIRECT}),
                    headers=self.headers(app),
                )
            ).body
        )
        callback_url = await consent(http_client, base_url, started["authorizationUrl"])
        assert location(await follow(http_client, callback_url)).endswith("status=connected")

        listed = await api_call(http_client, base_url, "GET", "/accounts", self.headers(app))
        [account] = json.loads(listed.body)["accounts"]
        path = f"/accounts/{account['id']}/access-token"
        session = await api_call(http_client, base_url, "POST", path, self.headers(app))
        assert_envelope(session, 403, "PERMISSION_DENIED")
        backend = await api_call(
            http_client, base_url, "POST", path, self.headers(app, **{"X-Host-Backend": "yes"})
        )
        assert backend.code == 200, backend.body
        assert json.loads(backend.body)["accessToken"].startswith("act.")
        anonymous = await api_call(http_client, base_url, "GET", "/accounts")
        assert_envelope(anonymous, 401, "UNAUTHORIZED")

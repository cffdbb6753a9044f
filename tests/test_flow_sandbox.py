"""Whole flows against the sandbox over real HTTP: PKCE, single use, faults."""

from __future__ import annotations

import asyncio

import pytest

from server import make_app
from storage.base import AccountStatus
from tests.flow import (
    SANDBOX_PKCE,
    assert_one_state_connected_once,
    consent,
    consented,
    follow,
    live_sandbox,
    location,
    sandbox_settings,
    start,
)
from tests.support import (
    CONNECTED,
    LOOPBACK,
    assert_envelope,
    free_port,
    make_config,
    store_of,
)


@pytest.fixture
def pkce_mode(request):
    marker = request.node.get_closest_marker("pkce")
    return marker.args[0] if marker else "hex"


@pytest.fixture
def sandbox(io_loop, pkce_mode):
    with live_sandbox(io_loop, pkce=SANDBOX_PKCE[pkce_mode]) as sandbox:
        yield sandbox


@pytest.fixture
def gateway_settings(sandbox, pkce_mode):
    return sandbox_settings(sandbox.url) | {
        "TIKTOK_REQUEST_TIMEOUT_SECONDS": "1",
        "TIKTOK_PKCE": pkce_mode,
    }


@pytest.fixture
def app(gateway_settings):
    return make_app(make_config(**gateway_settings))


@pytest.mark.gen_test
async def test_connects_and_stores_account(http_client, base_url, app, sandbox):
    callback_url = await consented(http_client, base_url,
                                   scopes=["user.info.basic", "user.info.profile"])
    assert "%2A" in callback_url or "*" in callback_url  # TikTok-like code characters survive
    response = await follow(http_client, callback_url)
    assert location(response) == CONNECTED
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    accounts = await store_of(app).list_accounts("user-123")
    assert len(accounts) == 1
    account = accounts[0]
    assert account.status is AccountStatus.CONNECTED
    assert account.display_name == "Sandbox Creator"
    assert account.username
    assert account.scopes == ["user.info.basic", "user.info.profile"]
    assert not account.profile_pending
    tokens = await store_of(app).get_account_tokens(account.id)
    assert tokens.access_token.startswith("act.")
    assert sandbox.stats["token"] == 1 and sandbox.stats["userinfo"] == 1


@pytest.mark.gen_test
async def test_repeated_callback_answers_same_redirect_without_tiktok(
    http_client, base_url, sandbox
):
    callback_url = await consented(http_client, base_url)
    first = await follow(http_client, callback_url)
    second = await follow(http_client, callback_url)
    assert location(first) == location(second) == CONNECTED
    assert sandbox.stats["token"] == 1 and sandbox.stats["userinfo"] == 1
    # The same state with another code is not a harmless repeat.
    forged = callback_url.replace("code=", "code=X")
    assert_envelope(await follow(http_client, forged), 400, "CONFLICT")


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_callbacks_with_one_state_exchange_once(
    http_client, base_url, app, sandbox
):
    callback_url = await consented(http_client, base_url)
    responses = await asyncio.gather(*(follow(http_client, callback_url) for _ in range(20)))
    assert_one_state_connected_once(responses, CONNECTED)
    assert sandbox.stats["token"] == 1
    assert len(await store_of(app).list_accounts("user-123")) == 1


@pytest.mark.gen_test
async def test_reconnecting_updates_the_same_account(http_client, base_url, app, sandbox):
    for _ in range(2):
        callback_url = await consented(http_client, base_url)
        assert location(await follow(http_client, callback_url)) == CONNECTED
    accounts = await store_of(app).list_accounts("user-123")
    assert len(accounts) == 1
    assert sandbox.stats["token"] == 2


@pytest.mark.gen_test
async def test_code_injection_is_refused_by_pkce(http_client, base_url, app, sandbox):
    victim = await start(http_client, base_url, owner="victim")
    stolen_callback = await consent(http_client, base_url, victim["authorizationUrl"])
    attacker = await start(http_client, base_url, owner="attacker")
    # The attacker pairs the victim's code with a state (and verifier) of their own.
    stolen_code = stolen_callback.split("code=", 1)[1].split("&", 1)[0]
    injected = f"{base_url}/oauth/tiktok/callback?code={stolen_code}&state={attacker['state']}"
    body = assert_envelope(await follow(http_client, injected), 400, "VALIDATION_ERROR")
    assert body["details"]["providerError"] == "invalid_grant"
    assert await store_of(app).list_accounts("attacker") == []
    assert await store_of(app).list_accounts("victim") == []


@pytest.mark.gen_test
async def test_partial_grant_without_basic_scope_is_refused(http_client, base_url, sandbox):
    callback_url = await consented(http_client, base_url, scopes=["user.info.basic", "video.list"],
                                   sandbox_grant="video.list")
    assert_envelope(await follow(http_client, callback_url), 400, "PERMISSION_DENIED")
    assert sandbox.stats["token"] == 0


@pytest.mark.gen_test
async def test_user_denies_at_tiktok(http_client, base_url, sandbox):
    callback_url = await consented(http_client, base_url, sandbox_decision="deny")
    body = assert_envelope(await follow(http_client, callback_url), 400, "PERMISSION_DENIED")
    assert body["details"]["providerError"] == "access_denied"
    assert sandbox.stats["token"] == 0


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("fault", "providerless"),
    [
        ({"status": 500}, False),
        ({"status": 429, "retry_after": 9}, False),
        ({"status": 200, "body": "<html>upstream proxy error</html>"}, True),
        ({"status": 200, "delay": 2.0}, True),
    ],
    ids=["500", "429", "garbage", "timeout"],
)
async def test_token_endpoint_faults_end_in_503_without_retry(
    http_client, base_url, app, sandbox, fault, providerless
):
    callback_url = await consented(http_client, base_url)
    sandbox.add_fault("token", **fault)
    response = await follow(http_client, callback_url)
    body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["dependency"] == "tiktok"
    if fault.get("retry_after"):
        assert response.headers["Retry-After"] == "9"
    assert sandbox.stats["token"] == 1  # never resent: the code may have been consumed
    assert await store_of(app).list_accounts("user-123") == []


@pytest.mark.gen_test(timeout=15)
async def test_profile_is_retried_then_kept_pending_when_it_keeps_failing(
    http_client, base_url, app, sandbox
):
    callback_url = await consented(http_client, base_url)
    sandbox.add_fault("userinfo", status=503, count=3)
    # Connected all the same: the profile is the background filler's to load.
    assert location(await follow(http_client, callback_url)) == CONNECTED
    assert sandbox.stats["userinfo"] == 3  # one try and two retries
    [account] = await store_of(app).list_accounts("user-123")
    assert account.profile_pending
    assert (await store_of(app).get_account_tokens(account.id)).access_token.startswith("act.")


@pytest.mark.gen_test(timeout=15)
async def test_profile_429_is_retried_and_succeeds(http_client, base_url, sandbox):
    callback_url = await consented(http_client, base_url)
    sandbox.add_fault("userinfo", status=429, retry_after=1, count=2)
    assert location(await follow(http_client, callback_url)) == CONNECTED
    assert sandbox.stats["userinfo"] == 3


@pytest.mark.gen_test
@pytest.mark.pkce("s256")
async def test_rfc7636_challenge_mode(http_client, base_url, sandbox):
    started = await start(http_client, base_url)
    challenge = started["authorizationUrl"].split("code_challenge=")[1].split("&")[0]
    assert len(challenge) == 43  # base64url, unpadded
    callback_url = await consent(http_client, base_url, started["authorizationUrl"])
    assert location(await follow(http_client, callback_url)) == CONNECTED


@pytest.mark.gen_test
@pytest.mark.pkce("off")
async def test_pkce_off_sends_no_challenge(http_client, base_url, sandbox):
    started = await start(http_client, base_url)
    assert "code_challenge" not in started["authorizationUrl"]
    callback_url = await consent(http_client, base_url, started["authorizationUrl"])
    assert location(await follow(http_client, callback_url)) == CONNECTED


class TestUnreachableTikTok:
    @pytest.fixture
    def app(self, sandbox):
        settings = sandbox_settings(sandbox.url)
        settings["TIKTOK_API_BASE_URL"] = f"http://{LOOPBACK}:{free_port()}"
        return make_app(make_config(**settings))

    @pytest.mark.gen_test
    async def test_connection_refused_is_503(self, http_client, base_url):
        callback_url = await consented(http_client, base_url)
        body = assert_envelope(await follow(http_client, callback_url), 503, "SERVICE_UNAVAILABLE")
        assert body["details"]["endpoint"] == "token"


class TestCallbackBudget:
    @pytest.fixture
    def gateway_settings(self, sandbox):
        return sandbox_settings(sandbox.url) | {
            "TIKTOK_REQUEST_TIMEOUT_SECONDS": "1",
            "TIKTOK_CALLBACK_BUDGET_SECONDS": "1.5",
        }

    @pytest.mark.gen_test(timeout=15)
    async def test_profile_retries_stop_at_the_budget(self, http_client, base_url, sandbox):
        callback_url = await consented(http_client, base_url)
        sandbox.add_fault("userinfo", status=200, delay=3.0, count=3)
        # Connected, its profile pending: the budget bounds the browser's wait.
        assert location(await follow(http_client, callback_url)) == CONNECTED
        # Two retries were allowed, but the 1.5 s budget leaves room for one attempt only.
        assert sandbox.stats["userinfo"] == 1


@pytest.mark.gen_test
async def test_tokens_granted_without_basic_scope_are_revoked_not_kept(
    http_client, base_url, app, sandbox
):
    callback_url = await consented(http_client, base_url, scopes=["user.info.basic", "video.list"],
                                   sandbox_grant="video.list")
    # Without TikTok's scopes parameter the gap only shows in the token response.
    without_scopes = "&".join(
        part for part in callback_url.split("&") if not part.startswith("scopes=")
    )
    assert_envelope(await follow(http_client, without_scopes), 400, "PERMISSION_DENIED")
    assert sandbox.stats["token"] == 1 and sandbox.stats["revoke"] == 1
    assert await store_of(app).list_accounts("user-123") == []

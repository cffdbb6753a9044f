"""The TikTok sandbox behaves as TIKTOK_API.md describes, quirks included."""

from __future__ import annotations

import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.httpclient import HTTPResponse
from tornado.httputil import url_concat

from sandbox import RateLimit, Sandbox, SandboxClient, default_users, hex_challenge, s256_challenge
from sandbox.__main__ import DEFAULT_CLIENT_SECRET, parse_args

CLIENT_KEY = "test-client-key"
CLIENT_SECRET = "test-client-secret"
REDIRECT_URI = "https://gateway.example/oauth/tiktok/callback"
VERIFIER = "test-verifier-" + "a1B2-._~" * 5  # 54 chars of the allowed alphabet
FORM = "application/x-www-form-urlencoded"
AUTHORIZE = "/v2/auth/authorize/"
TOKEN = "/v2/oauth/token/"
REVOKE = "/v2/oauth/revoke/"
USER_INFO = "/v2/user/info/"
BASIC_FIELDS = "open_id,union_id,avatar_url,avatar_url_100,avatar_large_url,display_name"
TOKEN_KEYS = {
    "access_token",
    "expires_in",
    "open_id",
    "refresh_expires_in",
    "refresh_token",
    "scope",
    "token_type",
}
FIRST_USER, SECOND_USER = default_users()
# TikTok's current lifetimes (TIKTOK_API.md, "Token lifetimes and rotation").
ACCESS_LIFETIME = 7200  # 2 hours
REFRESH_LIFETIME = 15_552_000  # 180 days
DAY = 86400


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    return {}  # overridden per test with @pytest.mark.parametrize("sandbox_options", ...)


@pytest.fixture
def sandbox(sandbox_options: dict[str, Any]) -> Sandbox:
    client = SandboxClient(CLIENT_KEY, CLIENT_SECRET, [REDIRECT_URI], app_name="Acme <Gateway>")
    other = SandboxClient("other-client", "other-secret", ["https://other.example/cb"])
    return Sandbox([client, other], **sandbox_options)


@pytest.fixture
def app(sandbox: Sandbox):
    return sandbox.make_app()


# -- helpers -----------------------------------------------------------------


def authorize_params(**overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_key": CLIENT_KEY,
        "response_type": "code",
        "scope": "user.info.basic,user.info.profile",
        "redirect_uri": REDIRECT_URI,
        "state": "state-123",
        "code_challenge": hex_challenge(VERIFIER),
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


async def authorize(http_client, base_url: str, **overrides: str | None) -> HTTPResponse:
    url = url_concat(base_url + AUTHORIZE, authorize_params(**overrides))
    return await http_client.fetch(url, follow_redirects=False, raise_error=False)


def callback_query(response: HTTPResponse) -> dict[str, str]:
    assert response.code == 302, response.body
    location = response.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return dict(parse_qsl(urlsplit(location).query, keep_blank_values=True))


async def post_form(
    http_client, url: str, fields: dict[str, str], content_type: str = FORM
) -> tuple[HTTPResponse, dict[str, Any]]:
    response = await http_client.fetch(
        url,
        method="POST",
        body=urlencode(fields),
        headers={"Content-Type": content_type},
        raise_error=False,
    )
    return response, json.loads(response.body)


def exchange_fields(code: str) -> dict[str, str]:
    """A valid code exchange's form."""
    return {
        "client_key": CLIENT_KEY,
        "client_secret": CLIENT_SECRET,
        "code": code,
        "grant_type": "authorization_code",
        "redirect_uri": REDIRECT_URI,
        "code_verifier": VERIFIER,
    }


async def exchange(
    http_client, base_url: str, code: str, **overrides: str | None
) -> tuple[HTTPResponse, dict[str, Any]]:
    fields: dict[str, str | None] = {**exchange_fields(code), **overrides}
    body = {k: v for k, v in fields.items() if v is not None}
    return await post_form(http_client, base_url + TOKEN, body)


async def refresh(http_client, base_url: str, refresh_token: str) -> dict[str, Any]:
    response, body = await post_form(
        http_client,
        base_url + TOKEN,
        {
            "client_key": CLIENT_KEY,
            "client_secret": CLIENT_SECRET,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
        },
    )
    assert response.code == 200
    return body


async def connect(http_client, base_url: str, **overrides: str | None) -> dict[str, Any]:
    """The whole browser round trip: authorize, approve, exchange."""
    query = callback_query(await authorize(http_client, base_url, **overrides))
    response, body = await exchange(http_client, base_url, query["code"])
    assert response.code == 200, body
    return body


async def user_info(
    http_client, base_url: str, access_token: str | None, fields: str | None = BASIC_FIELDS
) -> tuple[HTTPResponse, dict[str, Any]]:
    url = base_url + USER_INFO + (f"?fields={fields}" if fields is not None else "")
    headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
    response = await http_client.fetch(url, headers=headers, raise_error=False)
    return response, json.loads(response.body)


async def connected_user_info(
    http_client, base_url: str, fields: str | None
) -> tuple[HTTPResponse, dict[str, Any]]:
    """``fields`` of the user just connected."""
    tokens = await connect(http_client, base_url)
    return await user_info(http_client, base_url, tokens["access_token"], fields)


def assert_flat_error(body: dict[str, Any], error: str) -> None:
    assert body["error"] == error
    assert body["error_description"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["log_id"])


def assert_api_error(body: dict[str, Any], code: str) -> None:
    assert body["data"] == {}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["error"]["log_id"])


# -- authorize ---------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_key": None, "client_id": CLIENT_KEY},
        {"client_key": None},
        {"client_key": "unknown-client"},
        {"redirect_uri": REDIRECT_URI + "/"},
        {"redirect_uri": "https://other.example/cb"},  # another client's URI
        {"redirect_uri": None},
        {"response_type": "token"},
        {"scope": "user.info.basic user.info.profile"},  # space-separated
        {"scope": "user.info.basic,user.info.everything"},
        {"scope": None},
        {"state": None},
        {"code_challenge": None},
        {"code_challenge": s256_challenge(VERIFIER)},  # base64url, but TikTok wants hex
        {"code_challenge": hex_challenge(VERIFIER).upper()},
        {"code_challenge_method": "plain"},
        {"sandbox_user": "nobody"},
        {"sandbox_grant": "video.list"},
        {"sandbox_decision": "maybe"},
    ],
)
@pytest.mark.gen_test
async def test_authorize_misconfiguration_shows_error_page(
    http_client, base_url, sandbox, overrides
):
    response = await authorize(http_client, base_url, **overrides)
    assert response.code == 400
    assert "Location" not in response.headers
    assert response.headers["Content-Type"].startswith("text/html")
    assert b"Something went wrong" in response.body
    assert sandbox.stats["authorize"] == 1


@pytest.mark.gen_test
async def test_approve_redirects_with_code_scopes_and_state(http_client, base_url):
    response = await authorize(http_client, base_url, state="s t&ate")
    query = callback_query(response)
    assert query["code"].startswith("sbx*") and "!" in query["code"]
    assert query["scopes"] == "user.info.basic,user.info.profile"
    assert query["state"] == "s t&ate"
    raw = response.headers["Location"]
    assert "*" not in raw and "!" not in raw and "%2A" in raw and "%21" in raw


@pytest.mark.gen_test
async def test_deny_redirects_with_access_denied(http_client, base_url):
    query = callback_query(await authorize(http_client, base_url, sandbox_decision="deny"))
    assert query["error"] == "access_denied"
    assert query["error_description"]
    assert query["state"] == "state-123"
    assert "code" not in query


@pytest.mark.gen_test
async def test_partial_grant_reports_and_enforces_granted_scopes(http_client, base_url):
    query = callback_query(
        await authorize(
            http_client,
            base_url,
            scope="user.info.basic,user.info.profile,user.info.stats",
            sandbox_grant="user.info.stats,user.info.basic",
        )
    )
    assert query["scopes"] == "user.info.basic,user.info.stats"  # request order
    _, tokens = await exchange(http_client, base_url, query["code"])
    assert tokens["scope"] == "user.info.basic,user.info.stats"
    response, body = await user_info(http_client, base_url, tokens["access_token"], "username")
    assert response.code == 401
    assert_api_error(body, "scope_not_authorized")


@pytest.mark.gen_test
async def test_sandbox_user_picks_who_consents(http_client, base_url):
    tokens = await connect(http_client, base_url, sandbox_user=SECOND_USER.open_id)
    assert tokens["open_id"] == SECOND_USER.open_id


# -- token exchange ----------------------------------------------------------


@pytest.mark.gen_test
async def test_hex_pkce_exchange_returns_documented_shape(http_client, base_url):
    query = callback_query(await authorize(http_client, base_url))
    response, body = await exchange(http_client, base_url, query["code"])
    assert response.code == 200
    assert set(body) == TOKEN_KEYS
    assert body["access_token"].startswith("act.")
    assert body["refresh_token"].startswith("rft.")
    assert body["expires_in"] == ACCESS_LIFETIME
    assert body["refresh_expires_in"] == REFRESH_LIFETIME
    assert body["open_id"] == FIRST_USER.open_id
    assert body["scope"] == "user.info.basic,user.info.profile"
    assert body["token_type"] == "Bearer"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Tt-Logid"])


@pytest.mark.gen_test
async def test_pkce_mismatch_is_invalid_grant_with_http_200(http_client, base_url):
    code = callback_query(await authorize(http_client, base_url))["code"]
    response, body = await exchange(http_client, base_url, code, code_verifier="b" * 43)
    assert response.code == 200
    assert_flat_error(body, "invalid_grant")
    assert "access_token" not in body
    # A failed attempt does not burn the code.
    response, body = await exchange(http_client, base_url, code)
    assert "access_token" in body


@pytest.mark.gen_test
async def test_missing_verifier_is_invalid_request(http_client, base_url):
    code = callback_query(await authorize(http_client, base_url))["code"]
    response, body = await exchange(http_client, base_url, code, code_verifier=None)
    assert response.code == 400
    assert_flat_error(body, "invalid_request")


@pytest.mark.gen_test
async def test_code_is_single_use_and_replay_revokes_its_tokens(http_client, base_url):
    code = callback_query(await authorize(http_client, base_url))["code"]
    _, tokens = await exchange(http_client, base_url, code)
    response, body = await exchange(http_client, base_url, code)
    assert response.code == 200
    assert_flat_error(body, "invalid_grant")
    response, body = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 401


@pytest.mark.gen_test
async def test_redirect_uri_mismatch_is_invalid_grant(http_client, base_url):
    code = callback_query(await authorize(http_client, base_url))["code"]
    response, body = await exchange(http_client, base_url, code, redirect_uri=REDIRECT_URI + "/")
    assert response.code == 200
    assert_flat_error(body, "invalid_grant")


@pytest.mark.gen_test
async def test_code_of_another_client_or_unknown_is_invalid_grant(http_client, base_url):
    code = callback_query(await authorize(http_client, base_url))["code"]
    _, body = await exchange(
        http_client, base_url, code, client_key="other-client", client_secret="other-secret"
    )
    assert_flat_error(body, "invalid_grant")
    _, body = await exchange(http_client, base_url, "sbx*made-up!0000")
    assert_flat_error(body, "invalid_grant")


@pytest.mark.gen_test
async def test_expired_code_is_invalid_grant(http_client, base_url, sandbox):
    code = callback_query(await authorize(http_client, base_url))["code"]
    sandbox.advance_clock(301)
    _, body = await exchange(http_client, base_url, code)
    assert_flat_error(body, "invalid_grant")
    assert "expired" in body["error_description"]


@pytest.mark.parametrize(
    "overrides", [{"client_secret": "wrong"}, {"client_key": "nobody", "client_secret": "x"}]
)
@pytest.mark.gen_test
async def test_bad_client_credentials_are_invalid_client_401(http_client, base_url, overrides):
    code = callback_query(await authorize(http_client, base_url))["code"]
    response, body = await exchange(http_client, base_url, code, **overrides)
    assert response.code == 401
    assert_flat_error(body, "invalid_client")


@pytest.mark.parametrize(
    "content_type", [FORM + "; charset=UTF-8", "application/json", "text/plain"]
)
@pytest.mark.gen_test
async def test_content_type_must_be_exactly_form(http_client, base_url, content_type):
    code = callback_query(await authorize(http_client, base_url))["code"]
    response, body = await post_form(
        http_client, base_url + TOKEN, exchange_fields(code), content_type
    )
    assert response.code == 400
    assert_flat_error(body, "invalid_request")
    assert "charset" not in body["error_description"] or "exactly" in body["error_description"]


@pytest.mark.gen_test
async def test_missing_params_and_unsupported_grant_type(http_client, base_url):
    response, body = await exchange(http_client, base_url, "x", redirect_uri=None)
    assert response.code == 400
    assert_flat_error(body, "invalid_request")
    assert "redirect_uri" in body["error_description"]
    response, body = await exchange(http_client, base_url, "x", grant_type="password")
    assert response.code == 400
    assert_flat_error(body, "unsupported_grant_type")


# -- refresh -----------------------------------------------------------------


@pytest.mark.gen_test
async def test_refresh_rotates_and_old_refresh_token_is_refused(http_client, base_url):
    first = await connect(http_client, base_url)
    second = await refresh(http_client, base_url, first["refresh_token"])
    assert set(second) == TOKEN_KEYS
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["scope"] == first["scope"] and second["open_id"] == first["open_id"]
    again = await refresh(http_client, base_url, first["refresh_token"])
    assert_flat_error(again, "invalid_grant")
    response, _ = await user_info(http_client, base_url, second["access_token"])
    assert response.code == 200


@pytest.mark.gen_test
async def test_expired_access_token_then_refresh(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    sandbox.advance_clock(ACCESS_LIFETIME - 1)
    response, _ = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 200
    sandbox.advance_clock(1)  # two hours after the exchange
    response, body = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 401
    assert_api_error(body, "access_token_invalid")
    assert "expired" in body["error"]["message"]
    fresh = await refresh(http_client, base_url, tokens["refresh_token"])
    response, _ = await user_info(http_client, base_url, fresh["access_token"])
    assert response.code == 200


@pytest.mark.gen_test
async def test_refresh_answers_the_remaining_refresh_lifetime(http_client, base_url, sandbox):
    first = await connect(http_client, base_url)
    sandbox.advance_clock(30 * DAY)
    second = await refresh(http_client, base_url, first["refresh_token"])
    # The access token gets its two hours from now; the refresh token keeps the first
    # one's expiry, so the answer is what remains of the 180 days, not 180 days again.
    assert second["expires_in"] == ACCESS_LIFETIME
    assert second["refresh_expires_in"] == REFRESH_LIFETIME - 30 * DAY
    sandbox.advance_clock(ACCESS_LIFETIME - 1)
    assert (await user_info(http_client, base_url, second["access_token"]))[0].code == 200
    sandbox.advance_clock(1)
    assert (await user_info(http_client, base_url, second["access_token"]))[0].code == 401

    sandbox.advance_clock(60 * DAY - ACCESS_LIFETIME)
    third = await refresh(http_client, base_url, second["refresh_token"])
    assert third["refresh_expires_in"] == REFRESH_LIFETIME - 90 * DAY
    # 180 days after the code exchange, however many refreshes happened in between.
    sandbox.advance_clock(90 * DAY)
    expired = await refresh(http_client, base_url, third["refresh_token"])
    assert_flat_error(expired, "invalid_grant")
    assert "expired" in expired["error_description"]


# -- user info ---------------------------------------------------------------


@pytest.mark.gen_test
async def test_user_info_returns_only_requested_fields(http_client, base_url):
    response, body = await connected_user_info(
        http_client, base_url, "open_id,display_name,username"
    )
    assert response.code == 200
    assert body["data"]["user"] == {
        "open_id": FIRST_USER.open_id,
        "display_name": "Sandbox Creator",
        "username": FIRST_USER.username,
    }
    assert body["error"]["code"] == "ok" and body["error"]["message"] == ""
    assert body["error"]["log_id"] == response.headers["X-Tt-Logid"]


@pytest.mark.gen_test
async def test_user_info_field_of_ungranted_scope_is_scope_not_authorized(http_client, base_url):
    response, body = await connected_user_info(http_client, base_url, "open_id,follower_count")
    assert response.code == 401
    assert_api_error(body, "scope_not_authorized")
    assert "user.info.stats" in body["error"]["message"]


@pytest.mark.parametrize("fields", [None, "", "open_id,shoe_size"])
@pytest.mark.gen_test
async def test_user_info_fields_missing_or_unknown_is_invalid_params(http_client, base_url, fields):
    response, body = await connected_user_info(http_client, base_url, fields)
    assert response.code == 400
    assert_api_error(body, "invalid_params")


@pytest.mark.parametrize("token", [None, "act.not-a-real-token"])
@pytest.mark.gen_test
async def test_user_info_invalid_token_is_401(http_client, base_url, token):
    response, body = await user_info(http_client, base_url, token)
    assert response.code == 401
    assert_api_error(body, "access_token_invalid")


# -- revoke ------------------------------------------------------------------


@pytest.mark.gen_test
async def test_revoke_invalidates_access_and_refresh_tokens(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    response, body = await revoke_form(http_client, base_url, tokens["access_token"])
    assert response.code == 200 and body == {}
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Tt-Logid"])
    response, body = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 401
    assert_api_error(body, "access_token_invalid")
    assert_flat_error(
        await refresh(http_client, base_url, tokens["refresh_token"]), "invalid_grant"
    )
    assert sandbox.stats["revoke"] == 1


async def revoke(http_client, base_url: str, token: str) -> HTTPResponse:
    return await http_client.fetch(
        base_url + REVOKE,
        method="POST",
        body=urlencode({"client_key": CLIENT_KEY, "client_secret": CLIENT_SECRET, "token": token}),
        headers={"Content-Type": FORM},
        raise_error=False,
    )


async def revoke_form(
    http_client, base_url: str, token: str, client_secret: str = CLIENT_SECRET
) -> tuple[HTTPResponse, dict[str, Any]]:
    """A revoke whose answer has a JSON body."""
    return await post_form(
        http_client,
        base_url + REVOKE,
        {"client_key": CLIENT_KEY, "client_secret": client_secret, "token": token},
    )


async def assert_revoke_refuses_a_bad_client(http_client, base_url: str) -> None:
    response, body = await revoke_form(http_client, base_url, "act.whatever", "wrong")
    assert response.code == 401
    assert_flat_error(body, "invalid_client")


@pytest.mark.gen_test
async def test_revoke_refuses_an_expired_access_token(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    sandbox.advance_clock(ACCESS_LIFETIME)
    response = await revoke(http_client, base_url, tokens["access_token"])
    # The token endpoint's flat error shape, with its status for invalid_request.
    assert response.code == 400
    body = json.loads(response.body)
    assert set(body) == {"error", "error_description", "log_id"}
    assert_flat_error(body, "invalid_request")
    assert "expired" in body["error_description"]
    assert body["log_id"] == response.headers["X-Tt-Logid"]
    # Nothing was revoked: refreshing first, then revoking the new token, works.
    fresh = await refresh(http_client, base_url, tokens["refresh_token"])
    response = await revoke(http_client, base_url, fresh["access_token"])
    assert response.code == 200 and json.loads(response.body) == {}
    assert (await user_info(http_client, base_url, fresh["access_token"]))[0].code == 401
    assert sandbox.stats["revoke"] == 2


@pytest.mark.parametrize("sandbox_options", [{"revoke_empty_body": True}])
@pytest.mark.gen_test
async def test_revoke_empty_body_switch(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    response = await revoke(http_client, base_url, tokens["access_token"])
    assert response.code == 200
    assert response.body == b""
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Tt-Logid"])
    assert (await user_info(http_client, base_url, tokens["access_token"]))[0].code == 401
    assert (await revoke(http_client, base_url, "act.unknown")).body == b""
    # Errors keep their JSON body.
    await assert_revoke_refuses_a_bad_client(http_client, base_url)


@pytest.mark.gen_test
async def test_revoke_with_bad_client_is_401(http_client, base_url):
    await assert_revoke_refuses_a_bad_client(http_client, base_url)


@pytest.mark.gen_test
async def test_revoke_all_for_user_simulates_app_removal(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    sandbox.revoke_all_for(FIRST_USER.open_id)
    response, _ = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 401
    assert_flat_error(
        await refresh(http_client, base_url, tokens["refresh_token"]), "invalid_grant"
    )


# -- faults, latency, stats --------------------------------------------------


@pytest.mark.gen_test
async def test_token_fault_500_default_body_then_recovers(http_client, base_url, sandbox):
    sandbox.add_fault("token", status=500)
    code = callback_query(await authorize(http_client, base_url))["code"]
    response, body = await exchange(http_client, base_url, code)
    assert response.code == 500
    assert_flat_error(body, "server_error")
    response, body = await exchange(http_client, base_url, code)  # the code survived
    assert response.code == 200 and "access_token" in body


@pytest.mark.gen_test
async def test_userinfo_fault_429_with_retry_after(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    sandbox.add_fault("userinfo", status=429, retry_after=7, count=2)
    for _ in range(2):
        response, body = await user_info(http_client, base_url, tokens["access_token"])
        assert response.code == 429
        assert response.headers["Retry-After"] == "7"
        assert_api_error(body, "rate_limit_exceeded")
    response, _ = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 200


@pytest.mark.parametrize(
    "sandbox_options", [{"user_info_rate_limit": RateLimit(3, 60), "clock": lambda: 1000.0}]
)
@pytest.mark.gen_test
async def test_user_info_rate_limit_is_a_sliding_window(http_client, base_url, sandbox):
    """TikTok's per-app limit: 429 rate_limit_exceeded once the last window holds the
    limit, room again as each call leaves it; refused calls do not count."""
    tokens = await connect(http_client, base_url)
    answers = []
    at = 0.0
    for moment in (0, 10, 20, 59.9, 60, 61, 70, 79.9, 80):
        sandbox.advance_clock(moment - at)
        at = moment
        response, body = await user_info(http_client, base_url, tokens["access_token"])
        answers.append(response.code)
        if response.code == 429:
            assert_api_error(body, "rate_limit_exceeded")
    # 59.9: 0, 10, 20 in the window; 60: the call at 0 has left; 61: 10, 20, 60 in it;
    # 70: 10 has left; 79.9: 20, 60, 70; 80: 20 has left.
    assert answers == [200, 200, 200, 429, 200, 429, 200, 429, 200]
    assert sandbox.stats["userinfo"] == 9 and sandbox.stats["userinfo_rate_limited"] == 3
    response = await http_client.fetch(base_url + "/sandbox/user-info-calls")
    calls = json.loads(response.body)
    assert calls["limit"] == {"calls": 3, "seconds": 60}
    assert calls["rate_limited"] == 3
    assert [round(t - 1000.0, 1) for t in calls["times"]] == [
        0, 10, 20, 59.9, 60, 61, 70, 79.9, 80]
    sandbox.reset_stats()
    assert json.loads((await http_client.fetch(base_url + "/sandbox/user-info-calls")).body)[
        "times"] == []


@pytest.mark.gen_test
async def test_user_info_has_no_rate_limit_by_default(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    for _ in range(20):
        assert (await user_info(http_client, base_url, tokens["access_token"]))[0].code == 200
    assert sandbox.stats["userinfo_rate_limited"] == 0


def test_rate_limit_option_parses_calls_per_seconds(capsys):
    assert parse_args(["--user-info-rate-limit", "600/60s"]).user_info_rate_limit == RateLimit(
        600, 60.0)
    assert parse_args(["--user-info-rate-limit", "10/6"]).user_info_rate_limit == RateLimit(
        10, 6.0)
    assert parse_args([]).user_info_rate_limit is None
    for bad in ("600", "0/60", "600/0s", "many/60"):
        with pytest.raises(SystemExit):
            parse_args(["--user-info-rate-limit", bad])
    assert "CALLS/SECONDS" in capsys.readouterr().err


@pytest.mark.gen_test
async def test_fault_with_garbage_body_is_sent_raw(http_client, base_url, sandbox):
    sandbox.add_fault("token", status=200, body="<html>garbage")
    response = await http_client.fetch(
        base_url + TOKEN, method="POST", body="", headers={"Content-Type": FORM}, raise_error=False
    )
    assert response.code == 200
    assert response.body == b"<html>garbage"


@pytest.mark.gen_test
async def test_fault_delay_and_latency_slow_answers_down(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    sandbox.add_fault("userinfo", status=200, delay=0.3)  # slow but successful
    started = time.monotonic()
    response, _ = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 200
    assert time.monotonic() - started >= 0.3
    sandbox.add_fault("userinfo", status=503, delay=0.2)
    sandbox.latency = 0.1
    started = time.monotonic()
    response, body = await user_info(http_client, base_url, tokens["access_token"])
    assert response.code == 503
    assert_api_error(body, "internal_error")
    assert time.monotonic() - started >= 0.3


@pytest.mark.gen_test
async def test_clear_faults(http_client, base_url, sandbox):
    sandbox.add_fault("revoke", count=5)
    sandbox.clear_faults()
    response, _ = await revoke_form(http_client, base_url, "act.unknown")
    assert response.code == 200


def test_add_fault_validates_its_arguments(sandbox):
    with pytest.raises(ValueError):
        sandbox.add_fault("authorize")
    with pytest.raises(ValueError):
        sandbox.add_fault("token", count=0)


@pytest.mark.gen_test
async def test_control_endpoints(http_client, base_url, sandbox):
    async def call(method: str, path: str, body: object = None) -> HTTPResponse:
        return await http_client.fetch(
            base_url + path,
            method=method,
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            raise_error=False,
        )

    response = await call("POST", "/sandbox/faults", {"endpoint": "revoke", "status": 502})
    assert response.code == 201
    assert json.loads(response.body)["revoke"][0]["status"] == 502
    assert (await call("POST", "/sandbox/faults", {"endpoint": "nope"})).code == 400
    assert (await call("POST", "/sandbox/faults", {"endpoint": "token", "bogus": 1})).code == 400
    assert (await call("POST", "/sandbox/faults", "not an object")).code == 400
    response = await call("DELETE", "/sandbox/faults")
    assert json.loads(response.body) == {"token": [], "userinfo": [], "revoke": []}

    await connect(http_client, base_url)
    stats = json.loads((await call("GET", "/sandbox/stats")).body)
    assert stats["authorize"] == 1 and stats["token"] == 1
    assert (await call("POST", "/sandbox/reset-stats", {})).code == 200
    assert set(json.loads((await call("GET", "/sandbox/stats")).body).values()) == {0}

    tokens = await connect(http_client, base_url)
    assert (await call("POST", "/sandbox/revoke-user", {"open_id": "nobody"})).code == 400
    response = await call("POST", "/sandbox/revoke-user", {"open_id": FIRST_USER.open_id})
    assert response.code == 200
    assert (await user_info(http_client, base_url, tokens["access_token"]))[0].code == 401

    tokens = await connect(http_client, base_url)
    assert (await call("POST", "/sandbox/clock", {"advance": 86400})).code == 200
    assert (await user_info(http_client, base_url, tokens["access_token"]))[0].code == 401


@pytest.mark.gen_test
async def test_stats_count_every_endpoint(http_client, base_url, sandbox):
    tokens = await connect(http_client, base_url)
    await refresh(http_client, base_url, tokens["refresh_token"])
    await refresh(http_client, base_url, tokens["refresh_token"])  # refused, still counted
    await user_info(http_client, base_url, tokens["access_token"])
    await revoke_form(http_client, base_url, "x")
    assert sandbox.stats == {
        "authorize": 1,
        "token": 3,
        "token_authorization_code": 1,
        "token_refresh": 2,
        "userinfo": 1,
        "revoke": 1,
        "connections": 0,  # only servers from serve()/listen() count connections
        "userinfo_rate_limited": 0,
    }
    sandbox.reset_stats()
    assert set(sandbox.stats.values()) == {0}


@pytest.mark.gen_test
async def test_listen_counts_accepted_connections(http_client, sandbox):
    port = sandbox.listen(0)
    try:
        for _ in range(3):
            response = await http_client.fetch(f"http://127.0.0.1:{port}/sandbox/stats")
            assert response.code == 200
    finally:
        await sandbox.close()
    assert sandbox.stats["connections"] == 3


# -- consent page ------------------------------------------------------------


@pytest.mark.parametrize("sandbox_options", [{"consent": "page"}])
@pytest.mark.gen_test
async def test_consent_page_renders_and_decision_post_works(http_client, base_url, sandbox):
    response = await authorize(http_client, base_url, scope="user.info.basic,video.list")
    assert response.code == 200
    page = response.body.decode()
    assert "Acme &lt;Gateway&gt;" in page  # escaped
    assert "Sandbox Creator" in page
    assert "user.info.basic" in page and "video.list" in page
    assert "Read your public videos" in page
    assert ">Approve<" in page and ">Deny<" in page
    assert 'action="/v2/auth/authorize/decision"' in page
    assert "<script" not in page and 'src="http' not in page and 'href="http' not in page
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
    assert hidden["redirect_uri"] == REDIRECT_URI and hidden["state"] == "state-123"

    async def decide(fields: dict[str, str]) -> HTTPResponse:
        return await http_client.fetch(
            base_url + "/v2/auth/authorize/decision",
            method="POST",
            body=urlencode(fields),
            follow_redirects=False,
            raise_error=False,
        )

    approved = callback_query(await decide({**hidden, "sandbox_decision": "approve"}))
    assert approved["scopes"] == "user.info.basic,video.list"
    _, tokens = await exchange(http_client, base_url, approved["code"])
    assert tokens["scope"] == "user.info.basic,video.list"

    denied = callback_query(await decide({**hidden, "sandbox_decision": "deny"}))
    assert denied["error"] == "access_denied"

    tampered = await decide({**hidden, "redirect_uri": "https://evil.example/cb"})
    assert tampered.code == 400 and "Location" not in tampered.headers
    assert (await decide(hidden)).code == 400  # no decision


@pytest.mark.parametrize("sandbox_options", [{"consent": "page"}])
@pytest.mark.gen_test
async def test_consent_page_mode_still_honours_sandbox_decision(http_client, base_url, sandbox):
    callback_query(await authorize(http_client, base_url, sandbox_decision="approve"))


# -- PKCE modes, issue_code --------------------------------------------------


@pytest.mark.parametrize("sandbox_options", [{"pkce": "s256"}])
@pytest.mark.gen_test
async def test_s256_mode_wants_rfc7636_challenge(http_client, base_url, sandbox):
    refused = await authorize(http_client, base_url)  # hex challenge
    assert refused.code == 400
    await connect(http_client, base_url, code_challenge=s256_challenge(VERIFIER))


@pytest.mark.parametrize("sandbox_options", [{"pkce": "optional"}])
@pytest.mark.gen_test
async def test_optional_mode_accepts_no_pkce_or_either_form(http_client, base_url, sandbox):
    query = callback_query(
        await authorize(http_client, base_url, code_challenge=None, code_challenge_method=None)
    )
    response, body = await exchange(http_client, base_url, query["code"], code_verifier=None)
    assert "access_token" in body
    await connect(http_client, base_url, code_challenge=s256_challenge(VERIFIER))
    await connect(http_client, base_url)


@pytest.mark.gen_test
async def test_issue_code_skips_the_browser(http_client, base_url, sandbox):
    code = sandbox.issue_code(
        CLIENT_KEY,
        REDIRECT_URI,
        ["user.info.basic", "user.info.stats"],
        code_challenge=hex_challenge(VERIFIER),
        open_id=SECOND_USER.open_id,
    )
    _, tokens = await exchange(http_client, base_url, code)
    assert tokens["open_id"] == SECOND_USER.open_id
    response, body = await user_info(http_client, base_url, tokens["access_token"], "video_count")
    assert body["data"]["user"] == {"video_count": SECOND_USER.video_count}
    with pytest.raises(ValueError):
        sandbox.issue_code(CLIENT_KEY, REDIRECT_URI, ["user.info.basic"], code_challenge=None)
    with pytest.raises(ValueError):
        sandbox.issue_code(
            CLIENT_KEY, "https://x.example/cb", ["user.info.basic"], code_challenge=None
        )


def test_default_users_are_deterministic():
    again = default_users()
    assert [u.open_id for u in again] == [FIRST_USER.open_id, SECOND_USER.open_id]
    assert FIRST_USER.display_name == "Sandbox Creator"
    assert SECOND_USER.display_name == "Second Sandbox User"
    assert FIRST_USER.avatar_url.startswith("https://sandbox.invalid/")
    assert re.fullmatch(r"sbx-open-0001-[0-9a-f-]+", FIRST_USER.open_id)


def test_default_lifetimes_are_tiktoks_current_ones():
    client = SandboxClient(CLIENT_KEY, CLIENT_SECRET, [REDIRECT_URI])
    state = Sandbox([client]).state
    assert (state.access_ttl, state.refresh_ttl) == (ACCESS_LIFETIME, REFRESH_LIFETIME)


def test_constructor_rejects_unknown_modes():
    client = SandboxClient(CLIENT_KEY, CLIENT_SECRET, [REDIRECT_URI])
    with pytest.raises(ValueError):
        Sandbox([client], pkce="plain")
    with pytest.raises(ValueError):
        Sandbox([client], consent="sometimes")


# -- CLI ---------------------------------------------------------------------


def test_cli_prints_where_it_listens_and_exits_cleanly_on_sigterm():
    env = {**os.environ, "TIKTOK_CLIENT_KEY": "from-env-key"}
    env.pop("TIKTOK_CLIENT_SECRET", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--port", "0", "--revoke-empty-body"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert re.match(r"TikTok sandbox listening on http://127\.0\.0\.1:\d+ ", line), line
        assert "client_key=from-env-key" in line
        assert "revoke_body=empty" in line
        assert "secret" not in line
        # The flag reaches the sandbox: a successful revoke answers an empty body.
        port = re.search(r":(\d+) ", line).group(1)
        form = urlencode(
            {"client_key": "from-env-key", "client_secret": DEFAULT_CLIENT_SECRET, "token": "x"}
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{REVOKE}", data=form.encode(), headers={"Content-Type": FORM}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            assert (answer.status, answer.read()) == (200, b"")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# -- webhook sender ------------------------------------------------------------


class _Receiver:
    """A webhook endpoint that records what it got and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        receiver = self

        class Handler(tornado.web.RequestHandler):
            def post(self) -> None:
                receiver.requests.append((dict(self.request.headers), self.request.body))
                self.set_status(receiver.status)
                self.finish("{}")

        self.status = status
        self.requests: list[tuple[dict[str, str], bytes]] = []
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/webhooks/tiktok"
        self.server = tornado.httpserver.HTTPServer(
            tornado.web.Application([("/webhooks/tiktok", Handler)])
        )
        self.server.add_sockets(sockets)

    async def close(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()


def _check_signature(headers: dict[str, str], body: bytes, secret: str) -> int:
    """TikTok's scheme: hex HMAC-SHA256 of "<t>.<raw body>" keyed by the client secret."""
    match = re.fullmatch(r"t=(\d+),s=([0-9a-f]{64})", headers["Tiktok-Signature"])
    assert match, headers["Tiktok-Signature"]
    signed = match.group(1).encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, "sha256").hexdigest()
    assert hmac.compare_digest(expected, match.group(2))
    return int(match.group(1))


@pytest.mark.gen_test
async def test_send_webhook_posts_the_documented_signed_body(sandbox):
    receiver = _Receiver()
    try:
        status = await sandbox.send_webhook(
            receiver.url, "authorization.removed", FIRST_USER.open_id, {"reason": 1}
        )
        assert status == 200
        [(headers, body)] = receiver.requests
        document = json.loads(body)
        assert set(document) == {"client_key", "event", "create_time", "user_openid", "content"}
        assert document["client_key"] == CLIENT_KEY
        assert document["event"] == "authorization.removed"
        assert document["user_openid"] == FIRST_USER.open_id
        assert isinstance(document["content"], str)
        assert json.loads(document["content"]) == {"reason": 1}
        assert abs(document["create_time"] - time.time()) < 60
        signed_at = _check_signature(headers, body, CLIENT_SECRET)
        assert abs(signed_at - time.time()) < 60
        assert sandbox.sent_webhooks == [
            (receiver.url, "authorization.removed", FIRST_USER.open_id, 200)
        ]
    finally:
        await receiver.close()


@pytest.mark.gen_test
async def test_send_webhook_can_be_made_wrong_on_purpose(sandbox):
    receiver = _Receiver(status=401)
    try:
        args = (receiver.url, "authorization.removed", FIRST_USER.open_id, '{"reason": 2}')
        assert await sandbox.send_webhook(*args, client_secret="wrong", timestamp=123) == 401
        headers, body = receiver.requests[-1]
        assert headers["Tiktok-Signature"].startswith("t=123,")
        with pytest.raises(AssertionError):
            _check_signature(headers, body, CLIENT_SECRET)
        _check_signature(headers, body, "wrong")
        assert json.loads(json.loads(body)["content"]) == {"reason": 2}  # a string is sent as is

        await sandbox.send_webhook(*args, signature="t=1,s=nothex")
        assert receiver.requests[-1][0]["Tiktok-Signature"] == "t=1,s=nothex"
        await sandbox.send_webhook(*args, signature="")
        assert "Tiktok-Signature" not in receiver.requests[-1][0]

        await sandbox.send_webhook(*args, client_key="other-client")
        headers, body = receiver.requests[-1]
        assert json.loads(body)["client_key"] == "other-client"
        _check_signature(headers, body, "other-secret")  # that client's own secret
    finally:
        await receiver.close()


@pytest.mark.gen_test
async def test_send_webhook_reports_an_unreachable_receiver(sandbox):
    receiver = _Receiver()
    url = receiver.url
    await receiver.close()
    status = await sandbox.send_webhook(url, "authorization.removed", FIRST_USER.open_id, {})
    assert status == 599


@pytest.mark.gen_test
async def test_webhook_control_endpoint_revokes_then_notifies(http_client, base_url, sandbox):
    receiver = _Receiver()

    async def call(body: object) -> HTTPResponse:
        return await http_client.fetch(
            base_url + "/sandbox/webhooks", method="POST", body=json.dumps(body),
            raise_error=False,
        )

    try:
        tokens = await connect(http_client, base_url)
        valid = {"url": receiver.url, "open_id": FIRST_USER.open_id, "reason": 1}
        for bad in (
            {**valid, "url": "ftp://example.com"},
            {**valid, "url": None},
            {**valid, "open_id": "nobody"},
            {**valid, "reason": 6},
            {**valid, "reason": True},
            {**valid, "reason": 1.0},
            {**valid, "event": ""},
            {**valid, "client_key": "unknown-client"},
            {**valid, "event": "video.publish.completed", "content": "not an object"},
        ):
            response = await call(bad)
            assert response.code == 400, bad
        assert receiver.requests == []
        assert (await user_info(http_client, base_url, tokens["access_token"]))[0].code == 200

        response = await call(valid)
        assert response.code == 200
        assert json.loads(response.body) == {"status": 200, "delivered": True}
        [(headers, body)] = receiver.requests
        _check_signature(headers, body, CLIENT_SECRET)
        assert json.loads(json.loads(body)["content"]) == {"reason": 1}
        # As TikTok does: the tokens were revoked before the event was sent.
        assert (await user_info(http_client, base_url, tokens["access_token"]))[0].code == 401

        receiver.status = 500
        response = await call(
            {"url": receiver.url, "open_id": SECOND_USER.open_id,
             "event": "video.publish.completed", "content": {"publish_id": "p1"}}
        )
        assert json.loads(response.body) == {"status": 500, "delivered": False}
        assert json.loads(json.loads(receiver.requests[-1][1])["content"]) == {"publish_id": "p1"}
    finally:
        await receiver.close()

"""The callback contract against recorded TikTok answers (cassettes/, `make cassettes`).

Each test mints a real state through the authorize endpoint, then presents the
scenario's callback while the cassette replays TikTok. Replay is strict: an
unrecorded request fails, and every recorded interaction must be played exactly
once (``replay`` checks on exit, the tests check where it matters mid-way too).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from tornado.httpclient import HTTPResponse

from sandbox.state import FIELDS_BY_SCOPE as TIKTOK_FIELDS_BY_SCOPE
from scripts.cassette_scenarios import (
    CASSETTE_DIR,
    CASSETTE_NAMES,
    FAKE_TOKENS,
    FILTERED_FORM_FIELDS,
    KEPT_RESPONSE_HEADERS,
    SCENARIOS,
    callback_params,
    cassette_path,
    fake_code,
    normalized_form,
    tiktok_vcr,
)
from server import make_app
from tests.cassettes import assert_all_played, assert_nothing_secret, recorded_json, replay
from tests.flow import callback, location, start
from tests.support import (
    CONNECTED,
    assert_envelope,
    make_config,
    store_of,
)

OWNER = "user-123"  # the sub of tests.support.bearer()
TOKEN_URL = "https://open.tiktokapis.com/v2/oauth/token/"
USER_INFO_URL = "https://open.tiktokapis.com/v2/user/info/"
# The fields TikTok documents for each scope (the sandbox's copy, not the gateway's).
BASIC_FIELDS = list(TIKTOK_FIELDS_BY_SCOPE["user.info.basic"])
PROFILE_FIELDS = list(TIKTOK_FIELDS_BY_SCOPE["user.info.profile"])
# TikTok's current lifetimes (TIKTOK_API.md, "Token lifetimes and rotation"), not the
# older pages' 86400 / 31536000: a code exchange answers both in full.
ACCESS_TTL = timedelta(hours=2)
REFRESH_TTL = timedelta(days=180)
CLOCK_SLACK = timedelta(seconds=60)
RECORDER = Path(__file__).resolve().parent.parent / "scripts" / "record_cassettes.py"


@pytest.fixture
def app():
    # TikTok's real URLs: replay means nothing leaves the process.
    return make_app(make_config())


async def started_callback(http_client, base_url, scenario: str) -> dict[str, str]:
    """The query of ``scenario``'s callback, for a state just minted with its scopes."""
    scopes = list(SCENARIOS[scenario].requested_scopes)
    state = (await start(http_client, base_url, OWNER, scopes))["state"]
    return callback_params(scenario, state)


@contextlib.asynccontextmanager
async def replayed_callback(
    http_client, base_url, scenario: str
) -> AsyncIterator[tuple[HTTPResponse, Any]]:
    """A state minted for ``scenario``, then its callback with TikTok replayed from the
    cassette; every recorded interaction must have been played by the end."""
    params = await started_callback(http_client, base_url, scenario)
    with replay(scenario) as cassette:
        yield await callback(http_client, base_url, params), cassette
        assert_all_played(cassette)


def requested_fields(uri: str) -> list[str]:
    query = parse_qs(urlsplit(uri).query)
    return query["fields"][0].split(",")


def assert_uris(cassette, *uris: str) -> None:
    assert [urlsplit(r.uri)._replace(query="").geturl() for r in cassette.requests] == list(uris)


async def only_account(app):
    accounts = await store_of(app).list_accounts(OWNER)
    assert len(accounts) == 1, accounts
    return accounts[0]


def assert_expiries(account, before: datetime, after: datetime, token_body: dict) -> None:
    assert token_body["expires_in"] == ACCESS_TTL.total_seconds()
    assert token_body["refresh_expires_in"] == REFRESH_TTL.total_seconds()
    # Absolute times, not TikTok's relative seconds.
    assert before + ACCESS_TTL - CLOCK_SLACK <= account.access_token_expires_at
    assert account.access_token_expires_at <= after + ACCESS_TTL + CLOCK_SLACK
    assert before + REFRESH_TTL - CLOCK_SLACK <= account.refresh_token_expires_at
    assert account.refresh_token_expires_at <= after + REFRESH_TTL + CLOCK_SLACK


async def assert_fake_tokens_stored(app, account) -> None:
    tokens = await store_of(app).get_account_tokens(account.id)
    assert tokens is not None
    assert tokens.access_token == FAKE_TOKENS["access_token"]
    assert tokens.refresh_token == FAKE_TOKENS["refresh_token"]


# -- the cassettes themselves ------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_cassette_exists_and_holds_nothing_secret(scenario):
    path = cassette_path(scenario)
    text = assert_nothing_secret(path)
    assert "sbx*" not in text and quote("sbx*", safe="") not in text  # sandbox codes
    with tiktok_vcr().use_cassette(path.name) as cassette:
        for request in cassette.requests:
            assert request.uri.startswith("https://open.tiktokapis.com/v2/")
            assert {"authorization", "cookie"}.isdisjoint(h.lower() for h in request.headers)
            form = dict(normalized_form(request.body))
            if request.method == "POST":
                assert form["code"] == fake_code(scenario)
                for name, placeholder in FILTERED_FORM_FIELDS.items():
                    assert form.get(name, placeholder) == placeholder
        for response in cassette.responses:
            assert set(response["headers"]) <= set(KEPT_RESPONSE_HEADERS)
            body = json.loads(response["body"]["string"])
            for name, fake in FAKE_TOKENS.items():
                assert body.get(name, fake) == fake


def test_every_cassette_file_is_a_scenario():
    # Callbacks here; account calls (refresh_*, revoke_*) in test_accounts_cassettes.py.
    assert {p.stem for p in CASSETTE_DIR.glob("*.yaml")} == set(CASSETTE_NAMES)


def test_every_recorded_token_answer_carries_the_current_lifetimes():
    """No cassette keeps the older pages' 24 h / 365 days: every token answer has a
    2-hour access token and at most 180 days of refresh token left."""
    token_answers = 0
    for path in sorted(CASSETTE_DIR.glob("*.yaml")):
        with tiktok_vcr().use_cassette(path.name) as cassette:
            for index, response in enumerate(cassette.responses):
                body = json.loads(response["body"]["string"] or "null")
                if not isinstance(body, dict) or "access_token" not in body:
                    continue
                token_answers += 1
                where = f"{path.name} #{index}: re-record with `make cassettes`"
                assert body["expires_in"] == ACCESS_TTL.total_seconds(), where
                assert 0 < body["refresh_expires_in"] <= REFRESH_TTL.total_seconds(), where
    assert token_answers >= 5  # the exchanges and the refresh are there to check


def test_replay_fails_when_a_recorded_interaction_is_not_played():
    with pytest.raises(AssertionError, match="not played: #0 POST"), replay("invalid_client"):
        pass


@pytest.mark.gen_test
async def test_an_unrecorded_request_fails_loudly(app, http_client, base_url):
    # STYLE.md's trap: vcrpy's answer to an unrecorded request must not pass for
    # "TikTok unavailable" (503); here the code differs from the recorded one.
    params = await started_callback(http_client, base_url, "success")
    params["code"] = "code*other!cassette"
    with pytest.raises(AssertionError) as failure, replay("success") as cassette:
        response = await callback(http_client, base_url, params)
        assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")
        assert cassette.play_count == 0
    assert "not played: #0 POST" in str(failure.value)
    assert f"unrecorded requests made: POST {TOKEN_URL}" in str(failure.value)
    assert await store_of(app).list_accounts(OWNER) == []


# -- the callback contract, one scenario at a time ------------------------------------


@pytest.mark.gen_test
async def test_success_connects_and_a_repeated_callback_changes_nothing(app, http_client, base_url):
    params = await started_callback(http_client, base_url, "success")
    with replay("success") as cassette:
        before = datetime.now(UTC)
        response = await callback(http_client, base_url, params)
        after = datetime.now(UTC)
        assert location(response) == CONNECTED
        assert_all_played(cassette)
        assert_uris(cassette, TOKEN_URL, USER_INFO_URL)
        assert requested_fields(cassette.requests[1].uri) == BASIC_FIELDS + PROFILE_FIELDS

        again = await callback(http_client, base_url, params)
        assert location(again) == CONNECTED
        assert cassette.play_count == 2  # nothing more was sent to TikTok
        assert_all_played(cassette)

    token_body = recorded_json(cassette, 0)
    user = recorded_json(cassette, 1)["data"]["user"]
    account = await only_account(app)
    assert account.platform_account_id == token_body["open_id"] == user["open_id"]
    assert account.display_name == user["display_name"]
    assert account.username == user["username"]
    assert account.display_name and account.username
    assert account.scopes == ["user.info.basic", "user.info.profile"]
    assert account.profile_pending is False
    assert_expiries(account, before, after, token_body)
    await assert_fake_tokens_stored(app, account)


@pytest.mark.gen_test
async def test_partial_scopes_connect_with_basic_fields_only(app, http_client, base_url):
    # TikTok's redirect says the user granted the basic scope only.
    assert callback_params("partial_scopes", "any-state")["scopes"] == "user.info.basic"
    async with replayed_callback(http_client, base_url, "partial_scopes") as (response, cassette):
        assert location(response) == CONNECTED
    assert_uris(cassette, TOKEN_URL, USER_INFO_URL)
    # The URI matched, so this is exactly what the gateway asked for.
    assert requested_fields(cassette.requests[1].uri) == BASIC_FIELDS
    account = await only_account(app)
    assert account.scopes == ["user.info.basic"]
    assert account.profile_pending is False
    assert account.display_name == recorded_json(cassette, 1)["data"]["user"]["display_name"]


@pytest.mark.gen_test
async def test_access_denied_makes_no_request(app, http_client, base_url):
    async with replayed_callback(http_client, base_url, "access_denied") as (response, cassette):
        body = assert_envelope(response, 400, "PERMISSION_DENIED")
        assert body["details"]["providerError"] == "access_denied"
        assert len(cassette) == 0 and cassette.play_count == 0
    assert await store_of(app).list_accounts(OWNER) == []


@pytest.mark.gen_test
async def test_used_code_is_refused_and_the_state_is_spent(app, http_client, base_url):
    params = await started_callback(http_client, base_url, "invalid_code")
    with replay("invalid_code") as cassette:
        response = await callback(http_client, base_url, params)
        body = assert_envelope(response, 400, "VALIDATION_ERROR")
        assert_all_played(cassette)
        recorded = recorded_json(cassette, 0)
        assert cassette.responses[0]["status"]["code"] == 200  # TikTok's error with HTTP 200
        assert body["details"]["providerError"] == recorded["error"] == "invalid_grant"
        assert body["details"]["logId"] == recorded["log_id"]

        # The same callback again (a reload) is told the same without asking TikTok...
        again = await callback(http_client, base_url, params)
        repeated = assert_envelope(again, 400, "VALIDATION_ERROR")
        assert repeated["details"] == body["details"]
        # ...and the spent state takes no other code.
        other = await callback(http_client, base_url, params | {"code": params["code"] + "x"})
        assert_envelope(other, 400, "CONFLICT")
        assert cassette.play_count == 1
    assert_uris(cassette, TOKEN_URL)
    assert await store_of(app).list_accounts(OWNER) == []


@pytest.mark.gen_test
async def test_invalid_client_is_a_validation_error(app, http_client, base_url):
    async with replayed_callback(http_client, base_url, "invalid_client") as (response, cassette):
        body = assert_envelope(response, 400, "VALIDATION_ERROR")
        assert body["details"]["providerError"] == "invalid_client"
        assert cassette.responses[0]["status"]["code"] == 401
    assert_uris(cassette, TOKEN_URL)
    assert await store_of(app).list_accounts(OWNER) == []


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("scenario", "tiktok_status", "retry_after"),
    [("token_server_error", 500, None), ("token_rate_limited", 429, "7")],
)
async def test_token_endpoint_failure_is_unavailable_and_never_retried(
    app, http_client, base_url, scenario, tiktok_status, retry_after
):
    async with replayed_callback(http_client, base_url, scenario) as (response, cassette):
        assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
        assert int(response.headers["Retry-After"]) > 0
        assert cassette.responses[0]["status"]["code"] == tiktok_status
        if retry_after is not None:  # TikTok's own Retry-After, passed on
            assert cassette.responses[0]["headers"]["Retry-After"] == [retry_after]
            assert response.headers["Retry-After"] == retry_after
        # A code is single-use: the token endpoint is called exactly once.
        assert len(cassette) == 1 and cassette.play_count == 1
    assert_uris(cassette, TOKEN_URL)
    assert await store_of(app).list_accounts(OWNER) == []


@pytest.mark.gen_test
async def test_userinfo_unauthorized_keeps_tokens_with_profile_pending(app, http_client, base_url):
    before = datetime.now(UTC)
    async with replayed_callback(
        http_client, base_url, "userinfo_unauthorized"
    ) as (response, cassette):
        after = datetime.now(UTC)
        body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
        assert body["details"]["providerError"] == "access_token_invalid"
        assert cassette.responses[1]["status"]["code"] == 401
    assert_uris(cassette, TOKEN_URL, USER_INFO_URL)
    account = await only_account(app)
    assert account.profile_pending is True
    assert account.display_name is None
    assert account.scopes == ["user.info.basic"]
    assert_expiries(account, before, after, recorded_json(cassette, 0))
    await assert_fake_tokens_stored(app, account)


@pytest.mark.gen_test
async def test_userinfo_is_retried_once_then_connects(app, http_client, base_url):
    async with replayed_callback(
        http_client, base_url, "userinfo_retry_then_ok"
    ) as (response, cassette):
        assert location(response) == CONNECTED
        assert [r["status"]["code"] for r in cassette.responses] == [200, 500, 200]
        assert cassette.play_count == 3  # token + two user-info attempts
    assert_uris(cassette, TOKEN_URL, USER_INFO_URL, USER_INFO_URL)
    account = await only_account(app)
    assert account.profile_pending is False
    assert account.username == recorded_json(cassette, 2)["data"]["user"]["username"]
    await assert_fake_tokens_stored(app, account)


# -- the recorder ------------------------------------------------------------------


def load_recorder():
    if "record_cassettes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("record_cassettes", RECORDER)
        module = importlib.util.module_from_spec(spec)
        sys.modules["record_cassettes"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["record_cassettes"]


def test_leak_scan_finds_raw_and_url_encoded_values(tmp_path):
    recorder = load_recorder()
    code = "sbx*leaked-code-value!0042"
    (tmp_path / "raw.yaml").write_text(f"body: {code}\n")
    (tmp_path / "form.yaml").write_text(f"body: code={quote(code, safe='')}\n")
    (tmp_path / "clean.yaml").write_text("body: code=code%2Asuccess%21cassette\n")
    problems = recorder.scan_for_leaks(
        sorted(tmp_path.glob("*.yaml")), {code: "authorization code"}
    )
    assert problems == [
        "form.yaml: contains a real authorization code",
        "raw.yaml: contains a real authorization code",
    ]


def test_recorder_reproduces_the_committed_cassettes(tmp_path):
    """Re-recording from the sandbox gives the same interactions (log ids aside)."""
    # A child process, as `make cassettes` runs it: the recorder owns its event loop
    # and its logging there, and cannot disturb this process's.
    result = subprocess.run(  # noqa: S603 - this interpreter, our own script
        [sys.executable, str(RECORDER), "--cassette-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.stem for p in tmp_path.glob("*.yaml")) == sorted(CASSETTE_NAMES)
    for scenario in CASSETTE_NAMES:
        fresh = recorder_view(tmp_path, scenario)
        committed = recorder_view(CASSETTE_DIR, scenario)
        assert fresh == committed, f"{scenario}: re-record with `make cassettes`"


def recorder_view(directory: Path, scenario: str) -> list:
    """A cassette's interactions without what legitimately changes per run."""
    with tiktok_vcr(cassette_library_dir=str(directory)).use_cassette(
        f"{scenario}.yaml"
    ) as cassette:
        view = []
        for request, response in zip(cassette.requests, cassette.responses, strict=True):
            body = json.loads(response["body"]["string"])
            body.pop("log_id", None)
            if isinstance(body.get("error"), dict):
                body["error"].pop("log_id", None)
            headers = {k: v for k, v in response["headers"].items() if k != "X-Tt-Logid"}
            view.append(
                (
                    request.method,
                    request.uri,
                    normalized_form(request.body) if request.body else None,
                    dict(request.headers),
                    response["status"],
                    headers,
                    body,
                )
            )
        return view

"""The accounts API against recorded TikTok answers: refresh and revoke.

Each test seeds a connected account in the store (tokens distinct from the
cassettes' fake ones, so a refresh visibly replaces them), then calls the
gateway while the cassette replays TikTok. Replay is strict, as for callbacks:
nothing unrecorded may be asked, and every recorded interaction must be played.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import pytest

from sandbox.state import default_users
from scripts.cassette_scenarios import (
    ACCOUNT_SCENARIOS,
    FAKE_TOKENS,
    FILTERED_FORM_FIELDS,
    KEPT_RESPONSE_HEADERS,
    cassette_path,
    tiktok_vcr,
)
from server import make_app
from storage.base import AccountStatus, TokenGrant
from tests.cassettes import assert_all_played, assert_nothing_secret, recorded_json, replay
from tests.flow import disconnect, token_request
from tests.support import CLIENT_KEY, assert_envelope, make_config, store_of

OWNER = "user-123"
TOKEN_URL = "https://open.tiktokapis.com/v2/oauth/token/"
REVOKE_URL = "https://open.tiktokapis.com/v2/oauth/revoke/"
SEEDED_ACCESS_TOKEN = "act.seeded-before-the-cassette"
SEEDED_REFRESH_TOKEN = "rft.seeded-before-the-cassette"
# The recordings were made with the sandbox's first user.
RECORDED_OPEN_ID = default_users()[0].open_id
CLOCK_SLACK = timedelta(seconds=60)
REFRESH_LIFETIME = 15_552_000  # 180 days (TIKTOK_API.md)
ONE_DAY = 86400


@pytest.fixture
def app():
    # TikTok's real URLs and the default 300 s skew: replay means nothing leaves.
    return make_app(make_config())


async def seed_account(app, *, access_ttl: timedelta) -> str:
    """A connected account as the callback would have left it."""
    now = datetime.now(UTC)
    grant = TokenGrant(
        open_id=RECORDED_OPEN_ID,
        access_token=SEEDED_ACCESS_TOKEN,
        refresh_token=SEEDED_REFRESH_TOKEN,
        access_token_expires_at=now + access_ttl,
        refresh_token_expires_at=now + timedelta(days=300),
        scopes=["user.info.basic"],
    )
    account = await store_of(app).save_account_tokens(OWNER, grant, now=now)
    return account.id


def recorded_form(cassette, index: int) -> dict[str, str]:
    """The form as written in the file (``normalized_form`` would mask the filtered
    fields, which is what this must check)."""
    body = cassette.requests[index].body
    return dict(parse_qsl(body.decode() if isinstance(body, bytes) else body))


# -- the cassettes themselves ------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(ACCOUNT_SCENARIOS))
def test_account_cassette_holds_nothing_secret(scenario):
    path = cassette_path(scenario)
    text = assert_nothing_secret(path)
    assert "record-secret-" not in text
    endpoint = ACCOUNT_SCENARIOS[scenario].endpoint
    expected_uri = TOKEN_URL if endpoint == "refresh" else REVOKE_URL
    with tiktok_vcr().use_cassette(path.name) as cassette:
        assert len(cassette) >= 1
        for index, request in enumerate(cassette.requests):
            assert (request.method, request.uri) == ("POST", expected_uri)
            assert {"authorization", "cookie"}.isdisjoint(h.lower() for h in request.headers)
            form = recorded_form(cassette, index)
            assert form["client_key"] == CLIENT_KEY
            assert form["client_secret"] == FILTERED_FORM_FIELDS["client_secret"]
            if endpoint == "refresh":
                assert form["grant_type"] == "refresh_token"
                assert form["refresh_token"] == FILTERED_FORM_FIELDS["refresh_token"]
            else:
                assert form["token"] == FILTERED_FORM_FIELDS["token"]
        for response in cassette.responses:
            assert set(response["headers"]) <= set(KEPT_RESPONSE_HEADERS)
            body = json.loads(response["body"]["string"])
            for name, fake in FAKE_TOKENS.items():
                assert body.get(name, fake) == fake


# -- refresh -------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_recorded_refresh_rotates_both_tokens(app, http_client, base_url):
    account_id = await seed_account(app, access_ttl=timedelta(seconds=60))  # due
    with replay("refresh_rotated") as cassette:
        before = datetime.now(UTC)
        response = await token_request(http_client, base_url, account_id)
        after = datetime.now(UTC)
        assert response.code == 200, response.body
        assert_all_played(cassette)
        # Fresh now: handed out again without another call (one more would be
        # unrecorded, and replay() would fail on exit).
        again = await token_request(http_client, base_url, account_id)
        assert json.loads(again.body) == json.loads(response.body)
        assert cassette.play_count == 1
    recorded = recorded_json(cassette, 0)
    assert cassette.responses[0]["status"]["code"] == 200
    assert recorded["open_id"] == RECORDED_OPEN_ID
    body = json.loads(response.body)
    assert body["accessToken"] == FAKE_TOKENS["access_token"]
    assert body["openId"] == RECORDED_OPEN_ID
    tokens = await store_of(app).get_account_tokens(account_id)
    # The rotated refresh token replaced the seeded one, with both expiries absolute.
    assert tokens.access_token == FAKE_TOKENS["access_token"]
    assert tokens.refresh_token == FAKE_TOKENS["refresh_token"] != SEEDED_REFRESH_TOKEN
    # Recorded a day after connecting: what remains of the 180 days, so a gateway that
    # assumed a full lifetime instead of reading the answer would be a day off below.
    assert recorded["refresh_expires_in"] == REFRESH_LIFETIME - ONE_DAY
    access_ttl = timedelta(seconds=recorded["expires_in"])
    refresh_ttl = timedelta(seconds=recorded["refresh_expires_in"])
    assert before + access_ttl - CLOCK_SLACK <= tokens.access_token_expires_at
    assert tokens.access_token_expires_at <= after + access_ttl + CLOCK_SLACK
    assert before + refresh_ttl - CLOCK_SLACK <= tokens.refresh_token_expires_at
    assert tokens.refresh_token_expires_at <= after + refresh_ttl + CLOCK_SLACK


@pytest.mark.gen_test
async def test_recorded_invalid_grant_needs_reauthorization(app, http_client, base_url):
    account_id = await seed_account(app, access_ttl=timedelta(seconds=60))  # due
    with replay("refresh_refused") as cassette:
        response = await token_request(http_client, base_url, account_id)
        body = assert_envelope(response, 409, "CONFLICT")
        assert_all_played(cassette)
    assert body["details"] == {"reason": "reauthorization_required"}
    assert cassette.responses[0]["status"]["code"] == 200  # TikTok's error with HTTP 200
    assert recorded_json(cassette, 0)["error"] == "invalid_grant"
    assert await store_of(app).get_account_tokens(account_id) is None
    account = await store_of(app).get_account(account_id)
    assert account.status is AccountStatus.REAUTHORIZATION_REQUIRED


# -- revoke --------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_recorded_revoke_disconnects_once(app, http_client, base_url):
    account_id = await seed_account(app, access_ttl=timedelta(hours=24))
    with replay("revoke_ok") as cassette:
        response = await disconnect(http_client, base_url, account_id)
        assert response.code == 200, response.body
        assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": True}
        # Repeated: the same answer, and no second call (the cassette holds one).
        again = await disconnect(http_client, base_url, account_id)
        assert json.loads(again.body) == json.loads(response.body)
        assert cassette.play_count == 1
        assert_all_played(cassette)
    assert await store_of(app).get_account_tokens(account_id) is None
    assert (await store_of(app).get_account(account_id)).status is AccountStatus.REVOKED


@pytest.mark.gen_test(timeout=10)
async def test_recorded_failing_revoke_is_tried_three_times_then_wiped(
    app, http_client, base_url
):
    account_id = await seed_account(app, access_ttl=timedelta(hours=24))
    with replay("revoke_failed") as cassette:
        response = await disconnect(http_client, base_url, account_id)
        assert response.code == 200, response.body
        assert json.loads(response.body) == {"status": "revoked", "revokedAtTikTok": False}
        assert [r["status"]["code"] for r in cassette.responses] == [500, 500, 500]
        assert cassette.play_count == 3
        assert_all_played(cassette)
    account = await store_of(app).get_account(account_id)
    assert account.status is AccountStatus.REVOKED and account.revoked_at_tiktok is False
    assert await store_of(app).get_account_tokens(account_id) is None

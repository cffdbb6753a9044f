"""The gateway over real HTTP, for everything that does not reach TikTok."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from server import make_app
from storage.base import TokenGrant
from storage.crypto import TokenCipher
from storage.memory import MemoryStore
from tests.fixtures_mongo import mongo_settings, open_mongo_store
from tests.flow import authorize, callback, start
from tests.support import (
    AUTH_SECRET,
    CLIENT_KEY,
    CLIENT_SECRET,
    PRODUCT_REDIRECT,
    REDIRECT_URI,
    assert_envelope,
    bearer,
    forged_state,
    make_config,
    product_token,
    query_of,
)


@pytest.fixture
def app():
    return make_app(make_config())


async def start_state(http_client, base_url) -> str:
    return (await start(http_client, base_url))["state"]


# -- authorize -------------------------------------------------------------------


@pytest.mark.gen_test
async def test_authorize_returns_tiktok_url_without_secret(http_client, base_url):
    response = await authorize(
        http_client, base_url, {"redirectUri": PRODUCT_REDIRECT, "scopes": ["user.info.profile"]}
    )
    assert response.code == 200
    body = json.loads(response.body)
    url = body["authorizationUrl"]
    assert url.startswith("https://www.tiktok.com/v2/auth/authorize/?")
    query = query_of(url)
    assert query["client_key"] == [CLIENT_KEY]
    assert query["response_type"] == ["code"]
    assert query["scope"] == ["user.info.basic,user.info.profile"]
    assert query["redirect_uri"] == [REDIRECT_URI]
    assert query["state"] == [body["state"]]
    assert len(query["code_challenge"][0]) == 64  # hex SHA-256, TikTok's documented form
    assert query["code_challenge_method"] == ["S256"]
    assert CLIENT_SECRET not in url and "client_secret" not in url
    assert body["expiresAt"].endswith("Z")
    assert response.headers["Cache-Control"] == "no-store"


class TestDefaultScopes:
    @pytest.fixture
    def app(self):
        return make_app(make_config(TIKTOK_SCOPES="video.list"))

    @pytest.mark.gen_test
    async def test_default_scopes_always_include_basic(self, http_client, base_url):
        # The profile call after consent needs user.info.basic, whatever TIKTOK_SCOPES says.
        response = await authorize(http_client, base_url)
        assert response.code == 200, response.body
        query = query_of(json.loads(response.body)["authorizationUrl"])
        assert query["scope"] == ["user.info.basic,video.list"]


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Bearer " + jwt.encode({"sub": "u", "exp": 9999999999}, "x" * 40)},
        {"Authorization": "Bearer " + jwt.encode({"sub": "u", "exp": 1}, AUTH_SECRET)},
        {"Authorization": "Bearer " + jwt.encode({"exp": 9999999999}, AUTH_SECRET)},
    ],
    ids=["missing", "basic", "garbage", "wrong-key", "expired", "no-sub"],
)
async def test_authorize_refuses_bad_bearer(http_client, base_url, headers):
    response = await authorize(http_client, base_url, headers=headers)
    assert_envelope(response, 401, "UNAUTHORIZED")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("force_consent", "sent"),
    [(True, ["1"]), (False, None), ("absent", None)],
    ids=["true", "false", "absent"],
)
async def test_force_consent_asks_tiktok_to_show_its_consent_page(
    http_client, base_url, force_consent, sent
):
    # So a user can switch TikTok accounts instead of being authorized silently again.
    body = {"redirectUri": PRODUCT_REDIRECT}
    if force_consent != "absent":
        body["forceConsent"] = force_consent
    response = await authorize(http_client, base_url, body)
    assert response.code == 200, response.body
    query = query_of(json.loads(response.body)["authorizationUrl"])
    assert query.get("disable_auto_auth") == sent


@pytest.mark.gen_test
@pytest.mark.parametrize("value", ["true", 1, 0, None, [], {}], ids=repr)
async def test_force_consent_must_be_a_boolean(http_client, base_url, value):
    response = await authorize(
        http_client, base_url, {"redirectUri": PRODUCT_REDIRECT, "forceConsent": value}
    )
    body = assert_envelope(response, 400, "VALIDATION_ERROR")
    assert body["details"] == {"field": "forceConsent"}
    assert "forceConsent" in body["message"]


@pytest.mark.gen_test
async def test_a_bearer_without_exp_is_refused_with_what_to_do(http_client, base_url):
    token = jwt.encode({"sub": "user-123", "iat": int(time.time())}, AUTH_SECRET)
    response = await authorize(http_client, base_url, headers={"Authorization": f"Bearer {token}"})
    body = assert_envelope(response, 401, "UNAUTHORIZED")
    assert '"exp"' in body["technicalMessage"] and "mint it with an expiry" in body[
        "technicalMessage"]


OLD_AUTH_SECRET = "test-old-auth-secret-" + "o" * 32


class TestBearerKeyRotation:
    @pytest.fixture
    def app(self):
        return make_app(make_config(AUTH_JWT_SECRET=f"{AUTH_SECRET},{OLD_AUTH_SECRET}"))

    @pytest.mark.gen_test
    async def test_every_auth_jwt_secret_key_verifies(self, http_client, base_url):
        for key in (AUTH_SECRET, OLD_AUTH_SECRET):
            token = product_token(secret=key)
            response = await authorize(
                http_client, base_url, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.code == 200, response.body
        other = product_token(secret="test-unknown-auth-secret-" + "u" * 32)
        refused = await authorize(
            http_client, base_url, headers={"Authorization": f"Bearer {other}"}
        )
        assert_envelope(refused, 401, "UNAUTHORIZED")


@pytest.mark.parametrize(
    ("settings", "unset"),
    [
        ({}, "AUTH_JWT_ISSUER and AUTH_JWT_AUDIENCE not set"),
        ({"AUTH_JWT_ISSUER": "https://app.example.com"}, "AUTH_JWT_AUDIENCE not set"),
        ({"AUTH_JWT_AUDIENCE": "tiktok-gateway"}, "AUTH_JWT_ISSUER not set"),
        ({"AUTH_JWT_ISSUER": "https://app.example.com", "AUTH_JWT_AUDIENCE": "tiktok-gateway"},
         None),
    ],
    ids=["neither", "no-audience", "no-issuer", "both"],
)
def test_start_up_warns_when_the_bearer_issuer_or_audience_is_unchecked(
    caplog, settings, unset
):
    with caplog.at_level(logging.WARNING, logger="gateway"):
        make_app(make_config(**settings))
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "AUTH_JWT_" in r.getMessage()]
    if unset is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert warning.startswith(unset + ":"), warning


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        json.dumps({}),
        json.dumps({"redirectUri": "https://evil.example.net/steal"}),
        json.dumps({"redirectUri": PRODUCT_REDIRECT, "scopes": ["user.info.basic", "god.mode"]}),
        json.dumps({"redirectUri": PRODUCT_REDIRECT, "scopes": "user.info.basic"}),
        json.dumps({"redirectUri": PRODUCT_REDIRECT, "scopes": []}),
    ],
    ids=["not-json", "not-object", "no-redirect", "foreign-origin", "unknown-scope", "scope-str",
         "no-scopes"],
)
async def test_authorize_validation_errors(http_client, base_url, body):
    response = await http_client.fetch(
        f"{base_url}/oauth/tiktok/authorize",
        method="POST",
        body=body,
        headers=bearer(),
        raise_error=False,
    )
    assert_envelope(response, 400, "VALIDATION_ERROR")


# -- callback: the rows of the contract that stop before TikTok ----------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "params",
    [
        {"code": "abc"},
        {"state": "x"},
        {"state": "", "code": "abc"},
        {"state": ["a", "b"], "code": "abc"},
        {"state": "a", "code": ["abc", "def"]},
        {"state": "a", "code": "c" * 3000},
    ],
    ids=["no-state", "no-code-no-error", "empty-state", "repeated-state", "repeated-code",
         "huge-code"],
)
async def test_callback_parameter_errors(http_client, base_url, params):
    response = await callback(http_client, base_url, **params)
    assert_envelope(response, 400, "VALIDATION_ERROR")


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "state",
    [
        "garbage",
        forged_state(key="w" * 40),
        forged_state(algorithm="HS512"),
        forged_state(exp=int(time.time()) - 3600, iat=int(time.time()) - 4000),
        forged_state(aud="https://other.example.com/callback"),
        forged_state(iss="someone-else"),
        forged_state(jti=None),
        jwt.encode({"sub": "user-123", "exp": 9999999999}, AUTH_SECRET),
    ],
    ids=["garbage", "wrong-key", "hs512", "expired", "wrong-aud", "wrong-iss", "no-jti",
         "product-token"],
)
async def test_callback_refuses_invalid_state(http_client, base_url, state):
    response = await callback(http_client, base_url, state=state, code="abc")
    body = assert_envelope(response, 400, "VALIDATION_ERROR")
    assert "state" not in body["message"].lower() or "connect" in body["message"].lower()


@pytest.mark.gen_test
async def test_callback_unknown_state_is_conflict(http_client, base_url):
    response = await callback(http_client, base_url, state=forged_state(), code="abc")
    assert_envelope(response, 400, "CONFLICT")


@pytest.mark.gen_test
async def test_access_denied_then_replay(http_client, base_url):
    state = await start_state(http_client, base_url)
    response = await callback(
        http_client,
        base_url,
        state=state,
        error="access_denied",
        error_description="User <b>denied</b> access " + "x" * 500,
    )
    body = assert_envelope(response, 400, "PERMISSION_DENIED")
    assert body["details"]["providerError"] == "access_denied"
    assert "<b>" not in body["message"]
    assert len(body.get("technicalMessage", "")) < 300
    # The same callback again (a reload, a double click) is told the same...
    again = await callback(http_client, base_url, state=state, error="access_denied")
    repeated = assert_envelope(again, 400, "PERMISSION_DENIED")
    for key in ("message", "technicalMessage", "details"):
        assert repeated[key] == body[key], key
    # ...another use of the state is not.
    other = await callback(http_client, base_url, state=state, code="abc")
    assert_envelope(other, 400, "CONFLICT")


@pytest.mark.gen_test
async def test_scopes_without_basic_refused_before_exchange(http_client, base_url):
    # No cassette and no TikTok here: reaching TikTok would fail with 503, not 400.
    state = await start_state(http_client, base_url)
    response = await callback(
        http_client, base_url, state=state, code="abc", scopes="video.list"
    )
    body = assert_envelope(response, 400, "PERMISSION_DENIED")
    assert body["details"]["grantedScopes"] == ["video.list"]


@pytest.mark.gen_test
async def test_a_refused_callback_does_not_echo_what_its_link_claims_was_granted(
    http_client, base_url
):
    state = await start_state(http_client, base_url)
    planted = "Call +1-555-0100 to restore your account"
    response = await callback(
        http_client, base_url, state=state, code="abc", scopes=f"video.list,{planted}"
    )
    body = assert_envelope(response, 400, "PERMISSION_DENIED")
    assert body["details"]["grantedScopes"] == ["video.list"]
    assert planted.encode() not in response.body


# -- the rest of the surface -------------------------------------------------------


@pytest.mark.gen_test
async def test_unknown_path_and_wrong_method(http_client, base_url):
    missing = await http_client.fetch(f"{base_url}/nope", raise_error=False)
    assert_envelope(missing, 404, "NOT_FOUND")
    missing_post = await http_client.fetch(
        f"{base_url}/nope", method="POST", body="", raise_error=False
    )
    assert_envelope(missing_post, 404, "NOT_FOUND")
    wrong = await http_client.fetch(
        f"{base_url}/oauth/tiktok/callback", method="POST", body="", raise_error=False
    )
    assert_envelope(wrong, 405, "METHOD_NOT_ALLOWED")


@pytest.mark.gen_test
async def test_health_and_readiness(http_client, base_url):
    health = await http_client.fetch(f"{base_url}/healthz")
    assert json.loads(health.body) == {"status": "ok"}
    ready = await http_client.fetch(f"{base_url}/readyz")
    assert json.loads(ready.body) == {"status": "ready"}
    assert ready.headers["Referrer-Policy"] == "no-referrer"


@pytest.mark.gen_test
async def test_request_id_taken_only_when_well_formed(http_client, base_url):
    good = await http_client.fetch(
        f"{base_url}/healthz", headers={"X-Request-ID": "req-12345678"}
    )
    assert good.headers["X-Request-ID"] == "req-12345678"
    bad = await http_client.fetch(
        f"{base_url}/nope", headers={"X-Request-ID": "evil\u00e9 <script>"}, raise_error=False
    )
    body = assert_envelope(bad, 404, "NOT_FOUND")
    assert body["requestId"] != "evil <script>"
    assert len(body["requestId"]) == 36


# -- failures below the handlers -------------------------------------------------------


class ExplodingStore(MemoryStore):
    """A store with a bug: the gateway must answer 500 without leaking details."""

    async def claim_pending(self, jti, *, callback_digest, now):
        raise RuntimeError("secret internal detail: db password hunter2")


class TestBug:
    @pytest.fixture
    def app(self):
        return make_app(make_config(), store=ExplodingStore())

    @pytest.mark.gen_test
    async def test_a_bug_is_a_500_envelope_without_traceback(self, http_client, base_url):
        state = await start_state(http_client, base_url)
        response = await callback(http_client, base_url, state=state, code="abc")
        body = assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")
        assert "hunter2" not in response.body.decode()
        assert "technicalMessage" not in body and "details" not in body


# -- stored tokens no configured key opens ---------------------------------------------

KEY_A = "key-a:" + base64.b64encode(os.urandom(32)).decode()
KEY_B = "key-b:" + base64.b64encode(os.urandom(32)).decode()


class TestTokensSealedWithARemovedKey:
    """Tokens sealed with key A, a gateway holding only key B: data loss or a wrong key
    set. The product gets the generic 500; the operator gets an ERROR line."""

    @pytest.fixture
    def app(self, io_loop, mongo_server, mongo_database_name):
        app = make_app(make_config(**mongo_settings(mongo_server.uri, mongo_database_name),
                                   TOKEN_ENCRYPTION_KEYS=KEY_B))
        # As start-up does: the gateway's MongoDB store serves only once indexed.
        io_loop.run_sync(app.settings["gateway"].store.initialize)
        yield app
        io_loop.run_sync(app.settings["gateway"].store.close)

    @pytest.mark.gen_test
    async def test_access_token_is_a_generic_500_and_an_error_log(
        self, http_client, base_url, mongo_server, mongo_database_name, caplog
    ):
        now = datetime.now(UTC)
        sealed_with_a = TokenCipher(TokenCipher.parse_keys(KEY_A))
        async with open_mongo_store(mongo_server.uri, mongo_database_name, "motor",
                                    sealed_with_a) as store:
            account = await store.save_account_tokens(
                "user-123",
                TokenGrant(open_id="open-1", access_token="act.test-sealed-with-a",
                           refresh_token="rft.test-sealed-with-a",
                           access_token_expires_at=now + timedelta(days=1),
                           refresh_token_expires_at=now + timedelta(days=365),
                           scopes=["user.info.basic"]),
                now=now,
            )
        with caplog.at_level(logging.INFO, logger="gateway"):
            response = await http_client.fetch(
                f"{base_url}/accounts/{account.id}/access-token", method="POST", body="",
                headers=bearer(scope="tiktok.tokens"), raise_error=False,
            )
        body = assert_envelope(response, 500, "INTERNAL_SERVER_ERROR")
        assert "technicalMessage" not in body and "details" not in body
        text = response.body.decode()
        assert "key-a" not in text and "key-b" not in text and "act.test" not in text
        [logged] = [r for r in caplog.records if r.name == "gateway.errors"]
        assert logged.levelno == logging.ERROR
        assert "key-a" in logged.getMessage()  # the operator learns which key is missing
        assert "Traceback" not in caplog.text

"""POST /webhooks/tiktok over real HTTP: signatures, idempotency, deauthorization."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from types import EllipsisType
from typing import Any

import pytest
from bson import ObjectId

from sandbox.app import webhook_signature
from sandbox.state import OAuthError
from scripts.cassette_scenarios import serving
from server import make_app
from services.webhooks import MAX_WEBHOOK_BODY_BYTES, sign
from storage.base import Account, AccountStatus, Store
from storage.mongodb import ACCOUNTS_COLLECTION
from tests.fixtures_mongo import mongo_settings, raw_database
from tests.flow import connect, sandbox_settings
from tests.support import (
    CLIENT_KEY,
    CLIENT_SECRET,
    assert_envelope,
    fake_grant,
    make_config,
    store_of,
    utc_now,
)

URL = "/webhooks/tiktok"
HOUR = 3600
OPEN_ID = "open-id-webhook-" + secrets.token_hex(4)
OTHER_OPEN_ID = "open-id-bystander-" + secrets.token_hex(4)


async def seed(store: Store) -> dict[str, Account]:
    """Two owners connected the same TikTok user; a third owner another user."""
    now = utc_now() - timedelta(minutes=5)
    return {
        "alice": await store.save_account_tokens("alice", fake_grant(OPEN_ID), now=now),
        "bob": await store.save_account_tokens("bob", fake_grant(OPEN_ID), now=now),
        "carol": await store.save_account_tokens("carol", fake_grant(OTHER_OPEN_ID), now=now),
    }


def event(
    name: str = "authorization.removed",
    *,
    open_id: str = OPEN_ID,
    content: Any = None,
    client_key: str | EllipsisType = CLIENT_KEY,
    **overrides: Any,
) -> bytes:
    document = {
        "client_key": client_key,
        "event": name,
        "create_time": int(time.time()),
        "user_openid": open_id,
        "content": json.dumps({"reason": 1}) if content is None else content,
        **overrides,
    }
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


async def deliver(
    http_client: Any, base_url: str, body: bytes, signature: str | None = "sign"
) -> Any:
    headers = {"Content-Type": "application/json"}
    if signature == "sign":
        signature = sign(body, CLIENT_SECRET, int(time.time()))
    if signature is not None:
        headers["TikTok-Signature"] = signature
    return await http_client.fetch(
        base_url + URL, method="POST", body=body, headers=headers, raise_error=False
    )


async def snapshot(store: Store, accounts: dict[str, Account]) -> dict[str, Any]:
    """Everything a webhook could change, per account."""
    state = {}
    for name, account in accounts.items():
        stored = await store.get_account(account.id)
        assert stored is not None
        state[name] = (stored, await store.get_account_tokens(account.id))
    return state


@contextlib.asynccontextmanager
async def changes_nothing(app: Any) -> AsyncIterator[None]:
    """Seeded accounts that the block must leave exactly as they were."""
    store = store_of(app)
    accounts = await seed(store)
    before = await snapshot(store, accounts)
    yield
    assert await snapshot(store, accounts) == before


async def assert_revoked(store: Store, account: Account, reason: int) -> Account:
    stored = await store.get_account(account.id)
    assert stored is not None
    assert stored.status is AccountStatus.REVOKED
    assert stored.revocation_reason == reason
    assert stored.revoked_at_tiktok is True
    assert await store.get_account_tokens(account.id) is None
    return stored


@pytest.fixture
def app():
    return make_app(make_config())


# -- deauthorization ---------------------------------------------------------


@pytest.mark.gen_test
async def test_authorization_removed_revokes_every_account_of_that_user(
    http_client, base_url, app
):
    store = store_of(app)
    accounts = await seed(store)
    before = await snapshot(store, {"carol": accounts["carol"]})

    response = await deliver(http_client, base_url, event(content='{"reason": 1 }'))

    assert response.code == 200
    assert json.loads(response.body) == {"received": True}
    assert response.headers["Cache-Control"] == "no-store"
    for owner in ("alice", "bob"):
        revoked = await assert_revoked(store, accounts[owner], 1)
        assert revoked.revoked_at is not None
        assert revoked.updated_at > accounts[owner].updated_at
    assert await snapshot(store, {"carol": accounts["carol"]}) == before


@pytest.mark.gen_test
async def test_replayed_event_is_200_and_changes_nothing(http_client, base_url, app):
    store = store_of(app)
    accounts = await seed(store)
    body = event()
    assert (await deliver(http_client, base_url, body)).code == 200
    after_first = await snapshot(store, accounts)

    # TikTok retries with a fresh signature; an attacker replays the same header.
    header = sign(body, CLIENT_SECRET, int(time.time()))
    for signature in (header, header, "sign"):
        response = await deliver(http_client, base_url, body, signature)
        assert response.code == 200
        assert json.loads(response.body) == {"received": True}
    assert await snapshot(store, accounts) == after_first


@pytest.mark.gen_test
async def test_reason_code_is_kept_and_a_missing_reason_is_unknown(http_client, base_url, app):
    store = store_of(app)
    accounts = await seed(store)
    assert (await deliver(http_client, base_url, event(content='{"reason": 4}'))).code == 200
    await assert_revoked(store, accounts["alice"], 4)
    body = event(open_id=OTHER_OPEN_ID, content="{}")
    assert (await deliver(http_client, base_url, body)).code == 200
    await assert_revoked(store, accounts["carol"], 0)


@pytest.mark.gen_test
async def test_event_for_an_unknown_user_is_200(http_client, base_url, app):
    accounts = await seed(store_of(app))
    before = await snapshot(store_of(app), accounts)
    response = await deliver(http_client, base_url, event(open_id="nobody-we-know"))
    assert response.code == 200
    assert await snapshot(store_of(app), accounts) == before


@pytest.mark.gen_test
async def test_unknown_event_is_200_logged_and_ignored(http_client, base_url, app, caplog):
    caplog.set_level(logging.INFO, logger="gateway.webhooks")
    body = event("video.publish.completed", content=json.dumps({"publish_id": "v_pub_1"}))
    async with changes_nothing(app):
        response = await deliver(http_client, base_url, body)
        assert response.code == 200
        assert json.loads(response.body) == {"received": True}
    assert "ignoring TikTok webhook event 'video.publish.completed'" in caplog.text


# -- signature ---------------------------------------------------------------


def _altered(body: bytes) -> bytes:
    altered = body.replace(OPEN_ID.encode(), OTHER_OPEN_ID.encode())
    assert altered != body
    return altered


def _hex(body: bytes, timestamp: int) -> str:
    return sign(body, CLIENT_SECRET, timestamp).split(",s=")[1]


BAD_SIGNATURES = {
    "wrong key": lambda body, t: sign(body, "another-apps-secret", t),
    # Signed for the bystander; the body sent names our user.
    "altered body": lambda body, t: sign(_altered(body), CLIENT_SECRET, t),
    "older than 72 hours": lambda body, t: sign(body, CLIENT_SECRET, t - 73 * HOUR),
    "future timestamp": lambda body, t: sign(body, CLIENT_SECRET, t + 301 + 5),
    "timestamp swapped after signing": lambda body, t: f"t={t - 1},s={_hex(body, t)}",
    "missing header": lambda body, t: None,
    "empty header": lambda body, t: "",
    "no t": lambda body, t: f"s={_hex(body, t)}",
    "no s": lambda body, t: f"t={t}",
    "empty t": lambda body, t: f"t=,s={_hex(body, t)}",
    "empty s": lambda body, t: f"t={t},s=",
    "non-numeric t": lambda body, t: f"t=now,s={_hex(body, t)}",
    "negative t": lambda body, t: f"t=-{t},s={_hex(body, t)}",
    "float t": lambda body, t: f"t={t}.0,s={_hex(body, t)}",
    "non-hex s": lambda body, t: f"t={t},s={'g' * 64}",
    "short s": lambda body, t: f"t={t},s={_hex(body, t)[:-1]}",
    "base64 s": lambda body, t: f"t={t},s={'A' * 43}=",
    "space after comma": lambda body, t: f"t={t}, s={_hex(body, t)}",
    "spaces around =": lambda body, t: f"t = {t},s = {_hex(body, t)}",
    "repeated t": lambda body, t: f"t={t}," + sign(body, CLIENT_SECRET, t),
    "two t, the second signed": lambda body, t: f"t={t - 1}," + sign(body, CLIENT_SECRET, t),
    "two s, neither matching": lambda body, t: f"t={t},s={_hex(body, t - 1)},s={'a' * 64}",
    "a matching s beside a malformed one": lambda body, t: sign(body, CLIENT_SECRET, t) + ",s=x",
    "extra element, no s": lambda body, t: f"t={t},v1={_hex(body, t)}",
    "semicolons": lambda body, t: sign(body, CLIENT_SECRET, t).replace(",", ";"),
    "no =": lambda body, t: f"t{t},s{_hex(body, t)}",
    "bare hex": lambda body, t: _hex(body, t),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", list(BAD_SIGNATURES))
async def test_unverifiable_requests_are_401_and_change_nothing(http_client, base_url, app, case):
    body = event()
    signature = BAD_SIGNATURES[case](body, int(time.time()))
    async with changes_nothing(app):
        envelope = assert_envelope(await deliver(http_client, base_url, body, signature), 401,
                                   "UNAUTHORIZED")
    assert "TikTok-Signature" in envelope["technicalMessage"]


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "make_header",
    [
        lambda body, t: sign(body, CLIENT_SECRET, t - 250),
        lambda body, t: sign(body, CLIENT_SECRET, t + 250),  # within the 300 s clock skew
        lambda body, t: f"s={_hex(body, t)},t={t}",  # order is not significant
        lambda body, t: f"t={t},s={_hex(body, t).upper()}",
        lambda body, t: webhook_signature(body, CLIENT_SECRET, t),  # the sandbox agrees
    ],
    ids=["past-within", "future-within", "s-first", "upper-hex", "sandbox"],
)
async def test_valid_signatures(http_client, base_url, app, make_header):
    store = store_of(app)
    accounts = await seed(store)
    body = event()
    response = await deliver(http_client, base_url, body, make_header(body, int(time.time())))
    assert response.code == 200, response.body
    await assert_revoked(store, accounts["alice"], 1)


class TestTolerance:
    @pytest.fixture
    def app(self):
        return make_app(make_config(WEBHOOK_TOLERANCE_SECONDS="60"))

    @pytest.mark.gen_test
    async def test_configured_tolerance_is_applied(self, http_client, base_url, app):
        store = store_of(app)
        accounts = await seed(store)
        body = event()
        # A tolerance below the 300 s clock-skew allowance bounds the future too.
        for skew in (-120, 120):
            signature = sign(body, CLIENT_SECRET, int(time.time()) + skew)
            assert_envelope(await deliver(http_client, base_url, body, signature), 401,
                            "UNAUTHORIZED")
        assert (await store.get_account(accounts["alice"].id)).status is AccountStatus.CONNECTED
        assert (await deliver(http_client, base_url, body)).code == 200
        await assert_revoked(store, accounts["alice"], 1)


# -- body --------------------------------------------------------------------

MALFORMED = {
    "not JSON": b"reason=1",
    "not UTF-8": b'{"event": "\xff"}',
    "JSON array": b"[]",
    "JSON string": b'"authorization.removed"',
    "empty": b"",
    "nested beyond the parser's depth": b"[" * 50_000,
    "no user_openid": event(user_openid=...),
    "empty user_openid": event(user_openid=""),
    "no client_key": event(client_key=...),
    "no event": event(event=...),
    "no create_time": event(create_time=...),
    "create_time as text": event(create_time="1615338610"),
    "create_time as bool": event(create_time=True),
    "user_openid a number": event(user_openid=42),
}


@pytest.mark.gen_test
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_signed_but_malformed_body_is_400(http_client, base_url, app, case):
    async with changes_nothing(app):
        assert_envelope(await deliver(http_client, base_url, MALFORMED[case]), 400,
                        "VALIDATION_ERROR")


@pytest.mark.gen_test
async def test_event_of_another_app_is_400_and_changes_nothing(http_client, base_url, app):
    body = event(client_key="another-app-client-key")
    async with changes_nothing(app):
        envelope = assert_envelope(await deliver(http_client, base_url, body), 400,
                                   "VALIDATION_ERROR")
    assert envelope["details"] == {"field": "client_key"}


@pytest.mark.gen_test
async def test_oversize_body_is_413_and_changes_nothing(http_client, base_url, app):
    padded = json.loads(event())
    padded["padding"] = "x" * MAX_WEBHOOK_BODY_BYTES
    body = json.dumps(padded).encode()
    async with changes_nothing(app):
        assert_envelope(await deliver(http_client, base_url, body), 413, "PAYLOAD_TOO_LARGE")
    # Just under the limit is accepted.
    padded["padding"] = "x" * (MAX_WEBHOOK_BODY_BYTES - len(event()) - 20)
    assert (await deliver(http_client, base_url, json.dumps(padded).encode())).code == 200


@pytest.mark.gen_test
async def test_other_methods_get_the_envelope(http_client, base_url):
    response = await http_client.fetch(base_url + URL, raise_error=False)
    assert_envelope(response, 405, "METHOD_NOT_ALLOWED")


# -- MongoDB -----------------------------------------------------------------


class TestWithMongoDB:
    @pytest.fixture
    def app(self, io_loop, mongo_server, mongo_database_name, mongo_driver):
        app = make_app(
            make_config(**mongo_settings(mongo_server.uri, mongo_database_name, mongo_driver))
        )
        yield app
        # Before mongo_driver's teardown, which collects what a closed pymongo client leaks.
        io_loop.run_sync(app.settings["gateway"].store.close)

    @pytest.mark.gen_test(timeout=30)
    async def test_authorization_removed(
        self, http_client, base_url, app, mongo_server, mongo_database_name
    ):
        store = store_of(app)
        await store.initialize()
        accounts = await seed(store)
        body = event(content='{"reason": 2}')
        assert (await deliver(http_client, base_url, body)).code == 200
        for owner in ("alice", "bob"):
            await assert_revoked(store, accounts[owner], 2)
        assert (await store.get_account(accounts["carol"].id)).status is AccountStatus.CONNECTED

        with raw_database(mongo_server.uri, mongo_database_name) as database:
            documents = database[ACCOUNTS_COLLECTION]
            doc = documents.find_one({"_id": ObjectId(accounts["alice"].id)})
            assert doc is not None
            assert "accessToken" not in doc and "refreshToken" not in doc
            assert doc["status"] == "revoked" and doc["revocationReason"] == 2
            assert (await deliver(http_client, base_url, body)).code == 200  # redelivery
            again = documents.find_one({"_id": ObjectId(accounts["alice"].id)})
            assert again is not None and again["updatedAt"] == doc["updatedAt"]


# -- TikTok's retries and unreadable content, on every store --------------------


def serving_gateway(store: Store) -> contextlib.AbstractAsyncContextManager[str]:
    """The gateway (default configuration) on ``store``, on a free loopback port."""
    return serving(make_app(make_config(), store=store))


async def connect_one(store: Store, open_id: str, *, hours_ago: float = 0.1) -> Account:
    connected = utc_now() - timedelta(hours=hours_ago)
    return await store.save_account_tokens("owner-" + open_id, fake_grant(open_id), now=connected)


async def assert_untouched(store: Store, account: Account) -> None:
    stored = await store.get_account(account.id)
    assert stored is not None and stored.status is AccountStatus.CONNECTED
    assert await store.get_account_tokens(account.id) is not None


@pytest.mark.gen_test(timeout=30)
async def test_a_retry_signed_up_to_72_hours_ago_is_applied(client, make_store):
    # A retry that carries the first attempt's signature and create_time.
    async with make_store() as store, serving_gateway(store) as url:
        account = await connect_one(store, OPEN_ID, hours_ago=80)
        now = int(time.time())

        body = event(create_time=now - 73 * HOUR)
        too_old = sign(body, CLIENT_SECRET, now - 73 * HOUR)
        envelope = assert_envelope(await deliver(client, url, body, too_old), 401,
                                   "UNAUTHORIZED")
        assert "tolerance 259200s" in envelope["technicalMessage"]
        await assert_untouched(store, account)

        body = event(create_time=now - 71 * HOUR)
        response = await deliver(client, url, body, sign(body, CLIENT_SECRET, now - 71 * HOUR))
        assert response.code == 200, response.body
        await assert_revoked(store, account, 1)


@pytest.mark.gen_test(timeout=30)
async def test_signature_elements_other_than_t_and_s_are_ignored(client, make_store):
    headers = {
        "unknown element": lambda body, t: sign(body, CLIENT_SECRET, t) + ",v1=abc",
        "unknown element first": lambda body, t: "k=1," + sign(body, CLIENT_SECRET, t),
        "element without =": lambda body, t: sign(body, CLIENT_SECRET, t) + ",flag",
        "trailing comma": lambda body, t: sign(body, CLIENT_SECRET, t) + ",",
        # Several s (say, while TikTok rotates the secret): one matching is enough.
        "matching s second": lambda body, t: f"t={t},s={'a' * 64},s={_hex(body, t)}",
    }
    async with make_store() as store, serving_gateway(store) as url:
        for case, make_header in headers.items():
            open_id = f"open-id-{secrets.token_hex(4)}"
            account = await connect_one(store, open_id)
            body = event(open_id=open_id)
            response = await deliver(client, url, body, make_header(body, int(time.time())))
            assert response.code == 200, (case, response.body)
            await assert_revoked(store, account, 1)


UNREADABLE_CONTENT = {
    "empty": "",
    "missing": ...,
    "null": None,
    "not JSON": "reason: 1",
    "a JSON array": "[1]",
    "a JSON string": json.dumps("reason"),
    "an object, not a string": {"reason": 1},
    "no reason": "{}",
    "reason as text": json.dumps({"reason": "1"}),
    "reason as bool": json.dumps({"reason": True}),
    "reason as float": json.dumps({"reason": 1.5}),
    "negative reason": json.dumps({"reason": -1}),
    "reason beyond int64": json.dumps({"reason": 10**30}),
    "nested beyond the parser's depth": "[" * 30_000,
}


@pytest.mark.gen_test(timeout=30)
async def test_removal_with_unreadable_content_is_applied_as_reason_0(client, make_store):
    async with make_store() as store, serving_gateway(store) as url:
        for case, content in UNREADABLE_CONTENT.items():
            open_id = f"open-id-{secrets.token_hex(4)}"
            account = await connect_one(store, open_id)
            document = json.loads(event(open_id=open_id))
            document["content"] = content
            body = json.dumps({k: v for k, v in document.items() if v is not ...}).encode()
            response = await deliver(client, url, body)
            assert response.code == 200, (case, response.body)
            await assert_revoked(store, account, 0)
            # A redelivery of it is a 200 too, and changes nothing.
            assert (await deliver(client, url, body)).code == 200
            await assert_revoked(store, account, 0)


# -- end to end with the sandbox as TikTok -------------------------------------


class TestWithSandbox:
    @pytest.fixture
    def app(self, sandbox):
        return make_app(make_config(**sandbox_settings(sandbox.url)))

    @pytest.mark.gen_test
    async def test_user_removes_the_app_in_tiktok(self, http_client, base_url, app, sandbox):
        store = store_of(app)
        alice = await _connect(http_client, base_url, store, "alice")
        bob = await _connect(http_client, base_url, store, "bob")
        open_id = alice.platform_account_id
        assert bob.platform_account_id == open_id

        # A forged delivery (not signed with our secret) is refused first.
        status = await sandbox.send_webhook(
            base_url + URL, "authorization.removed", open_id, {"reason": 1},
            client_secret="not-the-apps-secret",
        )
        assert status == 401
        assert (await store.get_account(alice.id)).status is AccountStatus.CONNECTED

        status = await sandbox.send_webhook(
            base_url + URL, "authorization.removed", open_id, {"reason": 1}
        )
        assert status == 200
        for account in (alice, bob):
            await assert_revoked(store, account, 1)
        assert [entry[3] for entry in sandbox.sent_webhooks] == [401, 200]

    @pytest.mark.gen_test
    async def test_sandbox_control_endpoint_revokes_at_tiktok_and_notifies(
        self, http_client, base_url, app, sandbox
    ):
        store = store_of(app)
        account = await _connect(http_client, base_url, store, "alice")
        tokens = await store.get_account_tokens(account.id)
        assert tokens is not None
        response = await http_client.fetch(
            sandbox.url + "/sandbox/webhooks",
            method="POST",
            body=json.dumps(
                {"url": base_url + URL, "open_id": account.platform_account_id, "reason": 5}
            ),
        )
        assert json.loads(response.body) == {"status": 200, "delivered": True}
        await assert_revoked(store, account, 5)
        # As at TikTok, the user's tokens died before the webhook was sent.
        with pytest.raises(OAuthError, match="revoked"):
            sandbox.state.check_access(tokens.access_token)


async def _connect(http_client: Any, base_url: str, store: Store, owner: str) -> Account:
    await connect(http_client, base_url, owner=owner)
    [account] = await store.list_accounts(owner)
    assert account.status is AccountStatus.CONNECTED
    return account


@pytest.mark.gen_test
async def test_late_redelivery_spares_a_newer_connection(http_client, base_url, app):
    store = store_of(app)
    accounts = await seed(store)  # connected five minutes ago
    # TikTok retries for up to 72 h: this removal happened an hour before they connected.
    body = event(create_time=int(time.time()) - 3600)
    response = await deliver(http_client, base_url, body)
    assert response.code == 200
    for account in accounts.values():
        stored = await store.get_account(account.id)
        assert stored.status is AccountStatus.CONNECTED
        assert await store.get_account_tokens(account.id) is not None


@pytest.mark.gen_test
async def test_out_of_range_create_time_is_400(http_client, base_url, app):
    response = await deliver(http_client, base_url, event(create_time=10**20))
    assert_envelope(response, 400, "VALIDATION_ERROR")


class TestInsideAnXsrfProtectedHost:
    """Mounted in a host application with xsrf_cookies=True, deliveries still land."""

    @pytest.fixture
    def app(self):
        import tornado.web

        from server import build_gateway, routes

        gateway = build_gateway(make_config())
        host = tornado.web.Application(
            routes(gateway), xsrf_cookies=True, cookie_secret="host-cookie-secret-for-tests"
        )
        host.settings["gateway"] = gateway
        return host

    @pytest.mark.gen_test
    async def test_signed_delivery_is_accepted(self, http_client, base_url, app):
        store = store_of(app)
        accounts = await seed(store)
        response = await deliver(http_client, base_url, event())
        assert response.code == 200
        await assert_revoked(store, accounts["alice"], 1)

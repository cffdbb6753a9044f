"""One refresh at TikTok for many concurrent token requests, across gateway processes.

Two ``python server.py`` processes share one MongoDB (SecantusDB, over the wire)
and one sandbox (in this process, so its counters are read directly, and
``record_refreshes`` sees every refresh token presented). The only thing that can
keep the two processes from both refreshing is the lease in the account document;
the sandbox rotates refresh tokens, so a second refresh with the same token would
be refused.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient

from services.product_auth import TOKENS_SCOPE
from storage.base import AccountTokens
from storage.crypto import TokenCipher
from storage.mongodb import APP_NAME
from tests.fixtures_mongo import mongo_failpoint, open_mongo_store
from tests.flow import consented, follow, live_sandbox, location, record_refreshes
from tests.processes import GatewayProcess, gateway_settings, poll_until, started_gateway
from tests.support import TOKEN_KEY, assert_envelope, bearer

REQUESTS = 50
# The first access token lives a minute: inside the gateway's 300 s skew, so the
# account is due for a refresh from the start. The refreshed token lives 24 h,
# far outside the skew, so once one request has refreshed, every other request
# (in either process) finds a fresh token and hands it out. A skew larger than
# the 24 h lifetime would not do here: every request arriving after the refresh
# would find the new token due as well and refresh again.
FIRST_ACCESS_TTL = 60
REFRESHED_ACCESS_TTL = 86400
SKEW_SECONDS = 300


@pytest.fixture
def sandbox(io_loop):
    with live_sandbox(io_loop, access_ttl=FIRST_ACCESS_TTL) as sandbox:
        yield sandbox


@pytest.fixture
def wide_client(io_loop) -> Iterator[AsyncHTTPClient]:
    """Sends all the requests at once (the shared client queues after 10)."""
    client = AsyncHTTPClient(force_instance=True, max_clients=REQUESTS + 10)
    yield client
    client.close()


async def stored_tokens(uri: str, database: str, account_id: str) -> AccountTokens | None:
    """The account's tokens as MongoDB holds them, decrypted with the gateways' key."""
    cipher = TokenCipher(TokenCipher.parse_keys(TOKEN_KEY))
    async with open_mongo_store(uri, database, "motor", cipher, initialize=False) as store:
        return await store.get_account_tokens(account_id)


def requests_only_settings(
    mongodb_uri: str, database: str, sandbox_url: str, **extra: str
) -> dict[str, str]:
    """A gateway's settings with no background refresher: only the test's token
    requests may call TikTok, each refreshing tokens within SKEW_SECONDS of expiry."""
    return gateway_settings(
        mongodb_uri, database, sandbox_url,
        REFRESH_SKEW_SECONDS=str(SKEW_SECONDS), REFRESH_INTERVAL_SECONDS="0", **extra,
    )


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_token_requests_over_two_processes_refresh_once(
    sandbox, mongo_server, mongo_database_name, wide_client, tmp_path
):
    settings = requests_only_settings(mongo_server.uri, mongo_database_name, sandbox.url)
    with (
        GatewayProcess(tmp_path / "gateway-a.log", **settings) as gateway_a,
        GatewayProcess(tmp_path / "gateway-b.log", **settings) as gateway_b,
    ):
        await asyncio.gather(
            gateway_a.wait_ready(wide_client), gateway_b.wait_ready(wide_client)
        )

        # Connect through gateway A; gateway B knows the account only through MongoDB.
        callback_url = await consented(wide_client, gateway_a.url)
        assert location(await follow(wide_client, callback_url)).endswith("status=connected")
        listed = await wide_client.fetch(gateway_b.url + "/accounts", headers=bearer())
        [account] = json.loads(listed.body)["accounts"]
        expires = datetime.fromisoformat(account["accessTokenExpiresAt"].replace("Z", "+00:00"))
        assert expires - datetime.now(UTC) < timedelta(seconds=SKEW_SECONDS)  # due
        original = await stored_tokens(mongo_server.uri, mongo_database_name, account["id"])
        assert original is not None
        assert sandbox.stats["token_refresh"] == 0
        seen = record_refreshes(sandbox)

        sandbox.state.access_ttl = REFRESHED_ACCESS_TTL
        headers = bearer(scope=TOKENS_SCOPE)
        responses = await asyncio.gather(
            *(
                wide_client.fetch(
                    f"{gateway.url}/accounts/{account['id']}/access-token",
                    method="POST",
                    body=b"",
                    headers=headers,
                    raise_error=False,
                    request_timeout=60,
                )
                for n in range(REQUESTS)
                for gateway in [(gateway_a, gateway_b)[n % 2]]
            )
        )

        failed = [(r.code, r.body[:200]) for r in responses if r.code != 200]
        assert not failed, (
            f"{len(failed)} of {REQUESTS} failed, e.g. {failed[:3]}\n"
            f"--- A ---\n{gateway_a.log_tail(1500)}\n--- B ---\n{gateway_b.log_tail(1500)}"
        )
        bodies = [json.loads(r.body) for r in responses]
        tokens = {b["accessToken"] for b in bodies}
        assert len(tokens) == 1, tokens
        assert tokens != {original.access_token}
        assert len({b["expiresAt"] for b in bodies}) == 1
        assert sandbox.stats["token_refresh"] == 1

        stored = await stored_tokens(mongo_server.uri, mongo_database_name, account["id"])
        assert stored is not None
        assert stored.access_token in tokens
        # The one refresh used the then newest refresh token, and its answer is stored.
        [(presented, answer)] = seen.calls
        assert presented == original.refresh_token and answer is not None
        assert (stored.access_token, stored.refresh_token) == (
            answer["access_token"], answer["refresh_token"])
        assert stored.version == original.version + 1


def token_request(client: AsyncHTTPClient, gateway: GatewayProcess, account_id: str) -> Any:
    return client.fetch(
        f"{gateway.url}/accounts/{account_id}/access-token", method="POST", body=b"",
        headers=bearer(scope=TOKENS_SCOPE), raise_error=False, request_timeout=60,
    )


async def connect_through(client: AsyncHTTPClient, gateway: GatewayProcess) -> str:
    callback_url = await consented(client, gateway.url)
    assert location(await follow(client, callback_url)).endswith("status=connected")
    listed = await client.fetch(gateway.url + "/accounts", headers=bearer())
    [account] = json.loads(listed.body)["accounts"]
    return str(account["id"])


async def refreshes_sent(sandbox: Any, count: int) -> None:
    async def sent() -> int:
        return int(sandbox.stats["token_refresh"])

    await poll_until(sent, lambda n: n >= count, timeout=20, interval=0.05,
                     what=f"{count} refresh(es) sent to the sandbox")


# TikTok answering one refresh in 16 s with a 20 s request timeout, and a second
# process asking for the same account's token 15 s after the refresh was sent.
SLOW_REFRESH_SECONDS = 16
SECOND_ASKS_AFTER_SECONDS = 15


@pytest.mark.gen_test(timeout=120)
async def test_a_second_process_waits_for_a_refresh_tiktok_answers_in_16_s(
    sandbox, mongo_server, mongo_database_name, wide_client, tmp_path
):
    settings = requests_only_settings(mongo_server.uri, mongo_database_name, sandbox.url,
                                      TIKTOK_REQUEST_TIMEOUT_SECONDS="20")
    with (
        GatewayProcess(tmp_path / "gateway-a.log", **settings) as gateway_a,
        GatewayProcess(tmp_path / "gateway-b.log", **settings) as gateway_b,
    ):
        await asyncio.gather(gateway_a.wait_ready(wide_client), gateway_b.wait_ready(wide_client))
        account_id = await connect_through(wide_client, gateway_a)
        original = await stored_tokens(mongo_server.uri, mongo_database_name, account_id)
        seen = record_refreshes(sandbox)
        sandbox.state.access_ttl = REFRESHED_ACCESS_TTL
        sandbox.add_fault("token", status=200, delay=SLOW_REFRESH_SECONDS)

        first = asyncio.ensure_future(token_request(wide_client, gateway_a, account_id))
        await refreshes_sent(sandbox, 1)
        await asyncio.sleep(SECOND_ASKS_AFTER_SECONDS)
        assert not first.done()
        second = await token_request(wide_client, gateway_b, account_id)
        first_response = await first

        logs = f"--- A ---\n{gateway_a.log_tail(1500)}\n--- B ---\n{gateway_b.log_tail(1500)}"
        assert (first_response.code, second.code) == (200, 200), logs
        [(presented, answer)] = seen.calls
        assert presented == original.refresh_token and answer is not None, logs
        for response in (first_response, second):
            assert json.loads(response.body)["accessToken"] == answer["access_token"]
        stored = await stored_tokens(mongo_server.uri, mongo_database_name, account_id)
        assert stored.refresh_token == answer["refresh_token"]


@pytest.mark.gen_test(timeout=120)
async def test_sigterm_stores_a_grant_whose_save_failed_before_the_gateway_exits(
    sandbox, mongo_server, mongo_database_name, wide_client, tmp_path
):
    settings = requests_only_settings(mongo_server.uri, mongo_database_name, sandbox.url,
                                      SHUTDOWN_TIMEOUT_SECONDS="20")
    async with started_gateway(wide_client, tmp_path / "gateway.log", **settings) as gateway:
        account_id = await connect_through(wide_client, gateway)
        original = await stored_tokens(mongo_server.uri, mongo_database_name, account_id)
        seen = record_refreshes(sandbox)
        # MongoDB drops every update the gateway sends: the refresh's save fails.
        with mongo_failpoint(mongo_server.uri, failCommands=["update"], closeConnection=True,
                             appName=APP_NAME):
            response = await token_request(wide_client, gateway, account_id)
            body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
            assert body["details"]["dependency"] == "mongodb", body
            [(presented, answer)] = seen.calls
            assert presented == original.refresh_token and answer is not None
            gateway.send_signal(signal.SIGTERM)

            async def log_text() -> str:
                return gateway.log_tail(20000)

            await poll_until(log_text, lambda text: "before shutting down" in text,
                             timeout=20, what="the shutdown storing the new tokens")
            assert gateway.running
        # MongoDB is back: the grant is stored, then the gateway exits.
        assert await gateway.wait_exit(40) == 0
        log = gateway.log_tail(20000)
        assert "shutdown complete" in log, log
        assert "lost" not in log, log
        for token in (answer["access_token"], answer["refresh_token"]):
            assert token not in log
        stored = await stored_tokens(mongo_server.uri, mongo_database_name, account_id)
        assert (stored.access_token, stored.refresh_token) == (
            answer["access_token"], answer["refresh_token"])
        assert len(seen.calls) == 1

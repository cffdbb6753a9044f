"""The HTTP client the gateway calls TikTok with (services/http_client.py).

Over the live sandbox, which counts the TCP connections it accepts: the pooled
curl client keeps its connections alive across callbacks, and the failures the
callback maps to the 503 envelope (refused, timeout, 5xx) map the same with
either client. Counts only: no timing is asserted here (``make bench`` measures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPClientError
from tornado.simple_httpclient import SimpleAsyncHTTPClient

import services.http_client as http_client_module
from core.errors import ConfigError, ProviderRejected, ProviderUnavailable
from scripts.cassette_scenarios import callback_params
from server import make_app
from services.http_client import (
    DEFAULT_MAX_CONNECTIONS,
    close_http_client,
    is_refused,
    is_timeout,
    make_http_client,
    nothing_sent,
)
from services.tiktok import TikTokClient, tiktok_client_for
from tests.cassettes import replay
from tests.flow import location, sandbox_settings, start
from tests.support import (
    CONNECTED,
    LOOPBACK,
    assert_envelope,
    free_port,
    make_config,
)

CLIENTS = ("curl", "simple")
SEQUENTIAL_FLOWS = 50


@pytest.fixture(params=CLIENTS)
def client_kind(request):
    return request.param


@pytest.fixture
def gateway_settings(sandbox, client_kind):
    return sandbox_settings(sandbox.url) | {
        "TIKTOK_HTTP_CLIENT": client_kind,
        "TIKTOK_REQUEST_TIMEOUT_SECONDS": "1",
    }


@pytest.fixture
def app(io_loop, gateway_settings):
    app = make_app(make_config(**gateway_settings))
    yield app
    # Before the IOLoop closes: the pooled client's idle connections with it.
    app.settings["gateway"].tiktok.close()


def consent_without_http(sandbox, authorization_url: str, base_url: str) -> str:
    """TikTok's consent, straight from the sandbox's state: no connection to count."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorization_url).query).items()}
    code = sandbox.issue_code(
        query["client_key"],
        query["redirect_uri"],
        query["scope"].split(","),
        code_challenge=query.get("code_challenge"),
    )
    params = {"code": code, "scopes": query["scope"], "state": query["state"]}
    return f"{base_url}/oauth/tiktok/callback?{urlencode(params)}"


async def connect_once(http_client, base_url, sandbox) -> None:
    started = await start(http_client, base_url)
    callback_url = consent_without_http(sandbox, started["authorizationUrl"], base_url)
    response = await http_client.fetch(callback_url, follow_redirects=False, raise_error=False)
    assert location(response) == CONNECTED


# -- connections ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_connections_to_tiktok_per_callback(http_client, base_url, sandbox, client_kind):
    for _ in range(SEQUENTIAL_FLOWS):
        await connect_once(http_client, base_url, sandbox)
    assert sandbox.stats["token"] == sandbox.stats["userinfo"] == SEQUENTIAL_FLOWS
    per_100_callbacks = 100 * sandbox.stats["connections"] / SEQUENTIAL_FLOWS
    if client_kind == "curl":
        # Kept alive and reused: the first callback's connection serves all the others.
        assert per_100_callbacks <= 2
    else:
        # Tornado's simple client: a new connection for every call, two per callback.
        assert per_100_callbacks == 200


@pytest.mark.gen_test(timeout=30)
async def test_the_pool_is_closed_with_the_gateway(
    http_client, base_url, app, sandbox, client_kind
):
    await connect_once(http_client, base_url, sandbox)
    tiktok = app.settings["gateway"].tiktok
    assert tiktok._http is not None
    tiktok.close()
    assert tiktok._http is None
    # A later call makes a new client (a gateway is not meant to be used after close).
    await connect_once(http_client, base_url, sandbox)
    assert sandbox.stats["token"] == 2


# -- failures map to the 503 envelope with either client ------------------------------


@pytest.mark.gen_test(timeout=20)
@pytest.mark.parametrize(
    "fault",
    [{"status": 500}, {"status": 200, "delay": 2.0}],  # 2 s > the 1 s request timeout
    ids=["500", "timeout"],
)
async def test_token_faults_are_503_and_never_resent(
    http_client, base_url, sandbox, client_kind, fault
):
    started = await start(http_client, base_url)
    callback_url = consent_without_http(sandbox, started["authorizationUrl"], base_url)
    sandbox.add_fault("token", **fault)
    response = await http_client.fetch(callback_url, follow_redirects=False, raise_error=False)
    body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert body["details"]["endpoint"] == "token"
    assert sandbox.stats["token"] == 1  # the code may have been consumed: never resent
    if "delay" in fault:
        assert "timeout" in body["technicalMessage"]


class TestRefusedConnection:
    @pytest.fixture
    def gateway_settings(self, sandbox, client_kind):
        settings = sandbox_settings(sandbox.url) | {"TIKTOK_HTTP_CLIENT": client_kind}
        settings["TIKTOK_API_BASE_URL"] = f"http://{LOOPBACK}:{free_port()}"
        return settings

    @pytest.mark.gen_test(timeout=20)
    async def test_refused_is_503(self, http_client, base_url, sandbox, client_kind):
        started = await start(http_client, base_url)
        callback_url = consent_without_http(sandbox, started["authorizationUrl"], base_url)
        response = await http_client.fetch(
            callback_url, follow_redirects=False, raise_error=False
        )
        body = assert_envelope(response, 503, "SERVICE_UNAVAILABLE")
        assert body["details"]["endpoint"] == "token"


@pytest.mark.gen_test(timeout=20)
async def test_refused_exchange_is_retried_once_then_unavailable(client_kind):
    """Nothing was sent when a connection is refused: the one retry the exchange allows."""
    config = make_config(
        TIKTOK_HTTP_CLIENT=client_kind, TIKTOK_API_BASE_URL=f"http://{LOOPBACK}:{free_port()}",
        TIKTOK_CONNECT_TIMEOUT_SECONDS="1", TIKTOK_REQUEST_TIMEOUT_SECONDS="2",
    )
    attempts = []

    def watched_client():
        # Made the way the gateway makes it, each fetch counted.
        client = make_http_client(config)
        fetch = client.fetch

        async def counted(request, **kwargs):
            attempts.append(request.url)
            return await fetch(request, **kwargs)

        client.fetch = counted
        return client

    tiktok = tiktok_client_for(config, http_factory=watched_client)
    try:
        with pytest.raises(ProviderUnavailable) as raised:
            await tiktok.exchange_code("a-code", "a-verifier")
        assert raised.value.details["endpoint"] == "token"
        assert len(attempts) == 2
    finally:
        tiktok.close()


@pytest.mark.gen_test(timeout=20)
async def test_refused_and_timeout_are_recognised_from_either_client(client_kind, sandbox):
    client = make_http_client(make_config(TIKTOK_HTTP_CLIENT=client_kind))
    try:
        with pytest.raises((OSError, HTTPClientError)) as refused:
            await client.fetch(f"http://{LOOPBACK}:{free_port()}/", raise_error=False)
        assert is_refused(refused.value) and not is_timeout(refused.value)
        assert nothing_sent(refused.value)
        sandbox.add_fault("userinfo", status=200, delay=1.0)
        with pytest.raises(HTTPClientError) as timed_out:
            await client.fetch(f"{sandbox.url}/v2/user/info/", request_timeout=0.2,
                               raise_error=False)
        assert is_timeout(timed_out.value) and not is_refused(timed_out.value)
        # Connected, the request written, no answer: TikTok may have acted on it.
        assert not nothing_sent(timed_out.value)
    finally:
        close_http_client(client)


# -- calls beyond the pool wait a bounded time, and never reach TikTok late ------------


@contextlib.asynccontextmanager
async def one_busy_connection(
    client_kind: str, sandbox, *, connect_timeout: float, request_timeout: float,
    busy_seconds: float, slow_calls: int = 1,
) -> AsyncIterator[tuple[TikTokClient, asyncio.Future]]:
    """The gateway's TikTok client with a pool of one connection, which a first exchange
    holds for ``busy_seconds`` (TikTok answers the next ``slow_calls`` that late)."""
    sandbox.add_fault("token", status=200, delay=busy_seconds, count=slow_calls)
    tiktok = tiktok_client_for(make_config(
        **sandbox_settings(sandbox.url), TIKTOK_HTTP_CLIENT=client_kind,
        TIKTOK_MAX_CONNECTIONS="1", TIKTOK_CONNECT_TIMEOUT_SECONDS=str(connect_timeout),
        TIKTOK_REQUEST_TIMEOUT_SECONDS=str(request_timeout),
    ))
    holder = asyncio.ensure_future(tiktok.exchange_code("code-holding-the-connection", None))
    try:
        await asyncio.sleep(0)  # it takes the connection first
        yield tiktok, holder
        with pytest.raises(ProviderRejected):  # the sandbox never issued that code
            await holder
    finally:
        holder.cancel()  # a no-op unless the test failed before it finished
        await asyncio.wait([holder])
        tiktok.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_call_waiting_for_a_connection_gives_up_unsent(client_kind, sandbox):
    async with one_busy_connection(client_kind, sandbox, connect_timeout=0.3,
                                   request_timeout=10, busy_seconds=2.0) as (tiktok, holder):
        with pytest.raises(ProviderUnavailable) as raised:
            await tiktok.exchange_code("code-that-waits", None)
        assert "waiting for a free connection" in raised.value.technical_message
        assert raised.value.details["endpoint"] == "token"
        assert not holder.done()  # it gave up while the connection was still busy
        await asyncio.wait([holder])
        # Only the holder reached TikTok: the code that waited was never sent.
        assert sandbox.stats["token"] == 1
        # The connection is free again for the next call.
        with pytest.raises(ProviderRejected):
            await tiktok.exchange_code("a-later-code", None)
        assert sandbox.stats["token"] == 2


@pytest.mark.gen_test(timeout=30)
async def test_time_spent_waiting_counts_against_the_request_timeout(client_kind, sandbox):
    # Both calls take 0.6 s at TikTok. The second waits ~0.6 s for the connection, so of
    # its 1 s request timeout ~0.4 s are left: it must time out, not get a full second.
    async with one_busy_connection(client_kind, sandbox, connect_timeout=0.9,
                                   request_timeout=1.0, busy_seconds=0.6,
                                   slow_calls=2) as (tiktok, _):
        with pytest.raises(ProviderUnavailable) as raised:
            await tiktok.exchange_code("second-code", None)
        assert "timeout" in raised.value.technical_message


@pytest.mark.gen_test(timeout=30)
async def test_a_cancelled_waiter_does_not_keep_a_slot(client_kind, sandbox):
    async with one_busy_connection(client_kind, sandbox, connect_timeout=5,
                                   request_timeout=10, busy_seconds=0.5) as (tiktok, holder):
        waiter = asyncio.ensure_future(tiktok.exchange_code("cancelled-code", None))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait([holder])
        with pytest.raises(ProviderRejected):
            await tiktok.exchange_code("next-code", None)
        assert sandbox.stats["token"] == 2  # the cancelled one was never sent
        assert not tiktok._slots.locked()


# -- recorded TikTok traffic replays through either client ------------------------------


class TestCassettes:
    @pytest.fixture
    def gateway_settings(self, client_kind):
        return {"TIKTOK_HTTP_CLIENT": client_kind}  # TikTok's real URLs: replayed

    @pytest.mark.gen_test
    async def test_success_replays(self, http_client, base_url, client_kind):
        started = await start(http_client, base_url)
        query = urlencode(callback_params("success", started["state"]))
        with replay("success"):  # also asserts every recorded interaction was played
            response = await http_client.fetch(
                f"{base_url}/oauth/tiktok/callback?{query}",
                follow_redirects=False, raise_error=False,
            )
        assert location(response).endswith("platform=tiktok&status=connected")


# -- configuration ---------------------------------------------------------------------


def test_defaults_to_curl_with_a_bounded_pool(io_loop):
    config = make_config()
    assert config.tiktok_http_client is None
    assert config.tiktok_max_connections == DEFAULT_MAX_CONNECTIONS
    client = make_http_client(config)
    try:
        assert isinstance(client, CurlAsyncHTTPClient)
        assert len(client._curls) == DEFAULT_MAX_CONNECTIONS
    finally:
        close_http_client(client)


@pytest.mark.parametrize("kind", CLIENTS)
def test_configured_client_and_pool_size(io_loop, kind):
    config = make_config(TIKTOK_HTTP_CLIENT=kind.upper(), TIKTOK_MAX_CONNECTIONS="7")
    assert (config.tiktok_http_client, config.tiktok_max_connections) == (kind, 7)
    client = make_http_client(config)
    try:
        if kind == "curl":
            assert isinstance(client, CurlAsyncHTTPClient) and len(client._curls) == 7
        else:
            assert isinstance(client, SimpleAsyncHTTPClient) and client.max_clients == 7
    finally:
        close_http_client(client)
    # The gateway holds calls beyond the pool itself, with the same bound.
    slots = make_app(config).settings["gateway"].tiktok._slots
    assert slots is not None and slots._value == 7


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_hosts_smaller_client_bounds_the_calls_in_flight(io_loop, kind):
    """An embedding host's own client with fewer slots than TIKTOK_MAX_CONNECTIONS: the
    gateway lets only as many calls through, so none waits in that client's queue."""
    config = make_config(TIKTOK_MAX_CONNECTIONS="20")
    host_client = (CurlAsyncHTTPClient if kind == "curl" else SimpleAsyncHTTPClient)(
        force_instance=True, max_clients=5
    )
    try:
        assert tiktok_client_for(config, host_client)._slots._value == 5
        roomy = make_config(TIKTOK_MAX_CONNECTIONS="3")
        assert tiktok_client_for(roomy, host_client)._slots._value == 3
    finally:
        close_http_client(host_client)


def test_each_gateway_gets_its_own_client(io_loop):
    config = make_config()
    first, second = make_http_client(config), make_http_client(config)
    try:
        assert first is not second  # never the per-IOLoop shared AsyncHTTPClient()
    finally:
        close_http_client(first)
        close_http_client(second)


def test_without_pycurl_falls_back_to_simple_with_a_warning(io_loop, monkeypatch, caplog):
    monkeypatch.setattr(http_client_module, "curl_available", lambda: False)
    caplog.set_level(logging.WARNING, logger="gateway.http")
    client = make_http_client(make_config())
    try:
        assert isinstance(client, SimpleAsyncHTTPClient)
        assert "pycurl is not installed" in caplog.text
    finally:
        close_http_client(client)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"TIKTOK_HTTP_CLIENT": "requests"}, "TIKTOK_HTTP_CLIENT='requests' is invalid"),
        ({"TIKTOK_MAX_CONNECTIONS": "0"}, "TIKTOK_MAX_CONNECTIONS='0' is invalid"),
    ],
)
def test_invalid_settings_stop_the_start_up(overrides, problem):
    with pytest.raises(ConfigError) as raised:
        make_config(**overrides)
    assert problem in str(raised.value)


def test_curl_without_pycurl_is_a_configuration_error(monkeypatch):
    import services.config as config_module

    monkeypatch.setattr(config_module, "curl_available", lambda: False)
    with pytest.raises(ConfigError) as raised:
        make_config(TIKTOK_HTTP_CLIENT="curl")
    assert "needs pycurl" in str(raised.value)

"""Graceful shutdown of ``python server.py`` on SIGTERM.

The gateway runs as its own process (``tests.processes.GatewayProcess``) with the
in-memory store; TikTok is the in-process sandbox, served on the test's event loop,
whose token endpoint is made slow so that a callback is surely in flight when the
signal arrives. Every wait is a bounded poll that keeps the loop (and so the
sandbox) running; the process is stopped in ``finally`` (the context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from core.errors import ConfigError
from tests.flow import consented, follow, location, sandbox_settings
from tests.processes import GatewayProcess, poll_until
from tests.support import CONNECTED, LOOPBACK, make_config

EXIT_TIMEOUT_S = 30.0


async def connection_refused(port: int) -> bool:
    """Whether a new TCP connection to the gateway's port is refused."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 2)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # accepted just as the listening socket closed
        return False
    writer.close()
    # The connection was accepted, which is the answer; the server may reset it
    # while it shuts down, which is not an error of this check.
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return False


async def callback_in_flight(
    client: AsyncHTTPClient, gateway: GatewayProcess, sandbox
) -> asyncio.Future:
    """A callback whose code exchange is waiting on the (slow) sandbox right now."""
    callback_url = await consented(client, gateway.url)
    callback = asyncio.ensure_future(follow(client, callback_url))

    async def token_calls() -> int:
        return sandbox.stats["token"]

    await poll_until(token_calls, lambda n: n == 1, timeout=10, what="code exchange started")
    assert not callback.done()
    return callback


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_lets_a_callback_in_flight_complete(tmp_path, sandbox, client, signum):
    sandbox.add_fault("token", status=200, delay=2.0)  # slow, then a normal answer
    settings = sandbox_settings(sandbox.url)
    with GatewayProcess(tmp_path / "gateway.log", **settings) as gateway:
        await gateway.wait_healthy(client)
        callback = await callback_in_flight(client, gateway, sandbox)

        gateway.send_signal(signum)
        await poll_until(
            lambda: connection_refused(gateway.port), bool, timeout=10,
            what="new connections refused after the signal",
        )
        assert not callback.done(), "the callback ended before TikTok answered"

        response = await callback
        assert location(response) == CONNECTED
        assert sandbox.stats["userinfo"] == 1
        assert await gateway.wait_exit(EXIT_TIMEOUT_S) == 0
        log = gateway.log_tail(20000)
        assert "1 request(s) in flight" in log, log
        assert "cutting" not in log, log
        assert "shutdown complete" in log, log
        assert "Traceback" not in log, log


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_cuts_requests_still_in_flight_at_the_deadline(tmp_path, sandbox, client):
    sandbox.add_fault("token", status=200, delay=5.0)
    settings = {
        **sandbox_settings(sandbox.url),
        "SHUTDOWN_TIMEOUT_SECONDS": "1",
        # Had the gateway waited for TikTok, the callback would have completed (302).
        "TIKTOK_REQUEST_TIMEOUT_SECONDS": "10",
        "TIKTOK_CALLBACK_BUDGET_SECONDS": "15",
    }
    with GatewayProcess(tmp_path / "gateway.log", **settings) as gateway:
        await gateway.wait_healthy(client)
        callback = await callback_in_flight(client, gateway, sandbox)

        gateway.send_signal(signal.SIGTERM)
        assert await gateway.wait_exit(EXIT_TIMEOUT_S) == 0
        with pytest.raises(HTTPClientError) as cut:  # closed without an answer
            await callback
        assert cut.value.code == 599, cut.value
        assert sandbox.stats["userinfo"] == 0
        log = gateway.log_tail(20000)
        assert "shutdown timeout of 1s reached: cutting 1 request(s) still in flight" in log, log
        assert "shutdown complete" in log, log


def test_shutdown_timeout_configuration():
    assert make_config().shutdown_timeout_seconds == 20.0
    assert make_config(SHUTDOWN_TIMEOUT_SECONDS="2.5").shutdown_timeout_seconds == 2.5
    assert make_config(SHUTDOWN_TIMEOUT_SECONDS="0").shutdown_timeout_seconds == 0.0
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="SHUTDOWN_TIMEOUT_SECONDS"):
            make_config(SHUTDOWN_TIMEOUT_SECONDS=bad)

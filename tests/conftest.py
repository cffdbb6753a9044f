from collections.abc import Iterator

import pytest
from tornado.httpclient import AsyncHTTPClient

from services.tiktok import TikTokClient
from tests.flow import live_sandbox, tiktok_for

pytest_plugins = ["tests.fixtures_mongo"]


@pytest.fixture
def sandbox(io_loop):
    """A live TikTok sandbox on a free loopback port, in the test's event loop."""
    with live_sandbox(io_loop) as sandbox:
        yield sandbox


@pytest.fixture
def client(io_loop) -> Iterator[AsyncHTTPClient]:
    """An HTTP client of its own, for gateway processes: bounded, really concurrent
    (up to 50 requests at once), and patient enough for a slow sandbox."""
    client = AsyncHTTPClient(
        force_instance=True,
        max_clients=50,
        defaults={"connect_timeout": 5, "request_timeout": 20},
    )
    yield client
    client.close()


@pytest.fixture
def tiktok(sandbox) -> TikTokClient:
    """The gateway's TikTok client on the test's sandbox, without a gateway."""
    return tiktok_for(sandbox.url)

from collections.abc import Iterator

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.flow import live_sandbox

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

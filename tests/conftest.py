import pytest

from tests.flow import make_sandbox

pytest_plugins = ["tests.fixtures_mongo"]


@pytest.fixture
def sandbox(io_loop):
    """A live TikTok sandbox on a free loopback port, in the test's event loop."""
    sandbox = make_sandbox()
    sandbox.url = f"http://127.0.0.1:{sandbox.listen()}"
    yield sandbox
    io_loop.run_sync(sandbox.close)

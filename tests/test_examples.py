"""`examples/host_app.py` over HTTP: the host's own login, a connection started from its
page, TikTok's consent page (the sandbox), the mounted callback, and the account on the
host's page."""

from __future__ import annotations

import json
import re
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode, urljoin

import pytest
from tornado.httpclient import HTTPResponse

from examples.host_app import (
    PREFIX,
    SANDBOX_CLIENT_KEY,
    callback_url,
    make_host_app,
    sandbox_environment,
)
from sandbox import Sandbox, SandboxClient
from services.config import load_config
from storage.memory import MemoryStore
from tests.flow import live_sandbox
from tests.support import CLIENT_SECRET, assert_envelope

PASSWORD = "host-example-password-for-tests"


class Browser:
    """Just enough of a browser: a cookie jar, forms with their XSRF field, no redirects."""

    def __init__(self, http_client: Any) -> None:
        self.http = http_client
        self.cookies: dict[str, str] = {}

    async def request(self, url: str, form: dict[str, str] | None = None) -> HTTPResponse:
        headers = {"Accept": "text/html"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = await self.http.fetch(
            url,
            method="POST" if form is not None else "GET",
            body=urlencode(form) if form is not None else None,
            headers=headers,
            follow_redirects=False,
            raise_error=False,
        )
        for header in response.headers.get_list("Set-Cookie"):
            for name, morsel in SimpleCookie(header).items():
                if morsel.value:
                    self.cookies[name] = morsel.value
                else:
                    self.cookies.pop(name, None)
        return response

    async def submit(self, page_url: str, action: str, **fields: str) -> HTTPResponse:
        """Load ``page_url`` and post its form to ``action`` with the page's XSRF token."""
        page = (await self.request(page_url)).body.decode()
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page)
        assert xsrf, page
        return await self.request(urljoin(page_url, action), {"_xsrf": xsrf.group(1), **fields})


def location(response: HTTPResponse) -> str:
    assert response.code in (302, 303), (response.code, response.body[:500])
    return response.headers["Location"]


@pytest.fixture
def sandbox(io_loop, http_port):
    public_url = f"http://localhost:{http_port}"
    sandbox = Sandbox(
        [SandboxClient(client_key=SANDBOX_CLIENT_KEY, client_secret=CLIENT_SECRET,
                       redirect_uris=[callback_url(public_url)], app_name="Acme Notes")],
        consent="page",
    )
    with live_sandbox(io_loop, sandbox):
        yield sandbox


@pytest.fixture
def host_store():
    return MemoryStore()


@pytest.fixture
def app(sandbox, host_store, http_port):
    public_url = f"http://localhost:{http_port}"
    config = load_config(sandbox_environment(public_url, sandbox.url, CLIENT_SECRET))
    return make_host_app(
        config,
        public_url=public_url,
        password=PASSWORD,
        cookie_secret="host-cookie-secret-for-tests-only",
        store=host_store,
    )


@pytest.mark.gen_test
async def test_sign_in_connect_tiktok_and_see_it_on_the_host_page(http_client, base_url):
    browser = Browser(http_client)

    # The host's own pages need its own login; the mounted gateway API does too.
    assert location(await browser.request(base_url + "/")).startswith("/login")
    anonymous = await browser.request(base_url + PREFIX + "/accounts")
    assert_envelope(anonymous, 401, "UNAUTHORIZED")
    refused = await browser.submit(base_url + "/login", "/login", username="alice",
                                   password="wrong")
    assert refused.code == 401
    signed_in = await browser.submit(base_url + "/login", "/login", username="alice",
                                     password=PASSWORD)
    assert location(signed_in) == "/"
    home = (await browser.request(base_url + "/")).body.decode()
    assert "Signed in as Alice Example" in home and "None yet." in home

    # A form without the host's XSRF token is refused.
    assert (await browser.request(base_url + "/connect/tiktok", {})).code == 403

    # Connect: the host starts the flow and sends the browser to TikTok's consent page.
    authorize_url = location(await browser.submit(base_url + "/", "/connect/tiktok"))
    consent_page = (await browser.request(authorize_url)).body.decode()
    assert "Acme Notes would like to access your TikTok account" in consent_page
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                             consent_page))
    action = re.search(r'<form method="post" action="([^"]+)"', consent_page).group(1)
    approved = await browser.request(
        urljoin(authorize_url, action), {**hidden, "sandbox_decision": "approve"}
    )

    # TikTok sends the browser to the mounted callback, which sends it back to the host.
    callback = location(approved)
    assert callback.startswith(f"{base_url}{PREFIX}/oauth/tiktok/callback?")
    back = location(await browser.request(callback))
    assert back == f"{base_url}/?platform=tiktok&status=connected"
    home = (await browser.request(back)).body.decode()
    assert 'id="connected"' in home
    assert "<strong>Sandbox Creator</strong> (connected" in home

    # The mounted accounts API knows the user from the host's session, not a bearer JWT.
    accounts = json.loads((await browser.request(base_url + PREFIX + "/accounts")).body)
    [account] = accounts["accounts"]
    assert account["displayName"] == "Sandbox Creator" and account["status"] == "connected"
    assert "accessToken" not in account

    # Another host user sees none of it.
    signed_out = await browser.submit(base_url + "/", "/logout")
    assert location(signed_out) == "/login"
    await browser.submit(base_url + "/login", "/login", username="bob", password=PASSWORD)
    home = (await browser.request(base_url + "/")).body.decode()
    assert "Signed in as Bob Example" in home and "Sandbox Creator" not in home

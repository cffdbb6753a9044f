"""The gateway mounted inside a host Tornado application, with the host's own login."""

from __future__ import annotations

import ast
import json
import re

import pytest
import tornado.web

import server
from server import build_gateway, routes
from storage.memory import MemoryStore
from tests.flow import consent, follow, location, sandbox_settings
from tests.support import PRODUCT_REDIRECT, ROOT, assert_envelope, make_config, source_files

# What the README tells a host to take from server.py.
DOCUMENTED = {"build_gateway", "routes", "make_app", "start_refresher", "start_profile_filler",
              "start_event_workers"}


class HostHomeHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"host": "home"})


async def resolve_from_host_session(handler: tornado.web.RequestHandler) -> str:
    # The host's own notion of a signed-in user instead of the bearer JWT.
    user = handler.get_signed_cookie("host_user")
    if not user:
        from core.errors import Unauthenticated

        raise Unauthenticated(technical_message="host session cookie missing")
    return user.decode()


@pytest.fixture
def host_store():
    return MemoryStore()


@pytest.fixture
def app(sandbox, host_store):
    gateway = build_gateway(
        make_config(**sandbox_settings(sandbox.url)),
        store=host_store,
        resolve_user=resolve_from_host_session,
    )
    return tornado.web.Application(
        [tornado.web.url("/", HostHomeHandler), *routes(gateway)],
        cookie_secret="host-cookie-secret-for-tests-only",
    )


@pytest.mark.gen_test
async def test_whole_flow_inside_a_host_application(http_client, base_url, app, host_store):
    home = await http_client.fetch(base_url + "/")
    assert json.loads(home.body) == {"host": "home"}

    anonymous = await http_client.fetch(
        base_url + "/oauth/tiktok/authorize",
        method="POST",
        body=json.dumps({"redirectUri": PRODUCT_REDIRECT}),
        raise_error=False,
    )
    assert_envelope(anonymous, 401, "UNAUTHORIZED")

    cookie = tornado.web.create_signed_value(
        app.settings["cookie_secret"], "host_user", "host-member-7"
    ).decode()
    started = json.loads(
        (
            await http_client.fetch(
                base_url + "/oauth/tiktok/authorize",
                method="POST",
                body=json.dumps({"redirectUri": PRODUCT_REDIRECT}),
                headers={"Cookie": f"host_user={cookie}"},
            )
        ).body
    )
    callback_url = await consent(http_client, base_url, started["authorizationUrl"])
    response = await follow(http_client, callback_url)
    assert location(response).endswith("&platform=tiktok&status=connected")
    [account] = await host_store.list_accounts("host-member-7")
    assert account.display_name == "Sandbox Creator"


def names_imported_from_server() -> set[str]:
    """Every name some module of ours, or a code sample in the docs, imports from it."""
    names: set[str] = set()
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "server" and not node.level:
                names.update(alias.name for alias in node.names)
    for doc in (ROOT / "README.md", ROOT / "examples" / "README.md"):
        for imported in re.findall(r"^from server import (.+)$", doc.read_text(), re.M):
            names.update(name.strip() for name in imported.split(","))
    return names


def test_server_py_still_hands_out_every_name_imported_from_it():
    """The wiring and the process moved to app/; what hosts, scripts, benchmarks, tests
    and the docs import from server.py stays there."""
    imported = names_imported_from_server()
    assert {"Gateway", "build_gateway", "routes", "make_app", "create_store",
            "start_refresher", "serve", "initialize_store", "configure_logging"} <= imported
    assert imported | DOCUMENTED <= set(server.__all__)
    for name in server.__all__:
        assert callable(getattr(server, name)), name

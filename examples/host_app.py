"""A host Tornado application with its own users and login that mounts the gateway.

The host ("Acme Notes") has a ``/login`` form and a signed-cookie session. It mounts
the gateway's routes under ``/tiktok`` (``server.build_gateway`` + ``server.routes``)
and tells the gateway who the user is with ``resolve_user``, which reads the host's
session instead of a bearer JWT. Its own page lists the user's TikTok accounts and
starts a connection with the gateway's ``ConnectionService``; TikTok sends the browser
back through the mounted callback to that page.

Run it from the repository root (see ``examples/README.md``)::

    .venv/bin/python -m examples.host_app --sandbox
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import logging
import os
import secrets
import sys
from collections.abc import Mapping
from typing import Any

import tornado.escape
import tornado.web
from tornado.httpserver import HTTPServer

from core.errors import ConfigError, GatewayError, Unauthenticated
from handlers.base import log_request
from server import Gateway, build_gateway, routes, start_refresher, stop_on_signals
from services.config import Config, load_config
from storage.base import Store

log = logging.getLogger("host")

PREFIX = "/tiktok"
SESSION_COOKIE = "host_session"
SESSION_DAYS = 1
# The host's own users: id -> display name. A real host has a user table.
USERS = {"alice": "Alice Example", "bob": "Bob Example"}
SANDBOX_CLIENT_KEY = "host-example-client-key"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Acme Notes</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem;
       color: #1d1d1f; }}
header {{ display: flex; justify-content: space-between; align-items: center; }}
.card {{ border: 1px solid #ddd; border-radius: 10px; padding: 1rem 1.25rem; margin: 1rem 0; }}
.ok {{ background: #e8f6ee; border-color: #bfe5cf; }} .error {{ background: #fdecea; }}
button {{ font: inherit; padding: .4rem .8rem; border-radius: 6px; border: 1px solid #bbb;
         background: #fff; cursor: pointer; }}
label {{ display: block; margin: .5rem 0; }}
</style></head><body>{body}</body></html>
"""


def session_user(handler: tornado.web.RequestHandler) -> str | None:
    """The signed-in host user, from the signed session cookie."""
    value = handler.get_signed_cookie(SESSION_COOKIE, max_age_days=SESSION_DAYS)
    user = value.decode() if value else None
    return user if user in USERS else None


async def resolve_user(handler: tornado.web.RequestHandler) -> str:
    """How the mounted gateway knows the user: the host's session, not a bearer JWT."""
    user = session_user(handler)
    if user is None:
        raise Unauthenticated(technical_message="no host session cookie")
    return user


class HostHandler(tornado.web.RequestHandler):
    """The host's own pages. XSRF is checked here, not app-wide: ``xsrf_cookies=True``
    would also apply to the mounted gateway routes and refuse TikTok's webhook POSTs."""

    @property
    def gateway(self) -> Gateway:
        return self.settings["gateway"]

    def get_current_user(self) -> str | None:
        return session_user(self)

    def prepare(self) -> None:
        if self.request.method == "POST":
            self.check_xsrf_cookie()

    def page(self, body: str, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Cache-Control", "no-store")
        self.finish(_PAGE.format(body=body))


class LoginHandler(HostHandler):
    def get(self) -> None:
        self.login_form()

    def post(self) -> None:
        user = self.get_body_argument("username", "")
        password = self.get_body_argument("password", "")
        expected = self.settings["host_password"]
        if user not in USERS or not hmac.compare_digest(password.encode(), expected.encode()):
            self.login_form("Unknown user or wrong password.", status=401)
            return
        self.set_signed_cookie(
            SESSION_COOKIE, user, expires_days=SESSION_DAYS, httponly=True, samesite="Lax"
        )
        self.redirect("/", status=303)

    def login_form(self, error: str = "", status: int = 200) -> None:
        message = f'<p class="card error">{tornado.escape.xhtml_escape(error)}</p>' if error else ""
        self.page(
            "<h1>Acme Notes: sign in</h1>"
            f"{message}"
            '<form method="post" action="/login">'
            f"{self.xsrf_form_html()}"
            '<label>User <input name="username" value="alice"></label>'
            '<label>Password <input name="password" type="password"></label>'
            "<button>Sign in</button></form>",
            status,
        )


class LogoutHandler(HostHandler):
    def post(self) -> None:
        self.clear_cookie(SESSION_COOKIE)
        self.redirect("/login", status=303)


class HomeHandler(HostHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        user = self.current_user
        accounts = await self.gateway.accounts.list_accounts(user)
        esc = tornado.escape.xhtml_escape
        banner = ""
        if self.get_query_argument("status", "") == "connected":
            banner = '<p class="card ok" id="connected">TikTok account connected.</p>'
        rows = "".join(
            f'<li class="account"><strong>{esc(a.display_name or "TikTok user")}</strong>'
            f" ({esc(a.status.value)}, scopes: {esc(', '.join(a.scopes))})</li>"
            for a in accounts
        )
        self.page(
            f"<header><h1>Acme Notes</h1><span>Signed in as {esc(USERS[user])}"
            f'<form method="post" action="/logout" style="display:inline">'
            f"{self.xsrf_form_html()} <button>Sign out</button></form></span></header>"
            f"{banner}"
            '<section class="card"><h2>Your TikTok accounts</h2>'
            f"<ul>{rows or '<li>None yet.</li>'}</ul>"
            f'<form method="post" action="/connect/tiktok">{self.xsrf_form_html()}'
            '<button id="connect">Connect TikTok</button></form></section>'
        )


class ConnectHandler(HostHandler):
    @tornado.web.authenticated
    async def post(self) -> None:
        # The host is the product backend: it starts the flow for its signed-in user and
        # sends the browser to TikTok. TikTok comes back through the mounted callback.
        try:
            started = await self.gateway.service.start(
                self.current_user, self.settings["public_url"] + "/", None
            )
        except GatewayError as exc:
            esc = tornado.escape.xhtml_escape
            self.page(f'<p class="card error">{esc(exc.message)}</p><a href="/">Back</a>', 400)
            return
        self.redirect(started.authorization_url, status=303)


def make_host_app(
    config: Config,
    *,
    public_url: str,
    password: str,
    cookie_secret: str,
    store: Store | None = None,
) -> tornado.web.Application:
    """The host application; ``public_url`` is where browsers reach it (no trailing /)."""
    gateway = build_gateway(config, store=store, resolve_user=resolve_user)
    host_routes: list[Any] = [
        tornado.web.url("/", HomeHandler),
        tornado.web.url("/login", LoginHandler),
        tornado.web.url("/logout", LogoutHandler),
        tornado.web.url("/connect/tiktok", ConnectHandler),
    ]
    return tornado.web.Application(
        [*host_routes, *routes(gateway, prefix=PREFIX)],
        cookie_secret=cookie_secret,
        login_url="/login",
        # The gateway's access log: Tornado's own would write the callback's code and state.
        log_function=log_request,
        gateway=gateway,
        public_url=public_url.rstrip("/"),
        host_password=password,
    )


def callback_url(public_url: str) -> str:
    """The mounted callback: what to register with TikTok as the redirect URI."""
    return f"{public_url}{PREFIX}/oauth/tiktok/callback"


def sandbox_environment(public_url: str, sandbox_url: str, client_secret: str) -> dict[str, str]:
    """Per-run fake settings for a gateway that talks to the local sandbox."""
    return {
        "TIKTOK_CLIENT_KEY": SANDBOX_CLIENT_KEY,
        "TIKTOK_CLIENT_SECRET": client_secret,
        "TIKTOK_REDIRECT_URI": callback_url(public_url),
        "TIKTOK_AUTHORIZE_URL": f"{sandbox_url}/v2/auth/authorize/",
        "TIKTOK_API_BASE_URL": sandbox_url,
        "TIKTOK_SCOPES": "user.info.basic,user.info.profile",
        "STATE_SECRET": secrets.token_urlsafe(48),
        "AUTH_JWT_SECRET": secrets.token_urlsafe(48),
        "ALLOWED_REDIRECT_ORIGINS": public_url,
        "TOKEN_ENCRYPTION_KEYS": "host:" + base64.b64encode(os.urandom(32)).decode(),
    }


async def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    public_url = f"http://{args.host}:{args.port}"
    sandbox = None
    env = dict(environ)
    if args.sandbox:
        from sandbox import Sandbox, SandboxClient

        client_secret = "host-example-secret-" + secrets.token_hex(12)
        sandbox = Sandbox(
            [
                SandboxClient(
                    client_key=SANDBOX_CLIENT_KEY,
                    client_secret=client_secret,
                    redirect_uris=[callback_url(public_url)],
                    app_name="Acme Notes",
                )
            ],
            consent="page",
        )
        sandbox_url = f"http://127.0.0.1:{sandbox.listen(args.sandbox_port)}"
        env |= sandbox_environment(public_url, sandbox_url, client_secret)
        print(f"TikTok sandbox (in-process) on {sandbox_url}", flush=True)
    try:
        config = load_config(env)
    except ConfigError as exc:
        print(f"host_app: {exc}", file=sys.stderr)
        return 2
    password = env.get("HOST_APP_PASSWORD") or secrets.token_urlsafe(9)
    app = make_host_app(
        config,
        public_url=public_url,
        password=password,
        cookie_secret=env.get("HOST_COOKIE_SECRET") or secrets.token_urlsafe(32),
    )
    gateway: Gateway = app.settings["gateway"]
    await gateway.store.initialize()
    refresher = start_refresher(gateway)  # renews tokens close to expiry
    server = HTTPServer(app)
    server.listen(args.port, address=args.host)
    print(
        f"Acme Notes on {public_url}/ : sign in as alice or bob, password {password}",
        flush=True,
    )
    await stop_on_signals().wait()
    server.stop()
    if refresher is not None:
        await refresher.stop()
    await gateway.store.close()
    if sandbox is not None:
        await sandbox.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.host_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="run the TikTok sandbox in this process, with per-run fake credentials",
    )
    parser.add_argument("--sandbox-port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return asyncio.run(run(args, os.environ))


if __name__ == "__main__":
    sys.exit(main())

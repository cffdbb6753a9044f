"""Entry point and app factory of the TikTok account-connection gateway.

Run it: ``python server.py`` (configuration from the environment, see README).
Embed it: ``build_gateway(config)`` then ``routes(gateway)`` into your own
``tornado.web.Application``, or ``make_app(config)`` for a ready application.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer

from handlers.accounts import AccessTokenHandler, AccountHandler, AccountListHandler
from handlers.base import NotFoundHandler, log_request
from handlers.health import HealthHandler, ReadinessHandler
from handlers.oauth import AuthorizeHandler, CallbackHandler
from handlers.webhooks import TikTokWebhookHandler
from services.accounts import AccountService
from services.config import Config, load_config
from services.connect import ConnectionService
from services.errors import ConfigError, GatewayError
from services.product_auth import (
    HostResolver,
    Principal,
    PrincipalResolver,
    ProductTokenVerifier,
    UserResolver,
    as_owner_resolver,
    as_principal_resolver,
)
from services.refresher import Refresher
from services.state import StateCodec
from services.tiktok import TikTokClient
from services.webhooks import WebhookService
from storage.base import Store
from storage.memory import MemoryStore

log = logging.getLogger("gateway")

STORE_RETRY_SECONDS = 5.0
MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 32 * 1024


@dataclass
class Gateway:
    """Everything the handlers need, built once at start-up."""

    config: Config
    store: Store
    service: ConnectionService
    resolve_user: UserResolver
    http_client: AsyncHTTPClient | None
    tiktok: TikTokClient
    accounts: AccountService
    # The owner and the bearer's scopes (the accounts API needs both).
    resolve_principal: PrincipalResolver


def create_store(config: Config) -> Store:
    """The store named by the configuration; does no I/O."""
    if not config.mongodb_uri:
        log.warning(
            "MONGODB_URI is not set: using the in-memory store. Nothing persists across "
            "restarts, and it serves one process only."
        )
        return MemoryStore(config.cipher())
    from storage.mongodb import MongoStore, connect_mongo

    client, database = connect_mongo(
        config.mongodb_uri,
        config.mongodb_database,
        driver=config.mongodb_driver,
        server_selection_timeout_ms=config.mongodb_timeout_ms,
        connect_timeout_ms=config.mongodb_timeout_ms,
        socket_timeout_ms=config.mongodb_operation_timeout_ms,
    )
    return MongoStore(database, config.cipher(), client=client)


def bearer_principal_resolver(config: Config) -> PrincipalResolver:
    """Default way to know the product's user: its HS256 bearer JWT, claims ``sub``
    and ``scope``."""
    verifier = ProductTokenVerifier(
        config.auth_jwt_secret, config.auth_jwt_issuer, config.auth_jwt_audience
    )

    async def resolve(handler: tornado.web.RequestHandler) -> Principal:
        return verifier.principal(handler.request.headers.get("Authorization"))

    return resolve


def bearer_user_resolver(config: Config) -> UserResolver:
    """The bearer JWT's ``sub`` only."""
    return as_owner_resolver(bearer_principal_resolver(config))


def build_gateway(
    config: Config,
    *,
    store: Store | None = None,
    http_client: AsyncHTTPClient | None = None,
    resolve_user: HostResolver | None = None,
) -> Gateway:
    """Wire the dependencies; a host application may supply its own store or resolver.

    ``resolve_user`` may answer a user id (a principal without scopes: it can
    connect and list accounts, not read their tokens) or a ``Principal``.
    """
    store = store or create_store(config)
    tiktok = TikTokClient(
        http_client,
        client_key=config.tiktok_client_key,
        client_secret=config.tiktok_client_secret,
        redirect_uri=config.tiktok_redirect_uri,
        api_base_url=config.tiktok_api_base_url,
        authorize_url=config.tiktok_authorize_url,
        connect_timeout=config.tiktok_connect_timeout,
        request_timeout=config.tiktok_request_timeout,
    )
    service = ConnectionService(
        store=store,
        tiktok=tiktok,
        states=StateCodec(
            config.state_secrets,
            audience=config.tiktok_redirect_uri,
            ttl_seconds=config.state_ttl_seconds,
        ),
        origins=config.allowed_redirect_origins,
        default_scopes=config.tiktok_scopes,
        pkce_mode=config.tiktok_pkce,
        callback_budget_seconds=config.tiktok_callback_budget,
    )
    resolve_principal = (
        as_principal_resolver(resolve_user) if resolve_user else bearer_principal_resolver(config)
    )
    return Gateway(
        config=config,
        store=store,
        service=service,
        resolve_user=as_owner_resolver(resolve_principal),
        http_client=http_client,
        tiktok=tiktok,
        accounts=AccountService(
            store=store, tiktok=tiktok, refresh_skew_seconds=config.refresh_skew_seconds
        ),
        resolve_principal=resolve_principal,
    )


def routes(gateway: Gateway, prefix: str = "") -> list[tornado.web.URLSpec]:
    """The gateway's routes, for mounting inside another Tornado application."""
    flow = {"service": gateway.service, "resolve_user": gateway.resolve_user}
    accounts = {"accounts": gateway.accounts, "resolve_principal": gateway.resolve_principal}
    return [
        tornado.web.url(f"{prefix}/oauth/tiktok/authorize", AuthorizeHandler, flow),
        tornado.web.url(f"{prefix}/oauth/tiktok/callback", CallbackHandler, flow),
        tornado.web.url(f"{prefix}/healthz", HealthHandler),
        tornado.web.url(f"{prefix}/readyz", ReadinessHandler, {"store": gateway.store}),
        tornado.web.url(f"{prefix}/accounts", AccountListHandler, accounts),
        tornado.web.url(f"{prefix}/accounts/([^/]+)", AccountHandler, accounts),
        tornado.web.url(f"{prefix}/accounts/([^/]+)/access-token", AccessTokenHandler, accounts),
        tornado.web.url(
            f"{prefix}/webhooks/tiktok",
            TikTokWebhookHandler,
            {"webhooks": webhook_service(gateway)},
        ),
    ]


def webhook_service(gateway: Gateway) -> WebhookService:
    config = gateway.config
    return WebhookService(
        store=gateway.store,
        client_key=config.tiktok_client_key,
        client_secret=config.tiktok_client_secret,
        tolerance_seconds=config.webhook_tolerance_seconds,
    )


def start_refresher(gateway: Gateway) -> Refresher | None:
    """Start refreshing tokens close to expiry in the background; None when disabled."""
    config = gateway.config
    if config.refresh_interval_seconds <= 0:
        log.info("background token refresh disabled (REFRESH_INTERVAL_SECONDS=0)")
        return None
    # Its own AccountService (same refresh path, same leases): refresh_account answers
    # not_due for tokens outside its skew, which here is the refresher's window.
    accounts = AccountService(
        store=gateway.store,
        tiktok=gateway.tiktok,
        refresh_skew_seconds=config.refresh_ahead_seconds,
    )
    refresher = Refresher(
        store=gateway.store,
        accounts=accounts,
        interval_seconds=config.refresh_interval_seconds,
        ahead_seconds=config.refresh_ahead_seconds,
        max_per_minute=config.refresh_max_per_minute,
    )
    refresher.start()
    return refresher


def make_app(config: Config, **kwargs: Any) -> tornado.web.Application:
    """A standalone application: the gateway's routes and a JSON 404 for the rest."""
    gateway = build_gateway(config, **kwargs)
    app = tornado.web.Application(
        routes(gateway),
        default_handler_class=NotFoundHandler,
        log_function=log_request,
        xsrf_cookies=False,
    )
    app.settings["gateway"] = gateway
    return app


async def initialize_store(store: Store, retry_seconds: float = STORE_RETRY_SECONDS) -> None:
    """Create indexes, retrying in the background while the store is down."""
    while True:
        try:
            await store.initialize()
            log.info("store ready")
            return
        except GatewayError as exc:
            log.warning(
                "store not reachable yet (%s); retrying in %.0fs",
                exc.technical_message or exc.message,
                retry_seconds,
            )
            await asyncio.sleep(retry_seconds)


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


async def serve(config: Config) -> None:
    app = make_app(config)
    gateway: Gateway = app.settings["gateway"]
    # Hard ceilings for the socket; handlers enforce their own, smaller limits
    # with the error envelope.
    server = HTTPServer(
        app, xheaders=False, max_body_size=MAX_BODY_BYTES, max_header_size=MAX_HEADER_BYTES
    )
    server.listen(config.port, address=config.host)
    log.info("TikTok gateway listening on http://%s:%d", config.host, config.port)
    init_task = asyncio.create_task(initialize_store(gateway.store))
    refresher = start_refresher(gateway)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    server.stop()
    init_task.cancel()
    if refresher is not None:
        await refresher.stop()
    await server.close_all_connections()
    await gateway.store.close()


def main(environ: Mapping[str, str] | None = None) -> int:
    configure_logging()
    try:
        config = load_config(os.environ if environ is None else environ)
    except ConfigError as exc:
        print(f"tiktok-gateway: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

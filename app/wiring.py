"""The app factory and its factories: the gateway's dependencies, its routes and its
background workers, built from a ``Config``. Nothing here runs a process
(``app.lifecycle``) or parses a command line (``server.py``).

Embed it: ``build_gateway(config)`` then ``routes(gateway)`` into your own
``tornado.web.Application``, or ``make_app(config)`` for a ready application.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import tornado.web
from prometheus_client import CollectorRegistry
from tornado.httpclient import AsyncHTTPClient

from handlers.accounts import AccessTokenHandler, AccountHandler, AccountListHandler
from handlers.base import InFlight, NotFoundHandler, log_request
from handlers.events import EventListHandler, EventRedeliverHandler
from handlers.health import HealthHandler, ReadinessHandler
from handlers.meta import MetricsHandler, OpenAPIHandler, openapi_document
from handlers.oauth import AuthorizeHandler, CallbackHandler
from handlers.webhooks import TikTokWebhookHandler
from services.accounts import AccountService, refresh_lease_seconds
from services.budget import TikTokBudget
from services.config import Config
from services.connect import ConnectionService
from services.event_delivery import EventWorkers, event_workers_for
from services.events import AccountEvents, EventFeed
from services.metrics import GatewayMetrics, InstrumentedStore
from services.product_auth import (
    HostResolver,
    Principal,
    PrincipalResolver,
    ProductTokenVerifier,
    UserResolver,
    as_owner_resolver,
    as_principal_resolver,
)
from services.profile_filler import ProfileFiller
from services.refresher import Refresher
from services.state import StateCodec
from services.tiktok import TikTokClient, tiktok_client_for
from services.webhooks import WebhookService
from storage.base import Store
from storage.memory import MemoryStore

log = logging.getLogger("gateway")


@dataclass
class Gateway:
    """Everything the handlers need, built once at start-up."""

    config: Config
    store: Store
    service: ConnectionService
    # Holds TikTok's budgets (shared through the store) and the pooled HTTP client.
    tiktok: TikTokClient
    # The process's one AccountService: the accounts API and the refresher share it.
    accounts: AccountService
    # Who is asking: the owner and the bearer's scopes (the accounts API needs both).
    resolve_principal: PrincipalResolver
    # This gateway's Prometheus metrics, in a registry of its own (GET /metrics).
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    # Account events: what the services record them with, and the relay they wake.
    events: AccountEvents = field(default_factory=AccountEvents)

    @property
    def resolve_user(self) -> UserResolver:
        """The owner only: all the connection flow asks."""
        return as_owner_resolver(self.resolve_principal)


def create_store(config: Config, *, require_indexes: bool = False) -> Store:
    """The store named by the configuration; does no I/O.

    ``require_indexes``: a MongoDB store refuses data operations until its
    ``initialize`` has created the indexes (the gateway's own store does).
    """
    if not config.mongodb_uri:
        log.warning(
            "MONGODB_URI is not set: using the in-memory store. Nothing persists across "
            "restarts, and it serves one process only."
        )
        return MemoryStore(config.cipher(), events_retention_seconds=events_retention(config))
    from storage.mongodb import MongoStore, connect_mongo

    client, database = connect_mongo(
        config.mongodb_uri,
        config.mongodb_database,
        driver=config.mongodb_driver,
        server_selection_timeout_ms=config.mongodb_timeout_ms,
        connect_timeout_ms=config.mongodb_timeout_ms,
        socket_timeout_ms=config.mongodb_operation_timeout_ms,
    )
    return MongoStore(
        database,
        config.cipher(),
        client=client,
        require_indexes=require_indexes,
        events_retention_seconds=events_retention(config),
    )


def events_retention(config: Config) -> int:
    return config.events_retention_days * 86400


def bearer_principal_resolver(config: Config) -> PrincipalResolver:
    """Default way to know the product's user: its HS256 bearer JWT, claims ``sub``
    and ``scope``."""
    verifier = ProductTokenVerifier(
        config.auth_jwt_secrets, config.auth_jwt_issuer, config.auth_jwt_audience
    )
    checked = {"AUTH_JWT_ISSUER": config.auth_jwt_issuer,
               "AUTH_JWT_AUDIENCE": config.auth_jwt_audience}
    unset = " and ".join(name for name, value in checked.items() if not value)
    if unset:
        # Recommended, not required: a product with one key per purpose is safe without.
        log.warning(
            "%s not set: any token signed with AUTH_JWT_SECRET and a sub is accepted as a "
            "bearer, even one your product minted for another service; set %s to what "
            "your product puts in its gateway tokens (iss, aud)",
            unset,
            unset,
        )

    async def resolve(handler: tornado.web.RequestHandler) -> Principal:
        return verifier.principal(handler.request.headers.get("Authorization"))

    return resolve


def build_gateway(
    config: Config,
    *,
    store: Store | None = None,
    http_client: AsyncHTTPClient | None = None,
    resolve_user: HostResolver | None = None,
    registry: CollectorRegistry | None = None,
) -> Gateway:
    """Wire the dependencies; a host application may supply its own store or resolver.

    ``resolve_user`` may answer a user id (a principal without scopes: it can
    connect and list accounts, not read their tokens) or a ``Principal``.
    ``registry`` receives the gateway's metrics (default: a registry of its own,
    never prometheus_client's global one).
    """
    metrics = GatewayMetrics(registry)
    # Every store operation is timed; the wrapped store stays reachable as .inner.
    store = InstrumentedStore(  # type: ignore[abstract]  # its methods are generated
        store or create_store(config, require_indexes=True), metrics
    )
    # Every call to TikTok takes a permit from its endpoint's budget in the store.
    budget = TikTokBudget.from_config(config, store, metrics=metrics)
    # One pooled client per process (TIKTOK_HTTP_CLIENT), made in the running loop.
    tiktok = tiktok_client_for(config, http_client, metrics=metrics, budget=budget)
    events = AccountEvents(expiry_notice_days=config.events_expiry_notice_days)
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
        metrics=metrics,
        events=events,
    )
    return Gateway(
        config=config,
        store=store,
        service=service,
        tiktok=tiktok,
        accounts=AccountService(
            store=store,
            tiktok=tiktok,
            refresh_skew_seconds=config.refresh_skew_seconds,
            lease_seconds=refresh_lease_seconds(config),
            metrics=metrics,
            events=events,
        ),
        resolve_principal=(
            as_principal_resolver(resolve_user) if resolve_user
            else bearer_principal_resolver(config)
        ),
        metrics=metrics,
        events=events,
    )


def routes(gateway: Gateway, prefix: str = "") -> list[tornado.web.URLSpec]:
    """The gateway's routes, for mounting inside another Tornado application."""
    flow = {"service": gateway.service, "resolve_user": gateway.resolve_user}
    accounts = {"accounts": gateway.accounts, "resolve_principal": gateway.resolve_principal}
    return [
        # DEMO_MODE only: /demo, and the callback with HTML error pages for browsers.
        # The demo is demo/ and this line (imported here only when on): delete both to
        # remove it.
        *(__import__("demo").routes(gateway, prefix) if gateway.config.demo_mode else []),
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
        # Account events (issue 15): pulled by the product's backend.
        tornado.web.url(f"{prefix}/events", EventListHandler, events_api(gateway)),
        tornado.web.url(
            f"{prefix}/events/([^/]+)/redeliver", EventRedeliverHandler, events_api(gateway)
        ),
        tornado.web.url(f"{prefix}/metrics", MetricsHandler, {"metrics": gateway.metrics}),
        tornado.web.url(f"{prefix}/openapi.json", OpenAPIHandler, {"document": openapi_document()}),
    ]


def webhook_service(gateway: Gateway) -> WebhookService:
    config = gateway.config
    return WebhookService(
        store=gateway.store,
        client_key=config.tiktok_client_key,
        client_secret=config.tiktok_client_secret,
        tolerance_seconds=config.webhook_tolerance_seconds,
        events=gateway.events,
    )


def events_api(gateway: Gateway) -> dict[str, Any]:
    feed = EventFeed(store=gateway.store, push_enabled=gateway.config.events_push_enabled)
    return {"feed": feed, "resolve_principal": gateway.resolve_principal}


# -- the background workers: each starts when called, and stops with its stop() --------


def start_event_workers(
    gateway: Gateway, after: asyncio.Future[Any] | None = None
) -> EventWorkers:
    """Relay account events, and push them when PRODUCT_WEBHOOK_URL is set; every
    process runs them (the store shares the work out). Stop them with ``stop()``.

    ``after``: start once it answers True (``initialize_store``: the indexes exist,
    the event log's unique seq among them)."""
    workers = event_workers_for(gateway.config, gateway.store, gateway.metrics)
    # The services wake this relay after each change that recorded an event.
    gateway.events.attach(workers.relay)
    if after is None:
        workers.start()
        return workers

    def ready(done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is None and done.result() is True:
            workers.start()

    after.add_done_callback(ready)
    return workers


def start_refresher(gateway: Gateway) -> Refresher | None:
    """Start refreshing tokens close to expiry in the background; None when disabled."""
    config = gateway.config
    if config.refresh_interval_seconds <= 0:
        log.info("background token refresh disabled (REFRESH_INTERVAL_SECONDS=0)")
        return None
    refresher = Refresher(
        store=gateway.store,
        # The gateway's one AccountService (its leases, its grants not stored yet),
        # asked to refresh what expires within the refresher's own window.
        accounts=gateway.accounts,
        interval_seconds=config.refresh_interval_seconds,
        ahead_seconds=config.refresh_ahead_seconds,
        keep_warm_seconds=config.refresh_keep_warm_seconds,
        max_per_minute=config.refresh_max_per_minute,
    )
    refresher.start()
    return refresher


def start_profile_filler(gateway: Gateway, after: asyncio.Future[Any]) -> ProfileFiller:
    """Start loading, once ``after`` (the store's start-up) is done, the profiles that
    callbacks left pending."""
    filler = ProfileFiller(store=gateway.store, tiktok=gateway.tiktok, metrics=gateway.metrics)
    filler.start(after)
    return filler


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
    app.settings["in_flight"] = InFlight()  # counted by the handlers, read by shut_down
    return app

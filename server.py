"""Entry point and app factory of the TikTok account-connection gateway.

Run it: ``python server.py`` (configuration from the environment, see README).
Embed it: ``build_gateway(config)`` then ``routes(gateway)`` into your own
``tornado.web.Application``, or ``make_app(config)`` for a ready application.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tornado.netutil
import tornado.process
import tornado.web
from prometheus_client import CollectorRegistry
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer

from core.errors import ConfigError, GatewayError, StoreSetupFailed
from handlers.accounts import AccessTokenHandler, AccountHandler, AccountListHandler
from handlers.base import InFlight, NotFoundHandler, log_request
from handlers.events import EventListHandler, EventRedeliverHandler
from handlers.health import HealthHandler, ReadinessHandler
from handlers.meta import MetricsHandler, OpenAPIHandler, openapi_document
from handlers.oauth import AuthorizeHandler, CallbackHandler
from handlers.webhooks import TikTokWebhookHandler
from services.accounts import AccountService, refresh_lease_seconds
from services.budget import TikTokBudget
from services.config import Config, load_config, logging_settings
from services.connect import ConnectionService
from services.event_delivery import EventWorkers, event_workers_for
from services.events import AccountEvents, EventFeed
from services.logging_setup import setup_logging
from services.metrics import (
    GatewayMetrics,
    InstrumentedStore,
    enable_multiprocess,
    leave_multiprocess,
    prepare_multiprocess_dir,
)
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

STORE_RETRY_SECONDS = 5.0
MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 32 * 1024
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_POLL_SECONDS = 0.05


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
    # This gateway's Prometheus metrics, in a registry of its own (GET /metrics).
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    # TikTok's rate limits, shared through the store by every process.
    budget: TikTokBudget | None = None
    # Account events: what the services record them with, and the relay they wake.
    events: AccountEvents = field(default_factory=AccountEvents)


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


def bearer_user_resolver(config: Config) -> UserResolver:
    """The bearer JWT's ``sub`` only."""
    return as_owner_resolver(bearer_principal_resolver(config))


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
            store=store,
            tiktok=tiktok,
            refresh_skew_seconds=config.refresh_skew_seconds,
            lease_seconds=refresh_lease_seconds(config),
            metrics=metrics,
            events=events,
        ),
        resolve_principal=resolve_principal,
        metrics=metrics,
        budget=budget,
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
    # Its own AccountService (same refresh path, same leases, same unsaved grants):
    # refresh_account answers not_due for tokens outside its skew, which here is the
    # refresher's window.
    accounts = gateway.accounts.with_skew(config.refresh_ahead_seconds)
    refresher = Refresher(
        store=gateway.store,
        accounts=accounts,
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


async def initialize_store(store: Store, retry_seconds: float = STORE_RETRY_SECONDS) -> bool:
    """Create indexes, retrying in the background while the store is down.

    Returns True once they exist; False when one can never be created (a
    conflicting index, duplicate documents): each is logged as an ERROR, and
    ``/readyz`` answers 503 naming it until the database is fixed and the
    gateway restarted.
    """
    while True:
        try:
            await store.initialize()
            log.info("store ready")
            return True
        except StoreSetupFailed as exc:
            for problem in exc.problems:
                log.error("%s", problem)
            log.error(
                "the store is not ready and will not be: /readyz answers 503 and "
                "requests that need the store are refused until the database is "
                "fixed and the gateway restarted"
            )
            return False
        except GatewayError as exc:
            log.warning(
                "store not reachable yet (%s); retrying in %.0fs",
                exc.technical_message or exc.message,
                retry_seconds,
            )
            await asyncio.sleep(retry_seconds)


def configure_logging(environ: Mapping[str, str] | None = None) -> None:
    # LOG_FORMAT=json: one JSON object per line. An invalid LOG_LEVEL or LOG_FORMAT
    # logs at INFO, as text, here, and load_config then stops the start-up naming it.
    level, log_format = logging_settings(os.environ if environ is None else environ)
    setup_logging(level=level, log_format=log_format)


async def serve(
    config: Config,
    sockets: list[socket.socket] | None = None,
    lifeline: int | None = None,
    *,
    http_client: AsyncHTTPClient | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (``shut_down``).

    ``http_client``: what calls TikTok, if not the pooled client of the
    configuration (``bench.no_upstream`` answers them in process).

    A worker of ``run_workers`` gets the pre-bound ``sockets`` and the read end of
    the parent's ``lifeline`` pipe: its end of file means stop too. Only worker 0
    runs the background refresher, so ``REFRESH_MAX_PER_MINUTE`` holds for the
    whole gateway (a crashed worker 0 is replaced as worker 0).
    """
    app = make_app(config, http_client=http_client)
    gateway: Gateway = app.settings["gateway"]
    # Hard ceilings for the socket; handlers enforce their own, smaller limits
    # with the error envelope.
    server = HTTPServer(
        app, xheaders=False, max_body_size=MAX_BODY_BYTES, max_header_size=MAX_HEADER_BYTES
    )
    if sockets is None:
        server.listen(config.port, address=config.host)
        log.info("TikTok gateway listening on http://%s:%d", config.host, config.port)
    else:
        server.add_sockets(sockets)
        log.info("worker %s (pid %d) serving", tornado.process.task_id(), os.getpid())
    init_task = asyncio.create_task(initialize_store(gateway.store))
    refresher = start_refresher(gateway) if tornado.process.task_id() in (None, 0) else None
    events = start_event_workers(gateway, after=init_task)
    # Pending profiles: worker 0 too; other instances' fillers claim other accounts.
    filler = (start_profile_filler(gateway, init_task)
              if tornado.process.task_id() in (None, 0) else None)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    # A worker starts with them blocked (run_workers); one sent meanwhile arrives now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if lifeline is not None:
        loop.add_reader(lifeline, stop.set)
    await stop.wait()
    if lifeline is not None:
        loop.remove_reader(lifeline)
    server.stop()
    init_task.cancel()
    if filler is not None:
        await filler.stop()  # its claims expire on their own
    await shut_down(server, app, refresher, config.shutdown_timeout_seconds, events=events)


async def shut_down(
    server: HTTPServer,
    app: tornado.web.Application,
    refresher: Refresher | None,
    timeout: float,
    *,
    events: EventWorkers | None = None,
) -> None:
    """After ``server.stop()``: give requests in flight ``timeout`` seconds, then cut
    the connections left; the refresher stops within the same deadline; then new
    tokens not stored yet (refreshes under way, writes that failed) get up to
    ``timeout`` seconds more to be stored; then the store is closed."""
    in_flight: InFlight = app.settings["in_flight"]
    log.info(
        "shutting down: new connections refused, %d request(s) in flight, waiting up to %gs",
        in_flight.count,
        timeout,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def drain() -> None:
        while in_flight.count > 0 and loop.time() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL_SECONDS)

    await asyncio.gather(
        drain(),
        refresher.stop(grace_seconds=timeout) if refresher else asyncio.sleep(0),
        # Account events: a delivery in flight finishes within the same deadline.
        events.stop(grace_seconds=timeout) if events else asyncio.sleep(0),
    )
    if in_flight.count > 0:
        log.warning(
            "shutdown timeout of %gs reached: cutting %d request(s) still in flight",
            timeout,
            in_flight.count,
        )
    await server.close_all_connections()
    # A cut request's refresh runs on: what TikTok answers it is stored before the
    # store closes, like the grants whose first write failed.
    await app.settings["gateway"].accounts.close(timeout)
    await app.settings["gateway"].store.close()
    if in_flight.count == 0:
        # Its pooled connections to TikTok; not under requests just cut (closing curl
        # under them logs a traceback): the exit drops it then.
        app.settings["gateway"].tiktok.close()
    log.info("shutdown complete")


def run_workers(config: Config) -> int:
    """Fork ``config.workers`` processes serving one port; this process supervises.

    The socket is bound before the fork and before any event loop exists; Tornado's
    ``fork_processes`` restarts a worker that crashes. SIGTERM or SIGINT here closes
    this process's end of a pipe each worker watches (its lifeline) and its copy of
    the socket: every worker then shuts down gracefully and exits 0, and so does
    this process once they are all gone. A worker whose parent dies sees the pipe
    close too, and stops. The workers keep their metrics in one directory, so a
    scrape of any worker's ``/metrics`` reports them all.
    """
    try:
        metrics_dir, temporary_metrics_dir = prepare_multiprocess_dir(
            config.prometheus_multiproc_dir
        )
    except OSError as exc:
        print(f"tiktok-gateway: no directory for the workers' metrics "
              f"(PROMETHEUS_MULTIPROC_DIR): {exc}", file=sys.stderr)
        return 2
    sockets = tornado.netutil.bind_sockets(config.port, address=config.host)
    lifeline, lifeline_end = os.pipe()
    stopping = False

    def stop_workers(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("%s: stopping the workers", signal.Signals(signum).name)
        os.close(lifeline_end)
        for sock in sockets:
            sock.close()

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_workers)
    # Workers are born with the stop signals blocked, until serve() handles them.
    os.register_at_fork(
        before=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS),
        after_in_parent=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS),
    )
    port = sockets[0].getsockname()[1]
    log.info(
        "TikTok gateway listening on http://%s:%d with %d workers (supervisor pid %d)",
        config.host,
        port,
        config.workers,
        os.getpid(),
    )
    log.info("the workers' metrics are kept in %s", metrics_dir)
    try:
        tornado.process.fork_processes(config.workers)
    except RuntimeError as exc:  # too many restarts
        log.error("giving up: %s", exc)
        return 1
    except SystemExit:
        log.info("all workers stopped")
        return 0
    finally:
        # Only the supervisor gets here before the workers' code below.
        if temporary_metrics_dir and tornado.process.task_id() is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    # A worker from here on.
    if stopping:
        return 0  # forked to replace a crashed worker after shutdown began
    os.close(lifeline_end)
    enable_multiprocess(metrics_dir)
    try:
        asyncio.run(serve(config, sockets, lifeline))
    finally:
        leave_multiprocess()
    return 0


def main(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    configure_logging(environ)
    try:
        config = load_config(environ)
    except ConfigError as exc:
        print(f"tiktok-gateway: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        return run_workers(config)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

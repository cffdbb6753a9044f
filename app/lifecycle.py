"""One gateway process from start to stop: the store's start-up, serving until a stop
signal or the supervisor's lifeline says stop, and the graceful shutdown.

The application comes from ``app.wiring``; ``app.workers`` runs ``serve`` in each
forked worker; ``server.py`` chooses between the two.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Mapping

import tornado.process
import tornado.web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer

from app.wiring import (
    Gateway,
    make_app,
    start_event_workers,
    start_profile_filler,
    start_refresher,
)
from core.errors import GatewayError, StoreSetupFailed
from handlers.base import InFlight
from services.config import Config, logging_settings
from services.event_delivery import EventWorkers
from services.logging_setup import setup_logging
from services.refresher import Refresher
from storage.base import Store

log = logging.getLogger("gateway")

STORE_RETRY_SECONDS = 5.0
MAX_BODY_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 32 * 1024
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_POLL_SECONDS = 0.05


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets: what a process serving until told to stop
    waits for (the gateway, an embedding host, a benchmark's stand-in)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    return stop


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

    stop = stop_on_signals()
    loop = asyncio.get_running_loop()
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

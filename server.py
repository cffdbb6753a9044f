"""Entry point of the TikTok account-connection gateway, and the names to embed it.

Run it: ``python server.py`` (configuration from the environment, see README).
Embed it: ``build_gateway(config)`` then ``routes(gateway)`` into your own
``tornado.web.Application``, or ``make_app(config)`` for a ready application.

The work is done in ``app/``: ``app.wiring`` builds the application,
``app.lifecycle`` runs one process, ``app.workers`` supervises several. This module
reads the command line's environment, picks one of the two, and re-exports what
embedding hosts, scripts and tests import from it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping

from app.lifecycle import (
    configure_logging,
    initialize_store,
    serve,
    shut_down,
    stop_on_signals,
)
from app.wiring import (
    Gateway,
    build_gateway,
    create_store,
    make_app,
    routes,
    start_event_workers,
    start_profile_filler,
    start_refresher,
)
from app.workers import run_workers
from core.errors import ConfigError
from services.config import load_config

# Embedding (README): wire the gateway, mount its routes, start its background work.
# Running: what main does, for scripts and benchmarks that run the gateway their way.
__all__ = [
    "Gateway",
    "build_gateway",
    "configure_logging",
    "create_store",
    "initialize_store",
    "main",
    "make_app",
    "routes",
    "run_workers",
    "serve",
    "shut_down",
    "start_event_workers",
    "start_profile_filler",
    "start_refresher",
    "stop_on_signals",
]


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

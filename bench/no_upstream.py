"""The gateway without its outbound HTTP: ``python -m bench.no_upstream``.

Runs ``server.serve`` exactly as ``python server.py`` does (configured from the
environment: its handlers, services, memory store, access log and metrics), except
that its calls to TikTok never leave the process: ``bench.own_work``'s
``InstantTikTok`` answers them at once from memory. Under load its CPU per callback
is a callback's cost minus the two calls to TikTok: Tornado's HTTP server plus
everything the gateway itself does. When that alone is above what the ratio target
allows (the baseline's CPU per request / 0.40), no HTTP client, however cheap, can
bring a callback within the target.
"""

from __future__ import annotations

import asyncio
import os
import sys

from bench.own_work import InstantTikTok
from server import configure_logging, serve
from services.config import load_config


async def run() -> None:
    config = load_config(os.environ)
    # Made in the running loop, like the gateway's own client.
    await serve(config, http_client=InstantTikTok(force_instance=True))


def main() -> int:
    configure_logging()
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The floor: what a callback's HTTP alone costs, without the gateway's own work.

``python -m bench.floor --port P --upstream http://127.0.0.1:S`` serves
``GET /oauth/tiktok/callback`` the way the gateway's callback is shaped on the
wire, and nothing else: it POSTs a form to the sandbox's token endpoint and GETs
its user-info endpoint over the same pooled curl client the gateway uses (the
sandbox refuses both, cheaply: no state, no JWT, no PKCE, no store, no
encryption, no logging, no metrics), then answers the same 302. Its CPU per
request, measured by ``python -m bench --floor``, is the cost of Tornado's HTTP
server, Tornado's curl client and the event loop for one callback on this
machine: a lower bound for the gateway's, whatever its own code does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from urllib.parse import urlencode

import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from app.lifecycle import stop_on_signals
from services.http_client import close_http_client

REDIRECT = "http://localhost:3000/settings/connections?platform=tiktok&status=connected"


class FloorCallback(tornado.web.RequestHandler):
    def initialize(self, http: AsyncHTTPClient, upstream: str) -> None:
        self.http = http
        self.upstream = upstream

    async def get(self) -> None:
        form = urlencode({"client_key": "floor", "code": self.get_argument("code", "x"),
                          "grant_type": "authorization_code"})
        await self.http.fetch(HTTPRequest(
            f"{self.upstream}/v2/oauth/token/", method="POST", body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ), raise_error=False)
        await self.http.fetch(HTTPRequest(
            f"{self.upstream}/v2/user/info/?fields=open_id",
            headers={"Authorization": "Bearer act.floor"},
        ), raise_error=False)
        self.redirect(REDIRECT)


class Health(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


async def serve(args: argparse.Namespace) -> None:
    from tornado.curl_httpclient import CurlAsyncHTTPClient

    http = CurlAsyncHTTPClient(force_instance=True, max_clients=args.max_connections)
    app = tornado.web.Application([
        ("/oauth/tiktok/callback", FloorCallback, {"http": http, "upstream": args.upstream}),
        ("/healthz", Health),
        ("/readyz", Health),
    ], log_function=lambda handler: None)
    server = app.listen(args.port, address="127.0.0.1")
    await stop_on_signals().wait()
    server.stop()
    close_http_client(http)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the sandbox: http://127.0.0.1:PORT")
    parser.add_argument("--max-connections", type=int, default=500)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

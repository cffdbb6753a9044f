"""A product's webhook receiver for account events: a real Tornado server on a free
loopback port that checks every delivery with the ``standardwebhooks`` package, as
README tells a product to do.

``script`` says how it answers the next requests, one entry each: ``"500"``, ``"slow"``
(waits ``slow_seconds``, then accepts), ``"redirect"`` (a 302 to ``/elsewhere``, which
would accept); once empty, it accepts (204). A delivery whose signature does not verify
gets a 400 and lands in ``refused``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import tornado.netutil
import tornado.web
from standardwebhooks import Webhook, WebhookVerificationError
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer

from tests.support import LOOPBACK, free_port

# Never to be stored or logged by the gateway.
ANSWER_MARKER = "receiver-answer-body-must-not-leak"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """``async with Receiver(...) as receiver:`` listens for the block; ``start()`` and
    ``stop()`` for a test that brings it up later."""

    def __init__(
        self, secret: str, port: int | None = None, *, script: Iterable[str] = (),
        slow_seconds: float = 1.0,
    ) -> None:
        self.webhook = Webhook(secret)
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/hooks/tiktok?token=in-the-query"
        self.script: list[str] = list(script)
        self.slow_seconds = slow_seconds
        # Every request, verified or not, in arrival order.
        self.requests: list[Delivery] = []
        # Verified and accepted events, in the order they were accepted.
        self.accepted: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.elsewhere_hits = 0
        self._server: HTTPServer | None = None

    @property
    def accepted_ids(self) -> list[str]:
        return [event["id"] for event in self.accepted]

    def accepted_counts(self) -> Counter[str]:
        return Counter(self.accepted_ids)

    def for_account(self, account_id: str) -> list[str]:
        return [e["id"] for e in self.accepted if e["data"]["account"]["id"] == account_id]

    def start(self) -> None:
        receiver = self

        class Hook(tornado.web.RequestHandler):
            async def post(self) -> None:
                headers = dict(self.request.headers.get_all())
                receiver.requests.append(Delivery(headers, self.request.body))
                try:
                    event = receiver.webhook.verify(self.request.body, headers)
                except WebhookVerificationError as exc:
                    receiver.refused.append(str(exc))
                    self.set_status(400)
                    self.finish({"error": str(exc)})
                    return
                action = receiver.script.pop(0) if receiver.script else "ok"
                if action == "500":
                    self.set_status(500)
                    self.finish(ANSWER_MARKER)
                    return
                if action == "redirect":
                    self.redirect("/elsewhere", status=302)
                    return
                if action == "slow":
                    await asyncio.sleep(receiver.slow_seconds)
                receiver.accepted.append(event)
                self.set_status(204)
                self.finish()

        class Elsewhere(tornado.web.RequestHandler):
            def post(self) -> None:
                receiver.elsewhere_hits += 1
                self.set_status(204)

        app = tornado.web.Application([("/hooks/tiktok", Hook), ("/elsewhere", Elsewhere)])
        sockets = bind(self.port)
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)

    async def __aenter__(self) -> Receiver:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        """Send a request of our own making to the receiver (forged, replayed...)."""
        client = AsyncHTTPClient(force_instance=True)
        try:
            response = await client.fetch(
                self.url, method="POST", body=body, headers=headers, raise_error=False
            )
            return int(response.code)
        finally:
            client.close()


def bind(port: int) -> list[socket.socket]:
    return tornado.netutil.bind_sockets(port, address=LOOPBACK)


def event_of(delivery: Delivery) -> dict[str, Any]:
    return dict(json.loads(delivery.body))

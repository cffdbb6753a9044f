"""The gateway with its account-event workers, in this process: its app on a free port,
the relay and the push started as ``serve()`` starts them (shorter polls), and the
helpers the event tests share to record an event and wait for its delivery."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.web import Application

from scripts.cassette_scenarios import serving as listening
from server import Gateway, make_app
from services.event_delivery import EventWorkers, event_workers_for
from services.event_types import CONNECTED
from services.events import new_event
from storage.base import Account, EventStatus, Store
from tests.processes import poll_until
from tests.receiver import Receiver
from tests.support import bearer, fake_grant, make_config

# Fresh and fake every run.
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
EVENTS_BEARER = bearer("product-backend", scope="tiktok.events")
NOW = datetime.now(UTC)
WAIT = 15.0


@dataclass
class Running:
    gateway: Gateway
    workers: EventWorkers
    url: str
    client: AsyncHTTPClient

    @property
    def store(self) -> Store:
        return self.gateway.store

    async def get(self, path: str, headers: dict[str, str] | None = None) -> HTTPResponse:
        return await self.client.fetch(
            self.url + path, headers=EVENTS_BEARER if headers is None else headers,
            raise_error=False,
        )

    async def post(self, path: str) -> HTTPResponse:
        return await self.client.fetch(
            self.url + path, method="POST", body=b"", headers=EVENTS_BEARER, raise_error=False
        )

    def metric(self, name: str, **labels: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


R = TypeVar("R", bound=Running)


@contextlib.asynccontextmanager
async def running(
    store: Store,
    receiver: Receiver | None = None,
    *,
    schedule: str = "0.05,0.05,0.05,0.05,0.05",
    request_timeout: float = 2.0,
    secrets: str = SECRET,
    url: str | None = None,
) -> AsyncIterator[Running]:
    """The gateway's app on a free port, with its event workers started as serve() does
    (shorter polls); push to ``receiver`` (or ``url``) when one is given."""
    env: dict[str, str] = {}
    url = url or (receiver.url if receiver is not None else None)
    if url is not None:
        env = {
            "PRODUCT_WEBHOOK_URL": url,
            "PRODUCT_WEBHOOK_SECRET": secrets,
            "PRODUCT_WEBHOOK_RETRY_SCHEDULE": schedule,
        }
    config = make_config(**env)

    def start_workers(gateway: Gateway) -> EventWorkers:
        workers = event_workers_for(
            config, gateway.store, gateway.metrics,
            request_timeout=request_timeout, poll_seconds=0.05, relay_idle_seconds=0.05,
        )
        workers.start()
        return workers

    async with serving(make_app(config, store=store), start_workers, Running) as run:
        yield run


@contextlib.asynccontextmanager
async def serving(
    app: Application,
    start_workers: Callable[[Gateway], EventWorkers],
    running_type: type[R],
    client_defaults: dict[str, Any] | None = None,
) -> AsyncIterator[R]:
    """``app`` on a free port with the event workers ``start_workers`` starts, and a
    client of its own; all stopped on the way out."""
    gateway: Gateway = app.settings["gateway"]
    async with listening(app) as url:
        workers = start_workers(gateway)
        client = AsyncHTTPClient(force_instance=True, defaults=client_defaults)
        try:
            yield running_type(gateway, workers, url, client)
        finally:
            await workers.stop(grace_seconds=5)
            client.close()


async def connect(store: Store, open_id: str, owner: str = "user-1") -> Account:
    grant = fake_grant(open_id, now=NOW, tag=open_id, refresh_ttl=timedelta(days=180))
    return await store.save_account_tokens(owner, grant, now=NOW)


async def record(run: Running, account: Account, event_type: str = CONNECTED,
                 **extras: Any) -> dict[str, Any]:
    """Record an event as a state change will: appended to the outbox, then relay_soon()."""
    extras = extras or {"reconnected": False}
    event = new_event(event_type, account, **extras)
    assert await run.store.append_account_event(account.id, event)
    run.workers.relay_soon()
    return event


async def until_accepted(receiver: Receiver, ids: list[str], what: str = "delivered") -> None:
    async def accepted() -> set[str]:
        return set(receiver.accepted_ids)

    await poll_until(accepted, lambda got: set(ids) <= got, timeout=WAIT, interval=0.05,
                     what=what)


async def until_status(store: Store, event_id: str, status: EventStatus) -> Any:
    async def current() -> Any:
        return await store.get_event(event_id)

    return await poll_until(current, lambda s: s is not None and s.status is status,
                            timeout=WAIT, interval=0.05, what=f"{event_id} {status}")

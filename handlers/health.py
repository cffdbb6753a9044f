"""Liveness and readiness."""

from __future__ import annotations

from handlers.base import ErrorWriterMixin
from storage.base import Store


class HealthHandler(ErrorWriterMixin):
    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadinessHandler(ErrorWriterMixin):
    def initialize(self, store: Store) -> None:
        self.store = store

    async def get(self) -> None:
        # Not before the store is set up (its indexes exist), nor while it is down.
        await self.store.check_ready()
        self.write_json({"status": "ready"})

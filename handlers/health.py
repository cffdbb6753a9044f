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
        await self.store.ping()
        self.write_json({"status": "ready"})

"""What operators and API clients read about the gateway itself: its OpenAPI
document and its Prometheus metrics."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from handlers.base import ErrorWriterMixin
from services.metrics import CONTENT_TYPE, GatewayMetrics

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"


@functools.cache
def openapi_document() -> bytes:
    """``openapi.json`` as kept in the repository, read once per process.

    Parsed once here so a broken file stops the start-up rather than the first
    request; served byte for byte as stored.
    """
    document = OPENAPI_PATH.read_bytes()
    json.loads(document)
    return document


class OpenAPIHandler(ErrorWriterMixin):
    def initialize(self, document: bytes) -> None:
        self.document = document

    def get(self) -> None:
        self.finish(self.document)


class MetricsHandler(ErrorWriterMixin):
    def initialize(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.metrics.render())

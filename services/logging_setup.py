"""Log output: plain text lines (the default) or one JSON object per line.

``LOG_FORMAT=json`` renders each record as ``{"time", "level", "logger",
"message", ...}`` plus the fields the gateway's own log calls attach with
``extra=`` (``FIELDS``: request id, route, status, duration, outcome, TikTok's
``log_id``...). Only those named fields are copied, never arbitrary record
attributes, so the JSON output holds nothing the text output would not:
the same messages, which never carry a query string, a code, a state, a token
or a secret.

The request id of the request being handled is kept in a context variable (the
handlers set it), so records logged below the handlers (the TikTok client, the
connection service) carry it without passing it along.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any

from core.clock import iso_z

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Attached by the gateway's log calls through ``extra=``; copied when present.
FIELDS = (
    "request_id",
    "method",
    "route",
    "path",
    "status",
    "duration_ms",
    "outcome",
    "endpoint",
    "log_id",
)

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gateway_request_id", default=None
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_z(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if "request_id" not in entry:
            request_id = current_request_id.get()
            if request_id is not None:
                entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an unexpected extra value never breaks a log line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter_for(log_format: str) -> logging.Formatter:
    """``json`` or anything else: text (the configuration refuses other values)."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Root logging to stderr in the given format, unless already configured."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter_for(log_format.strip().lower()))
    logging.basicConfig(level=level.upper(), handlers=[handler])

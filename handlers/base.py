"""The base handler (request ids, headers, the access log, JSON) and the shared error
writer that renders every error as the envelope."""

from __future__ import annotations

import json
import logging
import re
import uuid
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import tornado.httputil
import tornado.web

from core.clock import iso_z, utcnow
from core.errors import GatewayError, ValidationFailed, error_for_status
from services.logging_setup import current_request_id

access_log = logging.getLogger("gateway.access")
error_log = logging.getLogger("gateway.errors")

# Only ids that are safe to echo into headers and logs are taken from the caller.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$")


def request_id_of(request: Any) -> str:
    """One id per request, stable across ``clear()`` and reused by the access log."""
    request_id = getattr(request, "_gateway_request_id", None)
    if request_id is None:
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())
        request._gateway_request_id = request_id
    return request_id


class InFlight:
    """How many requests an application is serving right now.

    Counted by ``BaseHandler`` when the application's settings hold one under
    ``"in_flight"`` (``make_app`` does); a graceful shutdown waits for it to reach 0.
    """

    def __init__(self) -> None:
        self.count = 0


class BaseHandler(tornado.web.RequestHandler):
    """Request ids, the headers every response carries, the in-flight count and JSON."""

    def __init__(
        self,
        application: tornado.web.Application,
        request: tornado.httputil.HTTPServerRequest,
        **kwargs: Any,
    ) -> None:
        super().__init__(application, request, **kwargs)
        # Every handler that gets this far is finished once (errors included), and
        # finish() calls on_finish.
        self._in_flight: InFlight | None = application.settings.get("in_flight")
        if self._in_flight is not None:
            self._in_flight.count += 1

    def on_finish(self) -> None:
        if self._in_flight is not None:
            self._in_flight.count -= 1

    def prepare(self) -> None:
        # Records logged below the handler (TikTok calls, the services) carry the id.
        current_request_id.set(request_id_of(self.request))

    def set_default_headers(self) -> None:
        # Runs again inside clear() before write_error, so error responses keep these.
        self.set_header("X-Request-ID", request_id_of(self.request))
        self.set_header("Cache-Control", "no-store")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Type", "application/json; charset=utf-8")

    def allowed_methods(self) -> list[str]:
        """The methods this handler implements (Tornado's defaults answer 405)."""
        return [
            method
            for method in self.SUPPORTED_METHODS
            if getattr(type(self), method.lower(), None)
            is not getattr(tornado.web.RequestHandler, method.lower(), None)
        ]

    def write_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(payload))

    def read_json_object(
        self, *, max_bytes: int, example: str, optional: bool = False
    ) -> dict[str, Any]:
        """The request body as a JSON object (an empty one is ``{}`` when ``optional``);
        anything else is refused with the envelope, ``example`` showing what is expected."""
        if len(self.request.body) > max_bytes:
            raise ValidationFailed(
                "The request is too large.",
                technical_message=f"body exceeds {max_bytes} bytes",
            )
        if optional and not self.request.body.strip():
            return {}
        try:
            body: Any = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ValidationFailed(
                "The request body must be JSON.",
                technical_message=f"expected a JSON object like {example}",
            ) from None
        if not isinstance(body, dict):
            raise ValidationFailed(
                "The request body must be a JSON object.",
                technical_message=f"expected a JSON object like {example}",
            )
        return body


class ErrorWriterMixin(BaseHandler):
    """Renders every error as the seed's JSON envelope; nothing else does.

    ``write_error`` maps the exception to a status and an envelope, ``render_error``
    sends it: the one hook to override for another rendering.
    """

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError) and exc.status != 500:
            self.set_status(exc.status)
            envelope = self._envelope(exc.code, exc.message, exc.technical_message, exc.details)
            if exc.retry_after is not None:
                self.set_header("Retry-After", str(exc.retry_after))
        elif isinstance(exc, tornado.web.HTTPError) and exc.status_code < 500:
            # Tornado's own refusal (an unknown path, a wrong method): the error that
            # stands for its status answers. Its log_message can quote request data (a
            # code, say): not echoed.
            error = error_for_status(exc.status_code)
            envelope = self._envelope(error.code, error.default_message, None, None)
            if exc.status_code == 405:
                # RFC 9110: a 405 names the methods the resource does accept.
                self.set_header("Allow", ", ".join(self.allowed_methods()))
        else:
            # A bug, or a GatewayError of our own making (tokens no configured key
            # opens): its detail is for the log, not for the caller.
            self.set_status(500 if status_code < 500 or status_code == 599 else status_code)
            code = error_for_status(self.get_status()).code
            envelope = self._envelope(code, GatewayError.default_message, None, None)
        self.render_error(self.get_status(), envelope)

    def render_error(self, status: int, envelope: dict[str, Any]) -> None:
        """Send the envelope: JSON here; a subclass may render it otherwise (the demo's
        HTML pages), keeping the status and headers ``write_error`` set."""
        self.finish(json.dumps(envelope))

    def _envelope(
        self,
        code: str,
        message: str,
        technical_message: str | None,
        details: dict[str, Any] | None,
    ) -> dict[str, Any]:
        envelope: dict[str, Any] = {"error": code, "message": message}
        self._outcome = code  # for the access log
        if technical_message and technical_message != message:
            envelope["technicalMessage"] = technical_message
        if details:
            envelope["details"] = details
        envelope["requestId"] = request_id_of(self.request)
        envelope["timestamp"] = iso_z(utcnow())
        return envelope

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(value, GatewayError):
            # Expected outcomes: one line, no traceback, no request URI (it holds the code).
            # A 500 is a fault of ours (e.g. stored tokens no key opens): ERROR.
            level = (
                logging.ERROR if value.status == 500
                else logging.WARNING if value.status > 500
                else logging.INFO
            )
            error_log.log(
                level,
                "%s %s -> %s %s: %s",
                self.request.method,
                self.request.path,
                value.status,
                value.code,
                value.technical_message or value.message,
                extra=log_fields(self, value.status, value.code),
            )
            return
        if isinstance(value, tornado.web.HTTPError):
            return
        error_log.error(
            "unhandled error in %s %s (request %s)",
            self.request.method,
            self.request.path,
            request_id_of(self.request),
            exc_info=(typ, value, tb),  # type: ignore[arg-type]
            extra=log_fields(self, GatewayError.status, GatewayError.code),
        )


class NotFoundHandler(ErrorWriterMixin):
    """Unknown paths get the envelope too, whatever the method."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


def route_of(handler: tornado.web.RequestHandler) -> str:
    """The route that answered, its path arguments shown as ``{id}`` (``/accounts/{id}``);
    ``unmatched`` for the catch-all 404."""
    if isinstance(handler, NotFoundHandler):
        return "unmatched"
    path = handler.request.path
    args = getattr(handler, "path_args", None)
    if not args:
        return path
    segments = path.split("/")
    start = 0
    for arg in args:
        for index in range(start, len(segments)):
            if unquote(segments[index]) == arg:
                segments[index] = "{id}"
                start = index + 1
                break
    return "/".join(segments)


def log_fields(
    handler: tornado.web.RequestHandler, status: int, outcome: str, **more: Any
) -> dict[str, Any]:
    """A request's fields in its log lines (LOG_FORMAT=json): never the query string,
    which holds the code and the state."""
    return {
        "request_id": request_id_of(handler.request),
        "method": handler.request.method,
        "route": route_of(handler),
        "status": status,
        "outcome": outcome,
        **more,
    }


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without the query string: it holds the code and the state."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    duration_ms = 1000.0 * handler.request.request_time()
    request_id = request_id_of(handler.request)
    access_log.log(
        level,
        "%s %s %d %.1fms request_id=%s",
        handler.request.method,
        handler.request.path,
        status,
        duration_ms,
        request_id,
        extra=log_fields(
            handler,
            status,
            # The envelope's error code, or ok.
            getattr(handler, "_outcome", None) or ("ok" if status < 400 else "error"),
            path=handler.request.path,
            duration_ms=round(duration_ms, 1),
        ),
    )

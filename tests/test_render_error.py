"""``ErrorWriterMixin.render_error``: the one hook for rendering the envelope otherwise.

``write_error`` decides the status, the headers and the envelope; an override of
``render_error`` (the demo's HTML pages) only changes how that envelope is sent.
"""

from __future__ import annotations

import json

import pytest
import tornado.web

from core.errors import ServiceUnavailable
from handlers.base import ErrorWriterMixin, log_request


class PlainText(ErrorWriterMixin):
    """Renders the envelope as text/plain, to see what the hook receives."""

    def render_error(self, status: int, envelope: dict[str, object]) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status} {envelope['error']} {envelope['requestId']}: {envelope['message']}")


class Busy(PlainText):
    def get(self) -> None:
        raise ServiceUnavailable("Busy, try again.", retry_after=7)


class Broken(PlainText):
    def get(self) -> None:
        raise RuntimeError("a bug, with a secret-looking detail act.0123456789abcdef")


class ReadOnly(PlainText):
    def get(self) -> None:
        self.write_json({"ok": True})


@pytest.fixture
def app():
    return tornado.web.Application(
        [("/busy", Busy), ("/broken", Broken), ("/read-only", ReadOnly)],
        log_function=log_request,
    )


@pytest.mark.gen_test
async def test_the_hook_gets_the_envelope_with_status_and_headers_already_set(
    http_client, base_url
):
    busy = await http_client.fetch(base_url + "/busy", raise_error=False)
    assert busy.code == 503
    assert busy.headers["Retry-After"] == "7"
    assert busy.headers["Content-Type"].startswith("text/plain")
    assert busy.headers["Cache-Control"] == "no-store"
    request_id = busy.headers["X-Request-ID"]
    assert busy.body.decode() == f"503 SERVICE_UNAVAILABLE {request_id}: Busy, try again."

    broken = await http_client.fetch(base_url + "/broken", raise_error=False)
    assert broken.code == 500
    assert broken.body.decode().startswith("500 INTERNAL_SERVER_ERROR ")
    assert "act.0123" not in broken.body.decode()

    wrong_method = await http_client.fetch(
        base_url + "/read-only", method="DELETE", raise_error=False
    )
    assert wrong_method.code == 405
    assert wrong_method.headers["Allow"] == "GET"
    assert wrong_method.body.decode().startswith("405 METHOD_NOT_ALLOWED ")

    # Success is not an error: the hook is not involved.
    ok = await http_client.fetch(base_url + "/read-only")
    assert json.loads(ok.body) == {"ok": True}

"""``LOG_FORMAT=json``: ``python server.py`` writes one JSON object per line, with the
request's id, route, status, duration and outcome, TikTok's ``log_id``, and no secret."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import pytest
from tornado.httpclient import AsyncHTTPClient

from services.config import ConfigError
from services.logging_setup import FIELDS, JsonFormatter, current_request_id, formatter_for
from tests.flow import consent, fetch_with_request_id, sandbox_settings
from tests.processes import ROOT, GatewayProcess
from tests.support import (
    CLIENT_SECRET,
    CONFIGURED_SECRETS,
    CONNECTED,
    PRODUCT_REDIRECT,
    environ,
    make_config,
    product_token,
    query_of,
)

BASE_FIELDS = {"time", "level", "logger", "message"}


class Session:
    """Calls to the gateway process, each with its own request id, remembering secrets."""

    def __init__(self, client: AsyncHTTPClient, gateway_url: str) -> None:
        self.client = client
        self.url = gateway_url
        self.requests: dict[str, tuple[str, str, int]] = {}  # id -> method, path, status
        self.secrets: set[str] = set(CONFIGURED_SECRETS.values())

    async def call(self, label: str, url: str, *, method: str = "GET", body: str | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        request_id = f"jsonlog-{label}-{len(self.requests):03d}"
        response = await fetch_with_request_id(self.client, url, request_id, method=method,
                                               body=body, headers=headers)
        self.requests[request_id] = (method, urlsplit(url).path, response.code)
        return response

    def bearer(self, **claims: Any) -> dict[str, str]:
        token = product_token(**claims)
        self.secrets.add(token)
        return {"Authorization": f"Bearer {token}"}

    async def connect(self, label: str, **knobs: str) -> Any:
        response = await self.call(
            label, f"{self.url}/oauth/tiktok/authorize", method="POST",
            body=json.dumps({"redirectUri": PRODUCT_REDIRECT}), headers=self.bearer())
        assert response.code == 200, response.body
        started = json.loads(response.body)
        self.secrets.add(started["state"])
        callback_url = await consent(self.client, self.url, started["authorizationUrl"], **knobs)
        self.secrets.update(query_of(callback_url).get("code", []))
        return await self.call(label, callback_url)


def parse_lines(text: str) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(entry, dict), line
        assert BASE_FIELDS <= entry.keys(), line
        assert entry["time"].endswith("Z") and entry["level"] in (
            "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        entries.append(entry)
    return entries


def forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}


@pytest.mark.gen_test(timeout=60)
async def test_server_writes_json_lines_with_request_fields_and_no_secret(
    tmp_path, sandbox, client
):
    settings = sandbox_settings(sandbox.url) | {"LOG_FORMAT": "json",
                                                "REFRESH_INTERVAL_SECONDS": "0"}
    with GatewayProcess(tmp_path / "gateway.log", **settings) as gateway:
        await gateway.wait_healthy(client)
        session = Session(client, gateway.url)

        connected = await session.connect("connect")
        assert connected.code == 302 and connected.headers["Location"] == CONNECTED
        listed = await session.call("list", f"{gateway.url}/accounts",
                                    headers=session.bearer())
        [account] = json.loads(listed.body)["accounts"]
        token = await session.call(
            "token", f"{gateway.url}/accounts/{account['id']}/access-token", method="POST",
            body="", headers=session.bearer(scope="tiktok.tokens"))
        assert token.code == 200
        session.secrets.add(json.loads(token.body)["accessToken"])
        denied = await session.connect("denied", sandbox_decision="deny")
        assert denied.code == 400
        malformed = await session.call(
            "malformed", f"{gateway.url}/oauth/tiktok/callback?code=abc")
        assert malformed.code == 400
        assert (await session.call("unknown", f"{gateway.url}/no/such/path")).code == 404
        assert gateway.stop() == 0
    text = (tmp_path / "gateway.log").read_text()
    entries = parse_lines(text)

    # One access line per request, with its fields.
    access = {e["request_id"]: e for e in entries if e["logger"] == "gateway.access"}
    assert set(session.requests) <= set(access)
    routes = {
        "connect": "/oauth/tiktok/callback",
        "list": "/accounts",
        "token": "/accounts/{id}/access-token",
        "denied": "/oauth/tiktok/callback",
        "malformed": "/oauth/tiktok/callback",
        "unknown": "unmatched",
    }
    for request_id, (method, path, status) in session.requests.items():
        entry = access[request_id]
        assert {"method", "route", "path", "status", "duration_ms", "outcome"} <= entry.keys()
        assert (entry["method"], entry["path"], entry["status"]) == (method, path, status)
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] >= 0
        assert "?" not in entry["path"] and "?" not in entry["message"]
        label = request_id.split("-")[1]
        if label in routes and status != 200:
            assert entry["route"] == routes[label], entry
    outcomes = {request_id.split("-")[1]: access[request_id]["outcome"]
                for request_id, (_, path, _) in session.requests.items()
                if path.endswith("/callback") or path.startswith("/no/")}
    assert outcomes == {"connect": "ok", "denied": "PERMISSION_DENIED",
                        "malformed": "VALIDATION_ERROR", "unknown": "NOT_FOUND"}
    assert [e["route"] for e in access.values() if e["method"] == "POST"
            and "access-token" in e["path"]] == ["/accounts/{id}/access-token"]

    # TikTok calls carry TikTok's log_id and the id of the request they were made for.
    calls = [e for e in entries if e["logger"] == "gateway.tiktok"]
    assert {e["endpoint"] for e in calls} == {"token", "user_info"}
    connect_id = next(r for r in session.requests if r.startswith("jsonlog-connect-")
                      and session.requests[r][1].endswith("/callback"))
    for entry in calls:
        assert entry["log_id"] and entry["outcome"] == "200", entry
        assert entry["duration_ms"] >= 0
        assert entry["request_id"] == connect_id
    # Errors name their request too.
    errors = [e for e in entries if e["logger"] == "gateway.errors"]
    assert {e["outcome"] for e in errors} >= {"PERMISSION_DENIED", "VALIDATION_ERROR"}
    assert all(e["request_id"] in session.requests for e in errors)

    # Nothing secret, in any form.
    leaks = [secret[:8] for secret in session.secrets for form in forms(secret) if form in text]
    assert not leaks, leaks


def test_invalid_log_format_stops_the_start_up():
    env = {"PATH": "/usr/bin:/bin", **environ(LOG_FORMAT="xml")}
    result = subprocess.run(
        [sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "LOG_FORMAT='xml' is invalid: expected one of text, json" in result.stderr
    assert CLIENT_SECRET not in result.stderr


def test_configuration():
    assert make_config().log_format == "text"
    assert make_config(LOG_FORMAT="JSON").log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        make_config(LOG_FORMAT="yaml")


def record(message: str, *args: Any, exc_info: Any = None, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("gateway.test", logging.WARNING, __file__, 1, message, args,
                             exc_info)
    for name, value in extra.items():
        setattr(made, name, value)
    return made


def test_formatter_copies_only_the_named_fields():
    formatter = JsonFormatter()
    line = formatter.format(record(
        "GET %s %d", "/healthz", 200, request_id="r-12345678", route="/healthz", status=200,
        duration_ms=1.5, outcome="ok", log_id=None, secret_attribute="do-not-copy",
    ))
    entry = json.loads(line)
    assert entry["message"] == "GET /healthz 200"
    assert entry["level"] == "WARNING" and entry["logger"] == "gateway.test"
    assert entry["request_id"] == "r-12345678" and entry["status"] == 200
    assert "log_id" not in entry  # None: not known
    assert "do-not-copy" not in line
    assert set(entry) <= BASE_FIELDS | set(FIELDS)
    assert "\n" not in line


def test_formatter_takes_the_request_id_from_the_context_and_keeps_tracebacks_on_one_line():
    formatter = JsonFormatter()
    token = current_request_id.set("ctx-request-0001")
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            line = formatter.format(record("failed", exc_info=sys.exc_info()))
    finally:
        current_request_id.reset(token)
    entry = json.loads(line)
    assert entry["request_id"] == "ctx-request-0001"
    assert "RuntimeError: boom" in entry["exception"] and "\n" not in line
    # Outside a request, no id.
    assert "request_id" not in json.loads(formatter.format(record("idle")))


def test_text_stays_the_default_format():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for("text"))
    handler.emit(record("plain %s", "line", request_id="r-12345678"))
    assert stream.getvalue().rstrip().endswith("WARNING gateway.test plain line")
    assert isinstance(formatter_for("json"), JsonFormatter)

"""The shared vocabulary below every layer: the domain errors (``core/errors.py``), the
clock and the one timestamp format (``core/clock.py``), and which way imports go."""

from __future__ import annotations

import ast
import json
import logging
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

import core.errors
import demo.handlers  # noqa: F401 - its classes count among the gateway's
import server  # noqa: F401 - imports every gateway module, so every error class exists
import services.connect
import services.errors
import services.redirects
import services.webhooks
import storage.crypto
from core.clock import iso_z, utcnow
from core.errors import (
    GatewayError,
    MethodNotAllowed,
    PathNotFound,
    ServiceUnavailable,
    ValidationFailed,
    error_for_status,
)
from handlers.meta import OPENAPI_PATH
from server import make_app
from services.logging_setup import JsonFormatter
from storage.base import TokenGrant
from tests.support import PRODUCT_REDIRECT, ROOT, assert_envelope, bearer, make_config

GATEWAY_PACKAGES = {"core", "services", "storage", "handlers", "app", "server", "demo"}
# Each lower layer and the packages it must not import.
BELOW = {
    "storage": {"services", "handlers", "app", "server", "demo"},
    "core": {"services", "storage", "handlers", "app", "server", "demo"},
}
# 2026-01-01T00:10:00.000Z
ISO_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, wherever the import statement sits."""
    package = path.parent.name
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add((node.module or "").split(".")[0])
            elif node.level == 1:
                names.add(package)
            else:
                names.add("<outside " + package + ">")
    return names


@pytest.mark.parametrize("package", sorted(BELOW))
def test_lower_layers_import_nothing_above_them(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"{package}/ has no modules"
    upward = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & (BELOW[package] | {
            "<outside " + package + ">"}))
        for path in modules
    }
    assert not {module: names for module, names in upward.items() if names}


def gateway_errors() -> list[type[GatewayError]]:
    found: list[type[GatewayError]] = []
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        error = pending.pop()
        found.append(error)
        pending.extend(error.__subclasses__())
    return [error for error in found if error.__module__.split(".")[0] in GATEWAY_PACKAGES]


def test_every_domain_error_lives_in_core_errors_with_its_status_and_code():
    errors = gateway_errors()
    assert {error.__module__ for error in errors} == {"core.errors"}
    for error in errors:
        assert 400 <= error.status < 600, error
        assert re.fullmatch(r"[A-Z]+(_[A-Z]+)*", error.code), error
        assert error.default_message.endswith("."), error
    assert set(core.errors.__all__) >= {error.__name__ for error in errors}


def test_the_codes_the_errors_carry_are_the_documented_ones():
    document = json.loads(OPENAPI_PATH.read_text())
    documented = document["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    assert {error.code for error in gateway_errors()} == set(documented)


def test_the_old_homes_hand_out_the_very_same_classes():
    """Code written before the move (services.errors, services.connect.utcnow...) works."""
    for name in services.errors.__all__:
        assert getattr(services.errors, name) is getattr(core.errors, name), name
    assert services.webhooks.SignatureInvalid is core.errors.SignatureInvalid
    assert services.webhooks.PayloadTooLarge is core.errors.PayloadTooLarge
    assert services.redirects.RedirectRejected is core.errors.RedirectRejected
    assert storage.crypto.TokenIntegrityError is core.errors.TokenIntegrityError
    assert services.connect.utcnow is utcnow


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ValidationFailed),
        (404, PathNotFound),
        (405, MethodNotAllowed),
        (418, ValidationFailed),
        (500, GatewayError),
        (502, GatewayError),
        (503, ServiceUnavailable),
    ],
)
def test_error_for_status(status, error):
    assert error_for_status(status) is error


@pytest.fixture
def app():
    return make_app(make_config())


@pytest.mark.gen_test
async def test_tornado_refusals_answer_with_the_error_for_their_status(http_client, base_url):
    nowhere = await http_client.fetch(f"{base_url}/nowhere", raise_error=False)
    body = assert_envelope(nowhere, 404, PathNotFound.code)
    assert body["message"] == PathNotFound.default_message
    wrong = await http_client.fetch(f"{base_url}/healthz", method="DELETE", raise_error=False)
    body = assert_envelope(wrong, 405, MethodNotAllowed.code)
    assert body["message"] == MethodNotAllowed.default_message


@pytest.mark.gen_test
async def test_times_the_api_writes_have_milliseconds_and_z(http_client, base_url, app):
    started = await http_client.fetch(
        f"{base_url}/oauth/tiktok/authorize",
        method="POST",
        body=json.dumps({"redirectUri": PRODUCT_REDIRECT}),
        headers=bearer(),
    )
    times = {"authorize expiresAt": json.loads(started.body)["expiresAt"]}
    refused = await http_client.fetch(f"{base_url}/nowhere", raise_error=False)
    times["envelope timestamp"] = json.loads(refused.body)["timestamp"]
    now = utcnow()
    account = await app.settings["gateway"].store.save_account_tokens(
        "user-123",
        TokenGrant(
            open_id="open-1",
            access_token="act.test-vocabulary",
            refresh_token="rft.test-vocabulary",
            access_token_expires_at=now + timedelta(days=1),
            refresh_token_expires_at=now + timedelta(days=180),
            scopes=["user.info.basic"],
        ),
        now=now,
    )
    listed = await http_client.fetch(f"{base_url}/accounts", headers=bearer())
    (shown,) = json.loads(listed.body)["accounts"]
    for name in ("accessTokenExpiresAt", "refreshTokenExpiresAt", "createdAt", "updatedAt"):
        times[f"account {name}"] = shown[name]
    token = await http_client.fetch(
        f"{base_url}/accounts/{account.id}/access-token",
        method="POST",
        body="",
        headers=bearer(scope="tiktok.tokens"),
    )
    times["access token expiresAt"] = json.loads(token.body)["expiresAt"]
    assert {name: value for name, value in times.items() if not ISO_Z.fullmatch(value)} == {}


def test_iso_z():
    assert iso_z(datetime(2026, 1, 1, 0, 10, tzinfo=UTC)) == "2026-01-01T00:10:00.000Z"
    plus_one = timezone(timedelta(hours=1))
    moment = datetime(2026, 1, 1, 1, 10, 0, 123999, tzinfo=plus_one)
    assert iso_z(moment) == "2026-01-01T00:10:00.123Z"
    # Stored times come back naive (UTC) from some drivers.
    assert iso_z(datetime(2026, 1, 1, 0, 10)) == "2026-01-01T00:10:00.000Z"
    assert iso_z(None) is None
    assert utcnow().tzinfo is UTC


def test_json_logs_write_times_in_the_same_format():
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "hello", None, None)
    record.created = datetime(2026, 1, 1, 0, 0, 0, 88000, tzinfo=UTC).timestamp()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["time"] == "2026-01-01T00:00:00.088Z"

"""Shared test helpers: per-run fake secrets, configuration, product tokens, states,
grants, ports, the tree's source files, a parsed ``/metrics``. Flows over HTTP are in
``tests.flow``, stores in ``tests.fixtures_mongo``, gateway processes in
``tests.processes``, the gateway with its event workers in ``tests.gateway_events``."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import tornado.web
from prometheus_client.parser import text_string_to_metric_families

from scripts.cassette_scenarios import CLIENT_KEY, REDIRECT_URI
from services.config import Config, load_config
from services.state import STATE_ISSUER, STATE_TYP
from storage.base import PendingAuthorization, Store, TokenGrant

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

# The gateway's client key and redirect URI are the ones the cassettes carry.
# Obviously fake and fresh every run: nothing here is a real credential.
CLIENT_SECRET = "test-client-secret-" + secrets.token_hex(8)
STATE_SECRET = "test-state-secret-" + secrets.token_hex(24)
AUTH_SECRET = "test-auth-secret-" + secrets.token_hex(24)
TOKEN_KEY = "test:" + base64.b64encode(os.urandom(32)).decode()
# The gateway's own secrets, by what they are (the token key without its key id): what
# no log, answer or record may ever show.
CONFIGURED_SECRETS = {
    "client secret": CLIENT_SECRET,
    "state secret": STATE_SECRET,
    "product auth secret": AUTH_SECRET,
    "token encryption key": TOKEN_KEY.split(":", 1)[1],
}
PRODUCT_ORIGIN = "https://app.example.com"
PRODUCT_REDIRECT = PRODUCT_ORIGIN + "/settings/connections?tab=social"
# Where the callback sends the browser once an account is connected.
CONNECTED = PRODUCT_REDIRECT + "&platform=tiktok&status=connected"


def environ(**overrides: str | None) -> dict[str, str]:
    env = {
        "TIKTOK_CLIENT_KEY": CLIENT_KEY,
        "TIKTOK_CLIENT_SECRET": CLIENT_SECRET,
        "TIKTOK_REDIRECT_URI": REDIRECT_URI,
        "STATE_SECRET": STATE_SECRET,
        "AUTH_JWT_SECRET": AUTH_SECRET,
        "ALLOWED_REDIRECT_ORIGINS": PRODUCT_ORIGIN,
        "TOKEN_ENCRYPTION_KEYS": TOKEN_KEY,
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def make_config(**overrides: str | None) -> Config:
    return load_config(environ(**overrides))


def product_token(sub: str = "user-123", secret: str = AUTH_SECRET, **claims: Any) -> str:
    payload = {"sub": sub, "iat": int(time.time()), "exp": int(time.time()) + 600, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(sub: str = "user-123", **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {product_token(sub, **claims)}"}


def state_claims(**overrides: Any) -> dict[str, Any]:
    """A state JWT's claims as the gateway mints them, valid for ten minutes from now
    (``overrides`` replace claims; None drops one)."""
    now = int(time.time())
    claims = {
        "iss": STATE_ISSUER,
        "aud": REDIRECT_URI,
        "sub": "user-123",
        "jti": "forged-jti",
        "iat": now,
        "exp": now + 600,
        "redirect_uri": PRODUCT_REDIRECT,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def forged_state(key: str = STATE_SECRET, algorithm: str = "HS256", **overrides: Any) -> str:
    """A state JWT as the gateway would mint one (claims overridable; None drops one)."""
    return jwt.encode(state_claims(**overrides), key, algorithm=algorithm,
                      headers={"typ": STATE_TYP})


def jti_of(state: str) -> str:
    """The id of a state the gateway minted (its pending authorization's key)."""
    claims = jwt.decode(state, STATE_SECRET, algorithms=["HS256"], audience=REDIRECT_URI)
    return str(claims["jti"])


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it back): to listen
    on, or, left alone, a port where nothing answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def utc_now() -> datetime:
    """Now, to the millisecond: BSON keeps milliseconds, so values stay exact in every
    store."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def fake_grant(
    open_id: str | None = None,
    *,
    now: datetime | None = None,
    tag: str | None = None,
    access_ttl: timedelta = timedelta(hours=24),
    refresh_ttl: timedelta = timedelta(days=365),
    scopes: Sequence[str] = ("user.info.basic",),
) -> TokenGrant:
    """Tokens as a code exchange returns them: ``act.<tag>`` / ``rft.<tag>`` (a random
    tag unless given), expiring ``access_ttl`` / ``refresh_ttl`` after ``now``."""
    now = now or utc_now()
    tag = tag or "test-" + secrets.token_hex(8)
    return TokenGrant(
        open_id=open_id or f"open-id-test-{secrets.token_hex(6)}",
        access_token=f"act.{tag}",
        refresh_token=f"rft.{tag}",
        access_token_expires_at=now + access_ttl,
        refresh_token_expires_at=now + refresh_ttl,
        scopes=list(scopes),
    )


def fake_pending(*, now: datetime, ttl: timedelta = timedelta(minutes=10)) -> PendingAuthorization:
    return PendingAuthorization(
        jti=secrets.token_hex(16),
        owner_id="owner-" + secrets.token_hex(4),
        redirect_uri="https://app.example.test/connected",
        scopes=["user.info.basic"],
        code_verifier="verifier-test-" + secrets.token_hex(16),
        created_at=now,
        expires_at=now + ttl,
    )


def store_of(app: tornado.web.Application) -> Store:
    """The store of a gateway app made by ``make_app``."""
    store: Store = app.settings["gateway"].store
    return store


async def initialized_store(app: tornado.web.Application) -> Store:
    """The app's store, initialized as ``python server.py`` does at start-up."""
    store = store_of(app)
    await store.initialize()
    return store


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    """The seed's error envelope, with the headers every response carries."""
    assert response.code == status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.body)
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert body["requestId"] == response.headers["X-Request-ID"]
    assert body["timestamp"].endswith("Z")
    assert "Traceback" not in response.body.decode()
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    if status == 503:
        assert int(response.headers["Retry-After"]) > 0
    return body


# -- the tree and /metrics ---------------------------------------------------------

NOT_SOURCE = {".git", ".venv", "artifacts", "cassettes", "docs", "__pycache__"}


def source_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if not NOT_SOURCE & set(parts) and not any(p.startswith(".") for p in parts):
            yield path


class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.families = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def labelled(self, name: str, label: str) -> dict[str, float]:
        return {dict(key)[label]: value for (sample, key), value in self.samples.items()
                if sample == name and label in dict(key)}


async def scrape(http_client: Any, base_url: str) -> Scrape:
    response = await http_client.fetch(f"{base_url}/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Request-ID"]
    return Scrape(response.body.decode())

"""Shared test helpers: per-run fake secrets, configuration, product tokens."""

from __future__ import annotations

import base64
import os
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt

from scripts.cassette_scenarios import CLIENT_KEY, REDIRECT_URI
from services.config import Config, load_config
from services.state import STATE_ISSUER, STATE_TYP

# The gateway's client key and redirect URI are the ones the cassettes carry.
# Obviously fake and fresh every run: nothing here is a real credential.
CLIENT_SECRET = "test-client-secret-" + secrets.token_hex(8)
STATE_SECRET = "test-state-secret-" + secrets.token_hex(24)
AUTH_SECRET = "test-auth-secret-" + secrets.token_hex(24)
TOKEN_KEY = "test:" + base64.b64encode(os.urandom(32)).decode()
PRODUCT_ORIGIN = "https://app.example.com"
PRODUCT_REDIRECT = PRODUCT_ORIGIN + "/settings/connections?tab=social"


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


def forged_state(key: str = STATE_SECRET, algorithm: str = "HS256", **overrides: Any) -> str:
    """A state JWT as the gateway would mint one (claims overridable; None drops one)."""
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
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=algorithm, headers={"typ": STATE_TYP})


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    """The seed's error envelope, with the headers every response carries."""
    import json

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

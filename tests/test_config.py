"""Start-up configuration: fail fast, name every problem, never echo a secret."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core.errors import ConfigError
from services.config import load_config
from tests.support import AUTH_SECRET, ROOT, STATE_SECRET, environ


def problems(**overrides):
    with pytest.raises(ConfigError) as caught:
        load_config(environ(**overrides))
    return caught.value.problems


def test_defaults():
    config = load_config(environ())
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.tiktok_authorize_url == "https://www.tiktok.com/v2/auth/authorize/"
    assert config.tiktok_api_base_url == "https://open.tiktokapis.com"
    assert config.tiktok_scopes == ("user.info.basic",)
    assert config.tiktok_pkce == "hex"
    assert config.state_ttl_seconds == 600
    assert config.mongodb_uri is None
    assert config.mongodb_database == "tiktok_gateway"
    assert config.mongodb_driver == "motor"


def test_every_missing_variable_is_named_at_once():
    required = ("TIKTOK_CLIENT_KEY", "TIKTOK_CLIENT_SECRET", "TIKTOK_REDIRECT_URI",
                "STATE_SECRET", "AUTH_JWT_SECRET", "ALLOWED_REDIRECT_ORIGINS")
    found = problems(**dict.fromkeys(required))  # every one of them unset
    text = "\n".join(found)
    for name in required:
        assert name in text
    assert len(found) == 6


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"STATE_SECRET": "short-secret"}, "STATE_SECRET"),
        ({"STATE_SECRET": STATE_SECRET + ",tooshort"}, "key 2"),
        ({"AUTH_JWT_SECRET": STATE_SECRET}, "must differ"),
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"TIKTOK_PKCE": "plain"}, "TIKTOK_PKCE"),
        ({"MONGODB_DRIVER": "mongoengine"}, "MONGODB_DRIVER"),
        ({"TIKTOK_SCOPES": "user.info.basic,everything"}, "everything"),
        ({"TIKTOK_REDIRECT_URI": "/relative/callback"}, "TIKTOK_REDIRECT_URI"),
        ({"TIKTOK_REDIRECT_URI": "https://g.example.com/cb?x=1"}, "query"),
        ({"ALLOWED_REDIRECT_ORIGINS": "https://app.example.com/path"}, "origin"),
        ({"ALLOWED_REDIRECT_ORIGINS": "javascript:alert(1)"}, "ALLOWED_REDIRECT_ORIGINS"),
        ({"STATE_TTL_SECONDS": "0"}, "STATE_TTL_SECONDS"),
        ({"MONGODB_URI": "mongodb://db.example.com", "TOKEN_ENCRYPTION_KEYS": None},
         "TOKEN_ENCRYPTION_KEYS is required"),
        ({"TOKEN_ENCRYPTION_KEYS": "k1:c2hvcnQ="}, "32"),
        ({"TOKEN_ENCRYPTION_KEYS": "no-colon"}, "kid:base64key"),
    ],
)
def test_invalid_values_are_explained(overrides, needle):
    assert needle in "\n".join(problems(**overrides))


TLS_VARIABLES = ("TIKTOK_API_BASE_URL", "TIKTOK_AUTHORIZE_URL", "TIKTOK_REDIRECT_URI")


@pytest.mark.parametrize(
    "base",
    ["http://127.0.0.1:9000", "http://127.8.9.10", "http://localhost:9000", "http://[::1]:9000",
     "HTTP://LOCALHOST:9000", "https://open.tiktokapis.com"],
)
def test_plain_http_is_accepted_to_loopback_hosts_only(base):
    config = load_config(environ(TIKTOK_API_BASE_URL=base, TIKTOK_AUTHORIZE_URL=base + "/auth/",
                                 TIKTOK_REDIRECT_URI=base + "/oauth/tiktok/callback"))
    assert config.tiktok_api_base_url == base


@pytest.mark.parametrize(
    "base",
    ["http://open.tiktokapis.com", "http://10.0.0.5:9000", "http://0.0.0.0:9000",
     "http://localhost.example.com", "http://127.0.0.1.nip.io", "http://[::2]:9000",
     "http://gateway.internal"],
)
def test_plain_http_elsewhere_is_refused_for_every_tiktok_url_at_once(base):
    found = problems(TIKTOK_API_BASE_URL=base, TIKTOK_AUTHORIZE_URL=base + "/auth/",
                     TIKTOK_REDIRECT_URI=base + "/oauth/tiktok/callback")
    assert len(found) == 3, found
    for name in TLS_VARIABLES:
        [problem] = [p for p in found if p.startswith(name + "=")]
        assert "must use https" in problem and "loopback" in problem


def test_every_auth_jwt_secret_key_is_kept_for_rotation():
    old = "test-old-auth-secret-" + "o" * 32
    config = load_config(environ(AUTH_JWT_SECRET=f"{AUTH_SECRET}, {old}"))
    assert config.auth_jwt_secrets == (AUTH_SECRET.encode(), old.encode())
    assert "key 2" in "\n".join(problems(AUTH_JWT_SECRET=AUTH_SECRET + ",tooshort"))
    assert "must differ" in "\n".join(problems(AUTH_JWT_SECRET=f"{AUTH_SECRET},{STATE_SECRET}"))


def test_secrets_are_never_echoed():
    short_secret = "sekrit-value-1234"
    text = "\n".join(
        problems(STATE_SECRET=short_secret, AUTH_JWT_SECRET=short_secret + "x",
                 TOKEN_ENCRYPTION_KEYS="k1:" + short_secret)
    )
    assert short_secret not in text
    assert AUTH_SECRET not in text


def test_server_exits_2_with_one_clear_message():
    result = subprocess.run(
        [sys.executable, "server.py"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "STATE_SECRET": "tiny"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "TIKTOK_CLIENT_KEY is required" in result.stderr
    assert "STATE_SECRET is invalid" in result.stderr
    assert "tiny" not in result.stderr
    assert "Traceback" not in result.stderr

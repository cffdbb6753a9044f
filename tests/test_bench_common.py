"""``bench.common``: what the benchmark scripts share, without starting any process."""

from __future__ import annotations

import base64

import pytest

from bench.common import (
    CLIENT_KEY,
    against_sandbox,
    gateway_secrets,
    inherited_environment,
    max_in_window,
    mongodb_settings,
)


@pytest.mark.parametrize(
    ("times", "seconds", "most"),
    [
        ([], 60.0, 0),
        ([5.0], 60.0, 1),
        ([0.0, 1.0, 2.0, 3.0], 2.0, 2),  # a window is half-open: 0 and 2 are 2 s apart
        ([0.0, 0.5, 1.0, 10.0, 10.1, 10.2, 10.3], 1.0, 4),
    ],
)
def test_max_in_window_counts_the_busiest_sliding_window(times, seconds, most):
    assert max_in_window(times, seconds) == most


def test_children_inherit_no_gateway_setting(monkeypatch):
    monkeypatch.setenv("TIKTOK_CLIENT_KEY", "from-the-shell")
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("BENCH_COMMON_KEPT", "yes")
    env = inherited_environment()
    assert "TIKTOK_CLIENT_KEY" not in env and "PORT" not in env
    assert env["BENCH_COMMON_KEPT"] == "yes"


def test_each_run_gets_fresh_secrets():
    first, second = gateway_secrets("http://a/cb"), gateway_secrets("http://a/cb")
    assert first["TIKTOK_CLIENT_KEY"] == CLIENT_KEY
    assert first["TIKTOK_REDIRECT_URI"] == "http://a/cb"
    for name in ("TIKTOK_CLIENT_SECRET", "STATE_SECRET", "AUTH_JWT_SECRET"):
        assert first[name] != second[name]


def test_the_gateway_talks_to_the_sandbox_and_a_database_of_its_own():
    env = against_sandbox("http://127.0.0.1:9", "WARNING")
    assert env["TIKTOK_API_BASE_URL"] == "http://127.0.0.1:9"
    assert env["TIKTOK_AUTHORIZE_URL"] == "http://127.0.0.1:9/v2/auth/authorize/"
    assert env["LOG_LEVEL"] == "WARNING"
    first = mongodb_settings("mongodb://x", "pymongo", "burst")
    second = mongodb_settings("mongodb://x", "pymongo", "burst")
    assert first["MONGODB_DATABASE"].startswith("burst_")
    assert first["MONGODB_DATABASE"] != second["MONGODB_DATABASE"]
    name, _, key = first["TOKEN_ENCRYPTION_KEYS"].partition(":")
    assert name == "k1" and len(base64.b64decode(key)) == 32

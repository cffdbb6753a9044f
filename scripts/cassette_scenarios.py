"""What the cassette recorder and the replaying tests agree on (cassettes/ is the data).

``scripts/record_cassettes.py`` (``make cassettes``) writes the cassettes and the
tests replay them (``tests/cassettes.py``); both import this module, so they
cannot drift apart: the scenarios, the fake code each one's callback carries,
the client key and redirect URI every recording is rewritten to, the filtered
form fields and their placeholders, the fake tokens that stand in for real ones
in recorded responses, and the VCR that matches requests; and ``serving``, the
one way both put an app on a real loopback socket.

It lives beside the recorder, not in ``tests/``: a script must not depend on the
test suite, while the tests may import ``scripts`` (as they do for the other
scripts they check). Nothing of the gateway imports it (vcrpy is a
development dependency).

Matching is strict: ``record_mode="none"`` (an unrecorded request fails instead
of reaching the network), requests match on method + URI + form body.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import tornado.netutil
import tornado.web
import vcr
from tornado.httpserver import HTTPServer
from vcr.request import Request
from vcr.util import read_body

ROOT = Path(__file__).resolve().parent.parent
CASSETTE_DIR = ROOT / "cassettes"

# What recorded requests say, whatever was recorded against: the gateway's
# default TikTok API base URL, which the replaying tests keep, and the gateway's
# client key and registered redirect URI (the tests' gateway uses the same).
TIKTOK_API_BASE_URL = "https://open.tiktokapis.com"
CLIENT_KEY = "test-client-key"
REDIRECT_URI = "https://gateway.example.com/oauth/tiktok/callback"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

# Form fields whose values are secret, and what is recorded instead. Matching
# compares these fields by presence only (both sides get the placeholder).
# ``refresh_token`` is for refresh cassettes, ``token`` for revoke cassettes.
FILTERED_FORM_FIELDS: dict[str, str] = {
    "client_secret": "FILTERED_CLIENT_SECRET",
    "code_verifier": "FILTERED_CODE_VERIFIER",
    "refresh_token": "FILTERED_REFRESH_TOKEN",
    "token": "FILTERED_TOKEN",
}
# Request headers never recorded (and ignored when matching).
FILTERED_HEADERS: tuple[str, ...] = ("Authorization", "Cookie")
# Response headers kept in cassettes; every other one (Set-Cookie, Date, Server,
# Content-Length of a body we rewrote...) is dropped by the recorder.
KEPT_RESPONSE_HEADERS: tuple[str, ...] = (
    "Content-Type",
    "Cache-Control",
    "Retry-After",
    "X-Tt-Logid",
)
# Token values in recorded JSON responses are replaced by these fakes.
FAKE_TOKENS: dict[str, str] = {
    "access_token": "act.cassette-access-token",
    "refresh_token": "rft.cassette-refresh-token",
}
# Anything else found to be secret while recording (a value echoed somewhere
# unexpected) is replaced by this.
FILTERED_VALUE = "FILTERED"

BASIC = "user.info.basic"
PROFILE = "user.info.profile"
STATS = "user.info.stats"
DENIED_DESCRIPTION = "The user denied the authorization request."


@dataclass(frozen=True)
class Scenario:
    """One callback, as TikTok's browser redirect would deliver it."""

    name: str
    summary: str
    requested_scopes: tuple[str, ...]
    # What TikTok's callback reports in ``scopes=`` (what the user left ticked).
    granted_scopes: tuple[str, ...]
    # The user pressed Cancel: the callback carries ``error=access_denied``.
    denied: bool = False


def _scenario(name: str, summary: str, *scopes: str, granted: tuple[str, ...] | None = None,
              denied: bool = False) -> Scenario:
    return Scenario(name, summary, scopes, scopes if granted is None else granted, denied)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        _scenario("success", "token exchange + user info with profile fields", BASIC, PROFILE),
        _scenario(
            "partial_scopes",
            "basic+profile+stats asked, only basic granted; basic fields requested",
            BASIC,
            PROFILE,
            STATS,
            granted=(BASIC,),
        ),
        _scenario("access_denied", "the user denied: no request at all", BASIC, denied=True),
        _scenario("invalid_code", "an already-used code: HTTP 200 invalid_grant", BASIC),
        _scenario("invalid_client", "wrong client secret: HTTP 401 invalid_client", BASIC),
        _scenario("token_server_error", "token endpoint HTTP 500, not retried", BASIC),
        _scenario("token_rate_limited", "token endpoint HTTP 429 with Retry-After: 7", BASIC),
        _scenario(
            "userinfo_unauthorized", "tokens OK, user info HTTP 401 access_token_invalid", BASIC
        ),
        _scenario("userinfo_retry_then_ok", "user info HTTP 500 once, then OK", BASIC, PROFILE),
    )
}


@dataclass(frozen=True)
class AccountScenario:
    """One call the accounts API makes to TikTok for an account connected earlier."""

    name: str
    summary: str
    # "refresh": POST /accounts/{id}/access-token with a token due for a refresh;
    # "revoke": DELETE /accounts/{id}.
    endpoint: str


ACCOUNT_SCENARIOS: dict[str, AccountScenario] = {
    s.name: s
    for s in (
        AccountScenario(
            "refresh_rotated", "refresh: a new access token and a rotated refresh token", "refresh"
        ),
        AccountScenario(
            "refresh_refused", "refresh: the user removed the app, HTTP 200 invalid_grant",
            "refresh",
        ),
        AccountScenario("revoke_ok", "revoke: HTTP 200", "revoke"),
        AccountScenario("revoke_failed", "revoke: HTTP 500 on every one of 3 attempts", "revoke"),
    )
}
# Every cassette file's name (without .yaml): callbacks and account calls.
CASSETTE_NAMES: tuple[str, ...] = (*SCENARIOS, *ACCOUNT_SCENARIOS)


def fake_code(scenario: str) -> str:
    """The code a scenario's callback carries; ``*`` and ``!`` like TikTok's real codes."""
    if scenario not in SCENARIOS:
        raise KeyError(f"unknown cassette scenario {scenario!r}")
    return f"code*{scenario}!cassette"


def callback_params(scenario: str, state: str) -> dict[str, str]:
    """The query TikTok's redirect carries back to the gateway for this scenario."""
    spec = SCENARIOS[scenario]
    if spec.denied:
        return {"error": "access_denied", "error_description": DENIED_DESCRIPTION, "state": state}
    return {"code": fake_code(scenario), "scopes": ",".join(spec.granted_scopes), "state": state}


def cassette_path(scenario: str, directory: Path = CASSETTE_DIR) -> Path:
    if scenario not in CASSETTE_NAMES:
        raise KeyError(f"unknown cassette scenario {scenario!r}")
    return directory / f"{scenario}.yaml"


# -- matching -------------------------------------------------------------------


def is_form(request: Request) -> bool:
    content_type = request.headers.get("Content-Type") or ""
    if isinstance(content_type, list | tuple):
        content_type = content_type[0] if content_type else ""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.split(";")[0].strip().lower() == FORM_CONTENT_TYPE


def _text(body: Any) -> str:
    if body is None:
        return ""
    if isinstance(body, bytes | bytearray):
        return bytes(body).decode("utf-8")
    return str(body)


def normalized_form(body: Any) -> list[tuple[str, str]]:
    """Form pairs, sorted, with every filtered field's value replaced by its placeholder."""
    pairs = parse_qsl(_text(body), keep_blank_values=True)
    return sorted((name, FILTERED_FORM_FIELDS.get(name, value)) for name, value in pairs)


def tiktok_body(r1: Request, r2: Request) -> None:
    """vcrpy matcher: form bodies compared parsed and filtered, other bodies raw."""
    if is_form(r1) and is_form(r2):
        left: Any = normalized_form(read_body(r1))
        right: Any = normalized_form(read_body(r2))
    else:
        left, right = read_body(r1), read_body(r2)
    if left != right:
        raise AssertionError(f"bodies differ: {left!r} != {right!r} (recorded)")


def tiktok_vcr(**overrides: Any) -> vcr.VCR:
    """The replaying VCR; the recorder passes overrides (record mode, its own filters).

    ``ignore_localhost``: the tests' own calls to the gateway go through the same
    patched Tornado client and must reach it; only TikTok's host is replayed.
    """
    options: dict[str, Any] = {
        "cassette_library_dir": str(CASSETTE_DIR),
        "record_mode": "none",
        "match_on": ("method", "uri", "tiktok_body"),
        "filter_headers": list(FILTERED_HEADERS),
        "decode_compressed_response": True,
        "ignore_localhost": True,
    }
    options.update(overrides)
    configured = vcr.VCR(**options)
    configured.register_matcher("tiktok_body", tiktok_body)
    return configured


@contextlib.asynccontextmanager
async def serving(app: tornado.web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port, yielding its base URL; stopped on the way out."""
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    try:
        yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    finally:
        server.stop()
        await server.close_all_connections()

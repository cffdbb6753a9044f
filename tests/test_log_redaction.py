"""No secret in any log record, across whole flows against the live sandbox, nor in
the repr() of any object that carries one.

Every record of every logger (root at DEBUG, nothing filtered, nothing disabled) is
formatted in full, traceback and extra attributes included, while real flows run:
a success, a repeated callback, a forged repeat, a TikTok error (access_denied), a
token-endpoint 500, an invalid code (invalid_grant), user-info failures, authorize
calls with bad bearers, malformed callbacks, and a bug (a store raising RuntimeError)
that ends in a 500. The secrets those flows used (codes, states, access and refresh
tokens, the client secret, the other keys, product bearer tokens, PKCE verifiers) must
not appear in any record, raw or encoded, nor any 16-character run of them. The
sandbox (same process) logs 8-character prefixes of codes, which this allows.

The same capture then checks what the logs must say: one access line per request with
method, path without query, status, duration and request id; TikTok's ``log_id`` on
every outbound call.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import pytest

import sandbox.app as sandbox_app
from server import make_app
from services.accounts import AccessToken
from services.connect import CallbackParams
from services.tiktok import TokenResponse
from storage.base import AccountTokens, PendingAuthorization, TokenGrant
from storage.crypto import TokenCipher
from storage.memory import MemoryStore
from storage.tokens import TokenSealer
from tests.flow import consent, fetch_with_request_id, live_sandbox, sandbox_settings
from tests.support import (
    CONFIGURED_SECRETS,
    CONNECTED,
    PRODUCT_REDIRECT,
    make_config,
    product_token,
    query_of,
)

BUG_MESSAGE = "store bug: the disk is on fire"
# Loggers whose records must reach the capture, whatever configured them before.
WATCHED = ("", "tornado", "gateway", "sandbox", "asyncio", "storage", "services")
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message",
                                                                            "asctime"}
ACCESS_LINE = re.compile(
    r"(?P<method>[A-Z]+) (?P<path>/\S*) (?P<status>\d{3}) (?P<ms>\d+\.\d)ms "
    r"request_id=(?P<rid>\S+)"
)
TIKTOK_LINE = re.compile(
    r"tiktok (?P<endpoint>token|user_info) (?P<method>GET|POST) (?P<url>\S+) -> "
    r"(?P<outcome>.+) in (?P<ms>\d+) ms log_id=(?P<log_id>\S+)"
)


class CaptureAll(logging.Handler):
    """Keeps every record, formatted the way a production handler would print it."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(module)s:%(lineno)d "
                              "%(message)s")
        )
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.format_errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Formatter.format appends the traceback (exc_info) and stack_info.
            text = self.format(record)
        except Exception as exc:  # a record that cannot be formatted is a finding too
            self.format_errors.append(f"{record.name}: {exc!r}")
            text = f"{record.name} {record.msg!r} {record.args!r}"
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        text += f" args={record.args!r}"
        if extras:
            text += f" extra={extras!r}"
        self.records.append(record)
        self.lines.append(text)

    def of(self, name: str) -> list[tuple[logging.LogRecord, str]]:
        return [(r, line) for r, line in zip(self.records, self.lines, strict=True)
                if r.name == name]


@pytest.fixture
def captured():
    handler = CaptureAll()
    root = logging.getLogger()
    saved_root_level = root.level
    saved_disable = logging.root.manager.disable
    saved: dict[str, tuple[int, bool, bool]] = {}
    names = [n for n in logging.root.manager.loggerDict
             if any(n == w or n.startswith(w + ".") for w in WATCHED if w)]
    for name in names + ["tornado.access", "tornado.application", "tornado.general"]:
        logger = logging.getLogger(name)
        saved[name] = (logger.level, logger.propagate, logger.disabled)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
        logger.disabled = False
    logging.disable(logging.NOTSET)
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        # The capture itself: DEBUG records from each family arrive, formatted.
        for name in ("tornado.general", "asyncio", "gateway.canary", "sandbox.canary"):
            logging.getLogger(name).debug("canary %s", name)
        assert [r.name for r in handler.records] == [
            "tornado.general", "asyncio", "gateway.canary", "sandbox.canary"]
        assert all(" DEBUG " in line and "canary" in line for line in handler.lines)
        handler.records.clear()
        handler.lines.clear()
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root_level)
        logging.disable(saved_disable)
        for name, (level, propagate, disabled) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled


class RecordingStore(MemoryStore):
    """Remembers each PKCE verifier (the store drops it once a state is finished), and
    fails like a bug on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.verifiers: list[str] = []
        self.owners: set[str] = set()
        self.explode = False

    async def save_pending(self, pending):
        if pending.code_verifier:
            self.verifiers.append(pending.code_verifier)
        self.owners.add(pending.owner_id)
        await super().save_pending(pending)

    async def save_account_tokens(self, owner_id, grant, *, now, **options):
        if self.explode:
            raise RuntimeError(BUG_MESSAGE)
        return await super().save_account_tokens(owner_id, grant, now=now, **options)


@pytest.fixture
def log_ids(monkeypatch):
    """Every log_id the sandbox hands out, as TikTok's X-Tt-Logid / body log_id."""
    issued: list[str] = []
    original = sandbox_app.new_log_id

    def recording() -> str:
        issued.append(original())
        return issued[-1]

    monkeypatch.setattr(sandbox_app, "new_log_id", recording)
    return issued


@pytest.fixture
def sandbox(io_loop, captured, log_ids):
    with live_sandbox(io_loop) as sandbox:
        yield sandbox


@pytest.fixture
def store():
    return RecordingStore()


@pytest.fixture
def app(captured, sandbox, store):
    return make_app(
        make_config(**sandbox_settings(sandbox.url), TIKTOK_REQUEST_TIMEOUT_SECONDS="2"),
        store=store,
    )


# -- the journey ------------------------------------------------------------------------


@dataclass
class Exchange:
    label: str
    method: str
    path: str
    request_id: str
    response: Any


@dataclass
class Journey:
    exchanges: list[Exchange] = field(default_factory=list)
    secrets: dict[str, list[str]] = field(default_factory=dict)
    envelopes: list[dict[str, Any]] = field(default_factory=list)

    def keep(self, kind: str, value: str | None) -> None:
        if value:
            self.secrets.setdefault(kind, []).append(value)


class Driver:
    def __init__(self, http_client: Any, base_url: str, journey: Journey) -> None:
        self.http = http_client
        self.base_url = base_url
        self.journey = journey

    async def call(self, label: str, url: str, *, method: str = "GET", body: Any = None,
                   headers: dict[str, str] | None = None) -> Any:
        request_id = f"redaction-{label}-{len(self.journey.exchanges):03d}"
        response = await fetch_with_request_id(self.http, url, request_id, method=method,
                                               body=body, headers=headers)
        self.journey.exchanges.append(
            Exchange(label, method, urlsplit(url).path, request_id, response))
        if response.code >= 400:
            self.journey.envelopes.append(json.loads(response.body))
        return response

    async def authorize(self, label: str, authorization: str | None) -> Any:
        headers = {"Authorization": authorization} if authorization is not None else {}
        return await self.call(
            label, f"{self.base_url}/oauth/tiktok/authorize", method="POST",
            body=json.dumps({"redirectUri": PRODUCT_REDIRECT}), headers=headers)

    async def start(self, label: str, owner: str = "user-123") -> dict[str, Any]:
        token = product_token(owner)
        self.journey.keep("product bearer token", token)
        response = await self.authorize(label, f"Bearer {token}")
        assert response.code == 200, response.body
        started = json.loads(response.body)
        self.journey.keep("state", started["state"])
        return started

    async def consent(self, started: dict[str, Any], **knobs: str) -> str:
        """At the sandbox's consent page: the gateway callback URL TikTok sends back."""
        callback_url = await consent(self.http, self.base_url, started["authorizationUrl"],
                                     **knobs)
        self.journey.keep("authorization code", query_of(callback_url).get("code", [None])[0])
        return callback_url

    async def connect(self, label: str, **knobs: str) -> tuple[str, Any]:
        started = await self.start(label)
        callback_url = await self.consent(started, **knobs)
        return callback_url, await self.call(label, callback_url)


def _code_of(callback_url: str) -> str:
    return query_of(callback_url)["code"][0]


async def run_flows(http_client: Any, base_url: str, sandbox: Any,
                    store: RecordingStore) -> Journey:
    journey = Journey()
    drive = Driver(http_client, base_url, journey)

    # A success, the same callback again, and the same state with another code.
    callback_url, response = await drive.connect("success")
    assert response.code == 302 and response.headers["Location"] == CONNECTED
    repeat = await drive.call("repeat", callback_url)
    assert repeat.code == 302 and repeat.headers["Location"] == CONNECTED
    forged = callback_url.replace("code=", "code=X", 1)
    assert (await drive.call("forged-repeat", forged)).code == 400

    # The user presses Cancel at TikTok.
    _, response = await drive.connect("denied", sandbox_decision="deny")
    assert response.code == 400 and journey.envelopes[-1]["error"] == "PERMISSION_DENIED"

    # TikTok's token endpoint fails.
    started = await drive.start("token-500")
    callback_url = await drive.consent(started)
    sandbox.add_fault("token", status=500)
    assert (await drive.call("token-500", callback_url)).code == 503

    # An invalid code: the victim's code with the attacker's state (PKCE refuses it).
    victim = await drive.consent(await drive.start("invalid-code", owner="victim"))
    attacker = await drive.start("invalid-code", owner="attacker")
    injected = (f"{base_url}/oauth/tiktok/callback?code={quote(_code_of(victim), safe='')}"
                f"&state={attacker['state']}&scopes=user.info.basic")
    response = await drive.call("invalid-code", injected)
    assert response.code == 400
    assert journey.envelopes[-1]["details"]["providerError"] == "invalid_grant"

    # User info refused once (not retried: 503), then failing three times (retried
    # twice; connected, the profile left pending).
    for label, fault, status in (("userinfo-401", {"status": 401}, 503),
                                 ("userinfo-503", {"status": 503, "count": 3}, 302)):
        started = await drive.start(label)
        callback_url = await drive.consent(started)
        sandbox.add_fault("userinfo", **fault)
        assert (await drive.call(label, callback_url)).code == status
        if status == 503:
            assert journey.envelopes[-1]["details"]["endpoint"] == "user_info"

    # Bad bearers on the authorize endpoint.
    wrong_key = product_token(secret="w" * 48)
    expired = product_token(iat=1_600_000_000, exp=1_600_000_600)
    state_as_bearer = journey.secrets["state"][0]
    for token in (wrong_key, expired, state_as_bearer):
        journey.keep("product bearer token", token)
        assert (await drive.authorize("bad-bearer", f"Bearer {token}")).code == 401
    assert (await drive.authorize("bad-bearer", None)).code == 401
    assert (await drive.authorize("bad-bearer", f"Basic {wrong_key}")).code == 401

    # Malformed callbacks around genuine values: invalid UTF-8 right after the code
    # (tornado's own error message then holds the code), a state with junk appended.
    started = await drive.start("malformed")
    callback_url = await drive.consent(started)
    tampered = callback_url.replace("&scopes=", "%ff&scopes=", 1)
    assert (await drive.call("malformed", tampered)).code == 400
    tampered = callback_url.replace(started["state"], started["state"] + "x", 1)
    assert (await drive.call("malformed", tampered)).code == 400

    # A bug below the handlers, after TikTok issued tokens: 500, logged with traceback.
    store.explode = True
    try:
        _, response = await drive.connect("bug-500")
    finally:
        store.explode = False
    assert response.code == 500 and journey.envelopes[-1]["error"] == "INTERNAL_SERVER_ERROR"

    # Everything secret that took part.
    state = sandbox.state
    for code in getattr(state, "_codes", {}):
        journey.keep("authorization code", code)
    for token in getattr(state, "_access", {}):
        journey.keep("access token", token)
    for token in getattr(state, "_refresh", {}):
        journey.keep("refresh token", token)
    for owner in store.owners:
        for account in await store.list_accounts(owner):
            tokens = await store.get_account_tokens(account.id)
            assert tokens is not None
            journey.keep("access token", tokens.access_token)
            journey.keep("refresh token", tokens.refresh_token)
    for verifier in store.verifiers:
        journey.keep("PKCE verifier", verifier)
    for kind, secret in CONFIGURED_SECRETS.items():
        journey.keep(kind, secret)
    journey.keep("token encryption key",
                 base64.b64decode(CONFIGURED_SECRETS["token encryption key"]).hex())
    return journey


@pytest.fixture
def journey(io_loop, http_client, base_url, sandbox, store, captured):
    journey = io_loop.run_sync(
        functools.partial(run_flows, http_client, base_url, sandbox, store), timeout=60)
    # Enough of each kind took part for the checks below to mean something.
    counts = {kind: len(set(values)) for kind, values in journey.secrets.items()}
    assert counts["authorization code"] >= 7, counts
    assert counts["state"] >= 9, counts
    assert counts["access token"] >= 4 and counts["refresh token"] >= 4, counts
    assert counts["PKCE verifier"] >= 9, counts
    assert counts["product bearer token"] >= 4, counts
    return journey


# -- checks -----------------------------------------------------------------------------


def _forms(secret: str) -> set[str]:
    """How a value may show up in a log line: as is, URL-encoded, JSON- or repr-escaped."""
    return {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        repr(secret)[1:-1],
    }


def _runs(secret: str, size: int = 16) -> set[str]:
    """Shortened leaks. For a JWT, runs of its signature: header and claims are shared
    by many tokens, and without the signature they open nothing."""
    if secret.count(".") == 2 and secret.startswith("eyJ"):
        secret = secret.rsplit(".", 1)[1]
    if len(secret) < 24:
        return set()
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


def test_no_secret_in_any_log_record(captured, journey):
    assert not captured.format_errors, captured.format_errors
    assert captured.lines, "nothing was logged"
    leaks = []
    for record, line in zip(captured.records, captured.lines, strict=True):
        for kind, values in journey.secrets.items():
            found = next((n for secret in set(values) for n in _forms(secret) | _runs(secret)
                          if n in line), None)
            if found:
                leaks.append(f"{kind} ({found[:10]}...) in {record.name}: {line[:240]}")
    assert not leaks, f"{len(leaks)} leak(s):\n" + "\n".join(leaks[:20])

    # The capture saw every family that speaks during these flows.
    names = {r.name for r in captured.records}
    assert {"gateway.access", "gateway.tiktok", "gateway.errors", "gateway.connect",
            "sandbox", "sandbox.access"} <= names, names
    # The bug was logged with its message and traceback, and only there.
    bug_lines = [line for _, line in captured.of("gateway.errors") if BUG_MESSAGE in line]
    assert len(bug_lines) == 1, bug_lines
    assert "Traceback (most recent call last)" in bug_lines[0]
    assert "RuntimeError" in bug_lines[0]
    # The sandbox logs codes, shortened.
    issued = [line for r, line in captured.of("sandbox") if "issued code" in r.getMessage()]
    assert issued and all(re.search(r"issued code \S{8}\.\.\. ", line) for line in issued)


def test_access_log_names_method_path_status_duration_and_request_id(captured, journey):
    access = captured.of("gateway.access")
    by_id: dict[str, list[tuple[logging.LogRecord, re.Match[str]]]] = {}
    for record, _ in access:
        message = record.getMessage()
        match = ACCESS_LINE.fullmatch(message)
        assert match, message
        assert "?" not in message
        by_id.setdefault(match["rid"], []).append((record, match))
    assert len(access) == len(journey.exchanges)
    for exchange in journey.exchanges:
        [(record, match)] = by_id[exchange.request_id]
        status = exchange.response.code
        assert match["method"] == exchange.method
        assert match["path"] == exchange.path
        assert int(match["status"]) == status
        assert float(match["ms"]) >= 0.0
        assert match["rid"] == exchange.response.headers["X-Request-ID"]
        expected = (logging.INFO if status < 400 else logging.WARNING if status < 500
                    else logging.ERROR)
        assert record.levelno == expected, (record.levelname, status)


def test_tiktok_log_lines_carry_tiktoks_log_id(captured, journey, sandbox, log_ids):
    lines = [(record, TIKTOK_LINE.fullmatch(record.getMessage()))
             for record, _ in captured.of("gateway.tiktok")]
    assert lines and all(match for _, match in lines), [r.getMessage() for r, _ in lines]
    calls = [match for _, match in lines]
    assert sum(m["endpoint"] == "token" for m in calls) == sandbox.stats["token"]
    assert sum(m["endpoint"] == "user_info" for m in calls) == sandbox.stats["userinfo"]
    for match in calls:
        assert "?" not in match["url"] and match["url"].startswith(sandbox.url), match[0]
        assert match["outcome"].isdigit(), match[0]  # every call got an HTTP answer
        assert match["log_id"] in log_ids, match[0]
    assert len({m["log_id"] for m in calls}) == len(calls)
    # The log_id a caller is shown for a TikTok failure leads to the matching line.
    shown = [e["details"]["logId"] for e in journey.envelopes
             if "logId" in e.get("details", {})]
    assert len(shown) >= 3, journey.envelopes
    assert set(shown) <= {m["log_id"] for m in calls}
    # A success names the user-info call's log_id too.
    connected = [r.getMessage() for r, _ in captured.of("gateway.connect")
                 if "connected account" in r.getMessage()]
    assert connected
    for message in connected:
        log_id = re.search(r"log_id=(\S+)\)", message)[1]
        assert log_id in {m["log_id"] for m in calls if m["endpoint"] == "user_info"}


# -- repr() of the objects that carry secrets --------------------------------------


REPR_SECRET = "repr-secret-" + "s" * 40
# The AES key of TOKEN_ENCRYPTION_KEYS below: 32 bytes of the secret.
REPR_KEY = base64.b64encode(REPR_SECRET.encode()[:32]).decode()


def _holding_secrets(kind: str) -> Any:
    """An object of ``kind`` with ``REPR_SECRET`` in every secret field."""
    secret, now = REPR_SECRET, datetime.now(UTC)
    if kind == "Config":
        return make_config(
            TIKTOK_CLIENT_SECRET=secret,
            STATE_SECRET=secret + "-state",
            AUTH_JWT_SECRET=f"{secret}-auth,{secret}-old-auth",
            TOKEN_ENCRYPTION_KEYS=f"k1:{REPR_KEY}",
            MONGODB_URI=f"mongodb://gateway:{secret}@db.example.com/",
        )
    if kind == "TokenGrant":
        return TokenGrant(open_id="open-1", access_token=secret + "-access",
                          refresh_token=secret + "-refresh", access_token_expires_at=now,
                          refresh_token_expires_at=now, scopes=["user.info.basic"])
    if kind == "TokenResponse":
        return TokenResponse(open_id="open-1", access_token=secret + "-access",
                             refresh_token=secret + "-refresh", expires_in=86400,
                             refresh_expires_in=31536000, scopes=["user.info.basic"],
                             log_id="log-1")
    if kind == "AccountTokens":
        return AccountTokens(access_token=secret + "-access", refresh_token=secret + "-refresh",
                             access_token_expires_at=now, refresh_token_expires_at=now)
    if kind == "PendingAuthorization":
        return PendingAuthorization(jti="jti-1", owner_id="user-1", redirect_uri=PRODUCT_REDIRECT,
                                    scopes=["user.info.basic"], code_verifier=secret + "-pkce",
                                    created_at=now, expires_at=now)
    if kind == "CallbackParams":
        return CallbackParams(state=secret + "-state-jwt", code=secret + "-code", error=None,
                              error_description=None, granted_scopes="user.info.basic")
    if kind == "AccessToken":
        return AccessToken(access_token=secret + "-access", expires_at=now,
                           scopes=["user.info.basic"], open_id="open-1")
    assert kind == "TokenSealer"
    return TokenSealer(TokenCipher(TokenCipher.parse_keys(f"k1:{REPR_KEY}")))


@pytest.mark.parametrize(
    "kind",
    ["Config", "TokenGrant", "TokenResponse", "AccountTokens", "PendingAuthorization",
     "CallbackParams", "TokenSealer", "AccessToken"],
)
def test_no_secret_in_the_repr_of_objects_that_carry_one(kind):
    made = _holding_secrets(kind)
    assert type(made).__name__ == kind
    for shown in (repr(made), str(made)):
        assert REPR_SECRET[:16] not in shown and REPR_KEY[:16] not in shown, shown

"""Record the TikTok cassettes that tests/test_callback_cassettes.py replays (`make cassettes`).

Default target: the local TikTok sandbox, run in this process on a free loopback
port, with the gateway (``make_app``) served on another. Each scenario is driven
like a browser: POST /oauth/tiktok/authorize with a product bearer, open the
authorization URL on the sandbox (without following redirects), then GET the
callback URL it redirects to on the gateway while vcrpy records. Only the
gateway's own calls to TikTok's API are recorded, never the script's calls to the
authorize page or to the gateway.

Real TikTok (cannot run without network and a registered app):

    TIKTOK_SECRET=... python scripts/record_cassettes.py --target tiktok \\
        --client-key KEY --client-secret-env TIKTOK_SECRET \\
        --redirect-uri https://your-registered/callback [--scenario success]

prints the authorization URL built by the gateway, waits for the operator to
consent in a browser and paste the URL TikTok redirected to, and replays that
callback into the in-process gateway while recording, through the same code path.

Account scenarios (``refresh_*``, ``revoke_*``; sandbox only) connect an account
through the same flow without recording, then record what the gateway sends TikTok
for ``POST /accounts/{id}/access-token`` (a token due for a refresh) or
``DELETE /accounts/{id}``.

The sandbox runs on its default (TikTok's current) lifetimes with a frozen clock that
moves only when a recipe says so, so recorded ``expires_in`` / ``refresh_expires_in``
are the same on every run, however slow the machine.

Both modes scrub what they record (see ``scripts/cassette_scenarios.py``, which the
replaying tests import too): the API base URL becomes https://open.tiktokapis.com,
the client key and redirect URI become the ones the tests' gateway uses, the code
becomes the scenario's fake code, client_secret, code_verifier, refresh_token and
token become placeholders, Authorization is dropped, tokens in responses become
fake ones, and only a few response headers are kept. Cassettes are written to a
temporary directory, scanned for every real secret, code and token seen while
recording, and only then moved into place; a leak fails the run loudly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse  # noqa: E402
from tornado.httputil import url_concat  # noqa: E402
from vcr.request import Request  # noqa: E402
from vcr.serialize import serialize  # noqa: E402
from vcr.serializers import yamlserializer  # noqa: E402

from core.errors import ConfigError  # noqa: E402
from sandbox import Sandbox, SandboxClient  # noqa: E402
from sandbox.app import AUTHORIZE_PATH as SANDBOX_AUTHORIZE_PATH  # noqa: E402
from sandbox.state import ACCESS_TOKEN_TTL  # noqa: E402
from scripts.cassette_scenarios import (  # noqa: E402
    ACCOUNT_SCENARIOS,
    CASSETTE_DIR,
    CASSETTE_NAMES,
    CLIENT_KEY,
    FAKE_TOKENS,
    FILTERED_FORM_FIELDS,
    FILTERED_HEADERS,
    FILTERED_VALUE,
    KEPT_RESPONSE_HEADERS,
    REDIRECT_URI,
    SCENARIOS,
    TIKTOK_API_BASE_URL,
    AccountScenario,
    Scenario,
    cassette_path,
    fake_code,
    is_form,
    serving,
    tiktok_vcr,
)
from server import make_app  # noqa: E402
from services.config import Config, load_config  # noqa: E402
from services.product_auth import TOKENS_SCOPE  # noqa: E402
from services.tiktok import REVOKE_PATH, TOKEN_PATH, USER_INFO_PATH  # noqa: E402
from storage.memory import MemoryStore  # noqa: E402

log = logging.getLogger("record_cassettes")

CALLBACK_PATH = "/oauth/tiktok/callback"
API_PATHS = frozenset({TOKEN_PATH, USER_INFO_PATH, REVOKE_PATH})
MIN_SECRET_LENGTH = 8  # shorter values would make the leak scan cry wolf


class RecordingError(Exception):
    """The recording cannot be trusted; nothing is written to the cassette directory."""


# -- sandbox recipes: how to make the sandbox produce each scenario ---------------


@dataclass(frozen=True)
class FaultSpec:
    endpoint: str
    status: int
    retry_after: int | None = None
    count: int = 1


@dataclass(frozen=True)
class Recipe:
    faults: tuple[FaultSpec, ...] = ()
    wrong_client_secret: bool = False
    consume_code_first: bool = False
    # Sanity checks on what the gateway answered and how many calls were recorded.
    expect_status: int = 302
    expect_interactions: int = 2


RECIPES: dict[str, Recipe] = {
    "success": Recipe(),
    "partial_scopes": Recipe(),
    "access_denied": Recipe(expect_status=400, expect_interactions=0),
    "invalid_code": Recipe(consume_code_first=True, expect_status=400, expect_interactions=1),
    "invalid_client": Recipe(wrong_client_secret=True, expect_status=400, expect_interactions=1),
    "token_server_error": Recipe(
        faults=(FaultSpec("token", 500),), expect_status=503, expect_interactions=1
    ),
    "token_rate_limited": Recipe(
        faults=(FaultSpec("token", 429, retry_after=7),), expect_status=503, expect_interactions=1
    ),
    "userinfo_unauthorized": Recipe(faults=(FaultSpec("userinfo", 401),), expect_status=503),
    "userinfo_retry_then_ok": Recipe(faults=(FaultSpec("userinfo", 500),), expect_interactions=3),
}


@dataclass(frozen=True)
class AccountRecipe:
    faults: tuple[FaultSpec, ...] = ()
    # The user removes the app in TikTok first, so the refresh token is refused.
    revoke_user_first: bool = False
    # Seconds the sandbox's clock moves between connecting and the recorded call.
    sandbox_time_passes: int = 0
    expect_status: int = 200
    expect_interactions: int = 1


ONE_DAY = 86400

ACCOUNT_RECIPES: dict[str, AccountRecipe] = {
    # A day after connecting: the answer carries what remains of the refresh token's
    # lifetime (a refresh does not restart it), not a fresh 180 days.
    "refresh_rotated": AccountRecipe(sandbox_time_passes=ONE_DAY),
    "refresh_refused": AccountRecipe(revoke_user_first=True, expect_status=409),
    "revoke_ok": AccountRecipe(),
    # Answered 200 with revokedAtTikTok false, after the gateway's 3 attempts.
    "revoke_failed": AccountRecipe(
        faults=(FaultSpec("revoke", 500, count=3),), expect_interactions=3
    ),
}
# Longer than the sandbox's access-token lifetime: the token is due at once, so the
# access-token endpoint refreshes (the gateway judges by its own clock, not the sandbox's).
ALWAYS_DUE_SKEW_SECONDS = str(2 * ACCESS_TOKEN_TTL)


def sandbox_knobs(scenario: Scenario) -> dict[str, str]:
    """The sandbox's authorize query knobs that play the user's part."""
    if scenario.denied:
        return {"sandbox_decision": "deny"}
    if scenario.granted_scopes != scenario.requested_scopes:
        return {"sandbox_grant": ",".join(scenario.granted_scopes)}
    return {}


# -- scrubbing ----------------------------------------------------------------------


@dataclass
class Scrubber:
    """vcrpy hooks that make one recording safe and target-independent.

    Every real value replaced on the way is remembered, with what it was, so the
    written cassettes can be scanned for it afterwards.
    """

    api_base_url: str
    # The scenario's fake code; None when no code is sent (account scenarios).
    code: str | None = None
    client_key: str = CLIENT_KEY
    redirect_uri: str = REDIRECT_URI
    seen: dict[str, str] = field(default_factory=dict)

    def remember(self, value: str | None, label: str) -> None:
        if value and len(value) >= MIN_SECRET_LENGTH and value not in self._fakes():
            self.seen.setdefault(value, label)

    def _fakes(self) -> set[str]:
        fakes = {*FILTERED_FORM_FIELDS.values(), *FAKE_TOKENS.values()}
        return fakes | {self.code} if self.code else fakes

    def _records(self, request: Request) -> bool:
        # vcrpy applies this hook twice to one request (can_play_response_for, then
        # matching), so an already-rewritten URI must pass again unchanged.
        target = urlsplit(request.uri)
        origins = {_origin(self.api_base_url), _origin(TIKTOK_API_BASE_URL)}
        return _origin(request.uri) in origins and target.path in API_PATHS

    def request(self, request: Request) -> Request | None:
        if not self._records(request):
            return None  # the authorize page or the gateway itself: not TikTok's API
        headers = {}
        for name, value in request.headers.items():
            if name.lower() in {h.lower() for h in FILTERED_HEADERS}:
                if name.lower() == "authorization":
                    self.remember(value.partition(" ")[2], "access token (Authorization)")
                continue
            headers[name] = value
        request.headers = headers
        request.uri = _rebased(request.uri, self.api_base_url)
        if is_form(request) and request.body:
            request.body = urlencode(self._scrub_form(request.body))
        return request

    def _scrub_form(self, body: bytes | str) -> list[tuple[str, str]]:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        scrubbed = []
        for name, value in parse_qsl(text, keep_blank_values=True):
            if name in FILTERED_FORM_FIELDS:
                self.remember(value, name)
                value = FILTERED_FORM_FIELDS[name]
            elif name == "code":
                self.remember(value, "authorization code")
                value = self.code or FILTERED_VALUE
            elif name == "client_key":
                value = self.client_key
            elif name == "redirect_uri":
                value = self.redirect_uri
            scrubbed.append((name, value))
        return scrubbed

    def response(self, response: dict[str, Any]) -> dict[str, Any]:
        raw_headers = response.get("headers") or {}
        items = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
        kept = {h.lower(): h for h in KEPT_RESPONSE_HEADERS}
        response["headers"] = {
            kept[name.lower()]: list(values) for name, values in items if name.lower() in kept
        }
        body = response["body"]["string"]
        if isinstance(body, str):
            body = body.encode("utf-8")
        try:
            data = json.loads(body or b"")
        except ValueError:
            data = None
        if isinstance(data, dict) and self._fake_tokens(data):
            body = json.dumps(data).encode("utf-8")
        for value in sorted(self.seen, key=len, reverse=True):
            body = body.replace(value.encode("utf-8"), FILTERED_VALUE.encode("utf-8"))
        response["body"]["string"] = body
        if isinstance(response.get("url"), str):
            response["url"] = _rebased(response["url"], self.api_base_url)
        return response

    def _fake_tokens(self, data: Any) -> bool:
        changed = False
        if isinstance(data, dict):
            for key, value in data.items():
                if key in FAKE_TOKENS and isinstance(value, str) and value != FAKE_TOKENS[key]:
                    self.remember(value, key)
                    data[key] = FAKE_TOKENS[key]
                    changed = True
                else:
                    changed = self._fake_tokens(value) or changed
        elif isinstance(data, list):
            for item in data:
                changed = self._fake_tokens(item) or changed
        return changed


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _rebased(url: str, api_base_url: str) -> str:
    """``url`` on TikTok's API origin instead of ``api_base_url`` (e.g. the sandbox)."""
    base = api_base_url.rstrip("/")
    if url.startswith(base + "/"):
        return TIKTOK_API_BASE_URL + url[len(base) :]
    return url


def scan_for_leaks(paths: Iterable[Path], secrets_seen: dict[str, str]) -> list[str]:
    """Problems found: a file holding a recorded real value, raw or URL-encoded."""
    problems = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for value, label in secrets_seen.items():
            forms = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}
            if any(form in text for form in forms):
                problems.append(f"{path.name}: contains a real {label}")
    return problems


# -- the in-process gateway and its product backend ------------------------------------

# Throwaway, per run: the gateway lives only while recording, and none of these
# reaches TikTok (so none can reach a cassette).
_STATE_SECRET = secrets.token_urlsafe(48)
_AUTH_SECRET = secrets.token_urlsafe(48)
_PRODUCT_ORIGIN = "https://app.example.com"
PRODUCT_REDIRECT = _PRODUCT_ORIGIN + "/settings/connections"


def recording_config(client_secret: str, **settings: str | None) -> Config:
    """The gateway with the cassettes' client key and redirect URI, ``client_secret``,
    fresh secrets of its own, and ``settings`` on top (``None`` leaves one unset)."""
    environ = {
        "TIKTOK_CLIENT_KEY": CLIENT_KEY,
        "TIKTOK_CLIENT_SECRET": client_secret,
        "TIKTOK_REDIRECT_URI": REDIRECT_URI,
        "STATE_SECRET": _STATE_SECRET,
        "AUTH_JWT_SECRET": _AUTH_SECRET,
        "ALLOWED_REDIRECT_ORIGINS": _PRODUCT_ORIGIN,
        "TOKEN_ENCRYPTION_KEYS": "record:" + base64.b64encode(os.urandom(32)).decode(),
    }
    environ |= {name: value for name, value in settings.items() if value is not None}
    return load_config(environ)


def bearer(**claims: Any) -> dict[str, str]:
    """What the product backend sends the recording gateway."""
    now = int(time.time())
    payload = {"sub": "recorder", "iat": now, "exp": now + 600, **claims}
    return {"Authorization": "Bearer " + jwt.encode(payload, _AUTH_SECRET, algorithm="HS256")}


# -- driving the gateway like a browser ---------------------------------------------


def running_gateway(
    config: Config, store: MemoryStore | None = None
) -> contextlib.AbstractAsyncContextManager[str]:
    """The gateway on a free loopback port, yielding its base URL."""
    # The in-memory store, chosen explicitly (make_app would warn about it).
    return serving(make_app(config, store=store or MemoryStore(config.cipher())))


async def start_authorization(gateway_url: str, scopes: Iterable[str]) -> dict[str, Any]:
    response = await AsyncHTTPClient().fetch(
        f"{gateway_url}/oauth/tiktok/authorize",
        method="POST",
        headers={**bearer(), "Content-Type": "application/json"},
        body=json.dumps({"redirectUri": PRODUCT_REDIRECT, "scopes": list(scopes)}),
        raise_error=False,
    )
    if response.code != 200:
        raise RecordingError(f"the gateway's authorize endpoint answered {response.code}")
    return json.loads(response.body)


async def consent(authorization_url: str, knobs: dict[str, str], redirect_uri: str) -> str:
    """Open the authorization URL like a browser; return the callback query it redirects to."""
    response = await AsyncHTTPClient().fetch(
        url_concat(authorization_url, knobs), follow_redirects=False, raise_error=False
    )
    location = response.headers.get("Location", "")
    if response.code != 302 or not location.startswith(redirect_uri + "?"):
        raise RecordingError(f"the authorize page answered {response.code}, not a redirect")
    return urlsplit(location).query


async def record_callback(
    gateway_url: str, query: str, path: Path, scrubber: Scrubber
) -> tuple[HTTPResponse, int]:
    """GET the callback on the gateway while recording its calls to TikTok into ``path``."""
    return await record_request(
        HTTPRequest(f"{gateway_url}{CALLBACK_PATH}?{query}", follow_redirects=False),
        path,
        scrubber,
    )


async def record_request(
    request: HTTPRequest, path: Path, scrubber: Scrubber
) -> tuple[HTTPResponse, int]:
    """Send ``request`` to the gateway while recording its calls to TikTok into ``path``."""
    recorder = tiktok_vcr(
        cassette_library_dir=str(path.parent),
        record_mode="all",
        ignore_localhost=False,  # the sandbox is on loopback too; Scrubber.request picks
        filter_headers=(),  # Scrubber drops them, after noting what they held
        before_record_request=scrubber.request,
        before_record_response=scrubber.response,
        drop_unused_requests=True,
    )
    path.unlink(missing_ok=True)  # a fresh file per scenario
    with recorder.use_cassette(path.name) as cassette:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        recorded = len(cassette)
    if not path.exists():
        # vcrpy saves nothing for zero interactions; the empty cassette must exist anyway.
        path.write_text(serialize({"requests": [], "responses": []}, yamlserializer))
    return response, recorded


def callback_state(query: str) -> str | None:
    return dict(parse_qsl(query)).get("state")


def recording_sandbox(client_secret: str, **settings: str | None) -> tuple[Sandbox, Config]:
    """A sandbox on a free port that knows ``client_secret``, and a gateway config for it
    (``settings`` on top; ``TIKTOK_CLIENT_SECRET`` among them to give the gateway another)."""
    # Frozen clock: lifetimes in the answers do not depend on how long recording takes.
    sandbox = Sandbox(
        [SandboxClient(CLIENT_KEY, client_secret, [REDIRECT_URI])], clock=lambda: 0.0
    )
    sandbox_url = f"http://127.0.0.1:{sandbox.listen(0)}"
    config = recording_config(
        client_secret,
        TIKTOK_API_BASE_URL=sandbox_url,
        TIKTOK_AUTHORIZE_URL=sandbox_url + SANDBOX_AUTHORIZE_PATH,
        **settings,
    )
    return sandbox, config


def add_faults(sandbox: Sandbox, faults: tuple[FaultSpec, ...]) -> None:
    for fault in faults:
        sandbox.add_fault(
            fault.endpoint, status=fault.status, retry_after=fault.retry_after, count=fault.count
        )


def check_recorded(
    name: str, recipe: Recipe | AccountRecipe, response: HTTPResponse, recorded: int
) -> None:
    """The gateway answered what the recipe expects after as many TikTok calls."""
    if (response.code, recorded) != (recipe.expect_status, recipe.expect_interactions):
        raise RecordingError(
            f"{name}: the gateway answered {response.code} after {recorded} TikTok "
            f"call(s); expected {recipe.expect_status} after {recipe.expect_interactions}"
        )
    log.info("%s: %d -> %d interaction(s)", name, response.code, recorded)


# -- the two targets ----------------------------------------------------------------


async def record_sandbox_scenario(scenario: Scenario, out_dir: Path) -> dict[str, str]:
    recipe = RECIPES[scenario.name]
    client_secret = "record-secret-" + secrets.token_hex(16)
    gateway_secret = (
        "wrong-secret-" + secrets.token_hex(16) if recipe.wrong_client_secret else client_secret
    )
    sandbox, config = recording_sandbox(client_secret, TIKTOK_CLIENT_SECRET=gateway_secret)
    scrubber = Scrubber(config.tiktok_api_base_url, fake_code(scenario.name))
    scrubber.remember(client_secret, "client secret")
    scrubber.remember(gateway_secret, "client secret")
    try:
        async with running_gateway(config) as gateway_url:
            started = await start_authorization(gateway_url, scenario.requested_scopes)
            query = await consent(
                started["authorizationUrl"], sandbox_knobs(scenario), config.tiktok_redirect_uri
            )
            params = dict(parse_qsl(query))
            if params.get("state") != started["state"]:
                raise RecordingError("the sandbox redirected with another state")
            if not scenario.denied and params.get("scopes") != ",".join(scenario.granted_scopes):
                raise RecordingError(
                    f"the sandbox granted {params.get('scopes')!r}, the scenario says "
                    f"{','.join(scenario.granted_scopes)!r}"
                )
            scrubber.remember(params.get("code"), "authorization code")
            if recipe.consume_code_first:
                # Use the code once (not recorded), then present it with a fresh state.
                first = await AsyncHTTPClient().fetch(
                    f"{gateway_url}{CALLBACK_PATH}?{query}",
                    follow_redirects=False,
                    raise_error=False,
                )
                if first.code != 302:
                    raise RecordingError(f"consuming the code answered {first.code}")
                again = await start_authorization(gateway_url, scenario.requested_scopes)
                query = urlencode({**params, "state": again["state"]})
            add_faults(sandbox, recipe.faults)
            response, recorded = await record_callback(
                gateway_url, query, cassette_path(scenario.name, out_dir), scrubber
            )
    finally:
        await sandbox.close()
    check_recorded(scenario.name, recipe, response, recorded)
    return scrubber.seen


async def connect_account(gateway_url: str, redirect_uri: str) -> str:
    """Connect the sandbox's user through the whole flow (not recorded); its account id."""
    started = await start_authorization(gateway_url, ("user.info.basic",))
    query = await consent(started["authorizationUrl"], {}, redirect_uri)
    response = await AsyncHTTPClient().fetch(
        f"{gateway_url}{CALLBACK_PATH}?{query}", follow_redirects=False, raise_error=False
    )
    if response.code != 302:
        raise RecordingError(f"connecting the account answered {response.code}")
    listed = await AsyncHTTPClient().fetch(
        f"{gateway_url}/accounts", headers=bearer(), raise_error=False
    )
    accounts = json.loads(listed.body).get("accounts") if listed.code == 200 else None
    if not accounts or len(accounts) != 1:
        raise RecordingError(f"GET /accounts answered {listed.code}, not one account")
    return str(accounts[0]["id"])


def account_request(gateway_url: str, scenario: AccountScenario, account_id: str) -> HTTPRequest:
    """The product backend's call that makes the gateway talk to TikTok."""
    if scenario.endpoint == "refresh":
        return HTTPRequest(
            f"{gateway_url}/accounts/{account_id}/access-token",
            method="POST",
            body=b"",
            headers=bearer(scope=TOKENS_SCOPE),
        )
    return HTTPRequest(f"{gateway_url}/accounts/{account_id}", method="DELETE", headers=bearer())


async def record_sandbox_account_scenario(
    scenario: AccountScenario, out_dir: Path
) -> dict[str, str]:
    recipe = ACCOUNT_RECIPES[scenario.name]
    client_secret = "record-secret-" + secrets.token_hex(16)
    sandbox, config = recording_sandbox(
        client_secret,
        REFRESH_SKEW_SECONDS=ALWAYS_DUE_SKEW_SECONDS if scenario.endpoint == "refresh" else None,
    )
    scrubber = Scrubber(config.tiktok_api_base_url)
    scrubber.remember(client_secret, "client secret")
    store = MemoryStore(config.cipher())
    try:
        async with running_gateway(config, store) as gateway_url:
            account_id = await connect_account(gateway_url, config.tiktok_redirect_uri)
            tokens = await store.get_account_tokens(account_id)
            if tokens is None:
                raise RecordingError("the connected account has no tokens")
            scrubber.remember(tokens.access_token, "access token")
            scrubber.remember(tokens.refresh_token, "refresh token")
            if recipe.revoke_user_first:
                sandbox.revoke_all_for(sandbox.users[0].open_id)
            sandbox.advance_clock(recipe.sandbox_time_passes)
            add_faults(sandbox, recipe.faults)
            response, recorded = await record_request(
                account_request(gateway_url, scenario, account_id),
                cassette_path(scenario.name, out_dir),
                scrubber,
            )
    finally:
        await sandbox.close()
    check_recorded(scenario.name, recipe, response, recorded)
    return scrubber.seen


async def record_tiktok_scenario(
    scenario: Scenario, out_dir: Path, client_key: str, client_secret: str, redirect_uri: str
) -> dict[str, str]:
    """Real TikTok: the operator plays the browser; the recording path is the same."""
    config = recording_config(
        client_secret, TIKTOK_CLIENT_KEY=client_key, TIKTOK_REDIRECT_URI=redirect_uri
    )
    scrubber = Scrubber(config.tiktok_api_base_url, fake_code(scenario.name))
    scrubber.remember(client_secret, "client secret")
    async with running_gateway(config) as gateway_url:
        started = await start_authorization(gateway_url, scenario.requested_scopes)
        print(
            f"\nScenario {scenario.name!r} ({scenario.summary}).\n"
            f"1. Open this URL in a browser signed in to a TikTok test account:\n\n"
            f"   {started['authorizationUrl']}\n\n"
            f"2. Consent as the scenario needs. TikTok then sends the browser to\n"
            f"   {redirect_uri}?code=...; the page may fail to load, that is fine.\n"
            f"3. Paste that whole URL from the address bar here, quickly (codes are short-lived).",
            flush=True,
        )
        try:
            pasted = (await asyncio.to_thread(input, "\nCallback URL: ")).strip()
        except EOFError:
            raise RecordingError("no callback URL was pasted") from None
        if not pasted.startswith(redirect_uri + "?"):
            raise RecordingError(f"expected a URL starting with {redirect_uri}?")
        query = urlsplit(pasted).query
        if callback_state(query) != started["state"]:
            raise RecordingError("that callback URL belongs to another authorization attempt")
        scrubber.remember(dict(parse_qsl(query)).get("code"), "authorization code")
        response, recorded = await record_callback(
            gateway_url, query, cassette_path(scenario.name, out_dir), scrubber
        )
    print(f"The gateway answered {response.code} after {recorded} TikTok call(s).", flush=True)
    return scrubber.seen


async def record(args: argparse.Namespace, out_dir: Path) -> dict[str, str]:
    seen: dict[str, str] = {}
    try:
        for name in args.scenarios:
            if args.target == "tiktok":
                secret = os.environ.get(args.client_secret_env, "")
                seen |= await record_tiktok_scenario(
                    SCENARIOS[name], out_dir, args.client_key, secret, args.redirect_uri
                )
            elif name in ACCOUNT_SCENARIOS:
                seen |= await record_sandbox_account_scenario(ACCOUNT_SCENARIOS[name], out_dir)
            else:
                seen |= await record_sandbox_scenario(SCENARIOS[name], out_dir)
    finally:
        AsyncHTTPClient().close()
    return seen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Record the TikTok cassettes (default: from the in-process sandbox)."
    )
    parser.add_argument("--target", choices=("sandbox", "tiktok"), default="sandbox")
    parser.add_argument(
        "--scenario",
        action="append",
        dest="scenarios",
        choices=sorted(CASSETTE_NAMES),
        help="record only this scenario (repeatable); default: all (sandbox), success (tiktok)",
    )
    parser.add_argument("--cassette-dir", type=Path, default=CASSETTE_DIR)
    parser.add_argument("--client-key", help="tiktok: your app's client key")
    parser.add_argument(
        "--client-secret-env", help="tiktok: NAME of the environment variable holding the secret"
    )
    parser.add_argument("--redirect-uri", help="tiktok: the redirect URI registered with TikTok")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.target == "tiktok":
        missing = [
            flag
            for flag, value in (
                ("--client-key", args.client_key),
                ("--client-secret-env", args.client_secret_env),
                ("--redirect-uri", args.redirect_uri),
            )
            if not value
        ]
        if missing:
            parser.error(f"--target tiktok needs {', '.join(missing)}")
        if not os.environ.get(args.client_secret_env or ""):
            parser.error(f"the environment variable {args.client_secret_env} is empty or unset")
        args.scenarios = args.scenarios or ["success"]
        sandbox_only = sorted(set(args.scenarios) & set(ACCOUNT_SCENARIOS))
        if sandbox_only:
            parser.error(f"--target tiktok records callbacks only, not {', '.join(sandbox_only)}")
    else:
        args.scenarios = args.scenarios or list(CASSETTE_NAMES)
    return args


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s %(message)s",
    )
    # vcrpy logs whole unfiltered responses (tokens included) at INFO.
    logging.getLogger("vcr").setLevel(logging.WARNING)
    if not verbose:
        # The scenarios provoke errors on purpose; their logs are noise unless asked for.
        for name in ("gateway", "sandbox", "tornado"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def run(args: argparse.Namespace) -> int:
    """Record into a temporary directory, scan, and only then move into place."""
    if set(RECIPES) != set(SCENARIOS) or set(ACCOUNT_RECIPES) != set(ACCOUNT_SCENARIOS):
        raise SystemExit("record_cassettes: the recipes and cassette_scenarios' scenarios disagree")
    target_dir: Path = args.cassette_dir
    with tempfile.TemporaryDirectory(prefix="cassettes-") as tmp:
        out_dir = Path(tmp)
        try:
            seen = asyncio.run(record(args, out_dir))
        except (RecordingError, ConfigError) as exc:
            print(
                f"record_cassettes: {exc}; nothing was written (-v shows the logs)",
                file=sys.stderr,
            )
            return 1
        written = sorted(out_dir.glob("*.yaml"))
        problems = scan_for_leaks(written, seen)
        if problems:
            print(
                "record_cassettes: SECRET LEAK, nothing was written:\n  " + "\n  ".join(problems),
                file=sys.stderr,
            )
            return 1
        target_dir.mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.move(path, target_dir / path.name)
    # Belt and braces: scan the files where they now are, and remove them on a hit.
    in_place = [target_dir / path.name for path in written]
    problems = scan_for_leaks(in_place, seen)
    if problems:
        for path in in_place:
            path.unlink(missing_ok=True)
        print(
            "record_cassettes: SECRET LEAK, removed:\n  " + "\n  ".join(problems),
            file=sys.stderr,
        )
        return 1
    print(
        f"recorded {len(written)} cassette(s) into {target_dir} "
        f"({len(seen)} real secret/code/token value(s) scrubbed and scanned for)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

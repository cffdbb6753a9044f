"""A local stand-in for TikTok's OAuth 2.0 and user-info API, served by Tornado.

Paths match TikTok's, so a client only swaps its base URLs. Query parameters
and ``/sandbox/...`` endpoints that TikTok does not have are the test controls.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.httputil import url_concat

from sandbox import pages
from sandbox.state import (
    ACCESS_TOKEN_TTL,
    KNOWN_SCOPES,
    REFRESH_TOKEN_TTL,
    SCOPE_DESCRIPTIONS,
    SCOPE_OF_FIELD,
    OAuthError,
    SandboxClient,
    SandboxState,
    SandboxUser,
    default_users,
    redact,
)

log = logging.getLogger("sandbox")

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
FAULT_ENDPOINTS = ("token", "userinfo", "revoke")
STAT_KEYS = (
    "authorize",
    "token",
    "token_authorization_code",
    "token_refresh",
    "userinfo",
    "revoke",
    "connections",
    # User-info calls refused with 429 rate_limit_exceeded by ``user_info_rate_limit``.
    "userinfo_rate_limited",
)
_GRANT_STATS = {"authorization_code": "token_authorization_code", "refresh_token": "token_refresh"}
CONSENT_MODES = ("auto", "page")
AUTHORIZE_PATH = "/v2/auth/authorize/"
WEBHOOK_SIGNATURE_HEADER = "TikTok-Signature"
AUTHORIZATION_REMOVED = "authorization.removed"
REMOVAL_REASONS = range(6)  # 0 unknown ... 5 developer revoked (TIKTOK_API.md)
DECISION_PATH = "/v2/auth/authorize/decision"

# Parameters the consent page carries through to its POST, so the decision
# handler can validate them again (hidden fields are user-editable).
_CARRIED_PARAMS = (
    "client_key",
    "response_type",
    "scope",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "disable_auto_auth",
    "sandbox_grant",
    "sandbox_user",
)

# Default error codes for injected faults without a body, per response style.
_FLAT_FAULT_CODES = {
    400: "invalid_request",
    401: "invalid_client",
    429: "temporarily_unavailable",
    503: "temporarily_unavailable",
}
_ENVELOPE_FAULT_CODES = {
    400: "invalid_params",
    401: "access_token_invalid",
    429: "rate_limit_exceeded",
}


@dataclass(frozen=True)
class RateLimit:
    """TikTok's per-app limit on one endpoint: ``calls`` in any sliding ``seconds``."""

    calls: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``600/60`` or ``600/60s``: 600 calls in any 60-second window."""
        calls, _, seconds = text.strip().partition("/")
        try:
            limit = cls(int(calls), float(seconds.removesuffix("s")))
        except ValueError:
            raise ValueError(f"a rate limit is CALLS/SECONDS, e.g. 600/60s, not {text!r}") from None
        if limit.calls < 1 or limit.seconds <= 0:
            raise ValueError(f"a rate limit needs calls >= 1 and seconds > 0, not {text!r}")
        return limit

    def __str__(self) -> str:
        return f"{self.calls}/{self.seconds:g}s"


def new_log_id() -> str:
    return secrets.token_hex(16)


def webhook_signature(body: bytes, client_secret: str, timestamp: int) -> str:
    """TikTok's header value: ``t=<unix>,s=<hex HMAC-SHA256 of "<t>.<body>">``."""
    signed = str(timestamp).encode() + b"." + body
    digest = hmac.new(client_secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},s={digest}"


@dataclass
class Fault:
    status: int
    body: str | None
    delay: float
    count: int
    retry_after: int | None


@dataclass
class _AuthorizeRequest:
    client: SandboxClient
    redirect_uri: str
    state: str
    code_challenge: str | None
    granted: list[str]
    requested: list[str]
    user: SandboxUser
    carried: list[tuple[str, str]]


class _PageError(Exception):
    """A misconfigured authorize request: TikTok shows an error page, never redirects."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class SandboxServer(tornado.httpserver.HTTPServer):
    """An HTTPServer that counts the TCP connections it accepts (for the benchmark)."""

    stats: dict[str, int]
    port: int

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        self.stats["connections"] += 1
        super().handle_stream(stream, address)


class Sandbox:
    """TikTok's OAuth + user-info API for one process: state, fault injection, counters."""

    # Answer a successful revoke with an empty body, as TikTok's revoke page describes,
    # instead of the older page's {} (tests set it on the instance).
    revoke_empty_body = False

    def __init__(
        self,
        clients: list[SandboxClient],
        users: list[SandboxUser] | None = None,
        *,
        pkce: str = "hex",
        consent: str = "auto",
        latency: float = 0.0,
        access_ttl: int = ACCESS_TOKEN_TTL,
        refresh_ttl: int = REFRESH_TOKEN_TTL,
        code_ttl: int = 300,
        revoke_empty_body: bool = False,
        clock: Callable[[], float] = time.monotonic,
        user_info_rate_limit: RateLimit | None = None,
    ) -> None:
        """``revoke_empty_body``: answer a successful revoke with an empty body, as
        TikTok's revoke page describes, instead of the older page's ``{}``. ``clock``:
        seconds, monotonic; a frozen one makes recorded lifetimes reproducible.
        ``user_info_rate_limit``: enforce TikTok's per-app limit on ``/v2/user/info/``
        (600 calls in any sliding minute) with its 429 ``rate_limit_exceeded``; None:
        no limit. Calls count when they arrive; refused ones do not count."""
        if consent not in CONSENT_MODES:
            raise ValueError(f"consent must be one of {', '.join(CONSENT_MODES)}, not {consent!r}")
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.state = SandboxState(
            clients,
            users if users is not None else default_users(),
            pkce=pkce,
            access_ttl=access_ttl,
            refresh_ttl=refresh_ttl,
            code_ttl=code_ttl,
            clock=clock,
        )
        # Minting a code as approving the consent page would: the state's own method.
        self.issue_code = self.state.issue_code
        self.revoke_empty_body = revoke_empty_body
        self.consent = consent
        self.latency = latency
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.user_info_rate_limit = user_info_rate_limit
        # Arrival times (``clock``) of the user-info calls the limit admitted, in its window.
        self._user_info_window: deque[float] = deque()
        # Arrival times (``clock``) of every user-info call, for benchmarks
        # (GET /sandbox/user-info-calls); cleared with the stats.
        self.user_info_calls: list[float] = []
        self._faults: dict[str, deque[Fault]] = {name: deque() for name in FAULT_ENDPOINTS}
        self._servers: list[SandboxServer] = []
        # (url, event, user_openid, HTTP status) of every webhook sent, oldest first.
        self.sent_webhooks: list[tuple[str, str, str, int]] = []

    @property
    def pkce(self) -> str:
        return self.state.pkce

    @property
    def clients(self) -> list[SandboxClient]:
        return list(self.state.clients.values())

    @property
    def users(self) -> list[SandboxUser]:
        return list(self.state.users.values())

    # -- test controls --------------------------------------------------------

    def add_fault(
        self,
        endpoint: str,
        *,
        status: int = 500,
        body: str | None = None,
        delay: float = 0.0,
        count: int = 1,
        retry_after: int | None = None,
    ) -> None:
        """Make the next ``count`` calls to ``endpoint`` fail (or, with status 200 and no
        body, merely answer late after ``delay``)."""
        if endpoint not in FAULT_ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(FAULT_ENDPOINTS)}")
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        if count < 1 or delay < 0:
            raise ValueError("count must be >= 1 and delay >= 0")
        self._faults[endpoint].append(Fault(status, body, delay, count, retry_after))

    def clear_faults(self) -> None:
        for queue in self._faults.values():
            queue.clear()

    def pending_faults(self) -> dict[str, list[dict[str, Any]]]:
        return {name: [asdict(f) for f in queue] for name, queue in self._faults.items()}

    def take_fault(self, endpoint: str) -> Fault | None:
        queue = self._faults[endpoint]
        if not queue:
            return None
        fault = queue[0]
        fault.count -= 1
        if fault.count <= 0:
            queue.popleft()
        return fault

    def reset_stats(self) -> None:
        # In place, so callers holding ``sandbox.stats`` see the reset.
        for key in self.stats:
            self.stats[key] = 0
        self.user_info_calls.clear()

    def admit_user_info(self) -> bool:
        """Record a user-info call arriving now; False when it is over the rate limit."""
        now = self.state.now()
        self.user_info_calls.append(now)
        limit = self.user_info_rate_limit
        if limit is None:
            return True
        window = self._user_info_window
        while window and window[0] <= now - limit.seconds:
            window.popleft()
        if len(window) >= limit.calls:
            self.stats["userinfo_rate_limited"] += 1
            return False
        window.append(now)
        return True

    def advance_clock(self, seconds: float) -> None:
        """Move the sandbox's clock forward, e.g. to expire codes or access tokens."""
        self.state.clock_offset += seconds

    def revoke_all_for(self, open_id: str) -> None:
        """Invalidate every token of this user, as if they removed the app in TikTok."""
        count = self.state.revoke_all_for(open_id)
        log.info("revoked %d grant(s) for %s", count, open_id)

    async def send_webhook(
        self,
        url: str,
        event: str,
        user_openid: str,
        content: dict[str, Any] | str,
        *,
        client_key: str | None = None,
        client_secret: str | None = None,
        timestamp: int | None = None,
        signature: str | None = None,
        create_time: int | None = None,
    ) -> int:
        """POST one webhook delivery as TikTok does; returns the HTTP status (599: no answer).

        The body is TikTok's documented JSON, ``content`` serialized into a string.
        ``client_key``/``client_secret`` default to the first registered client. For
        bad deliveries pass another ``client_secret``, an old ``timestamp``, or the
        whole header value as ``signature`` (an empty string sends no header).
        """
        client = self.clients[0]
        if client_key is not None:
            client = self.state.clients.get(client_key) or SandboxClient(client_key, "", [])
        now = int(time.time())
        body = json.dumps(
            {
                "client_key": client.client_key,
                "event": event,
                "create_time": now if create_time is None else create_time,
                "user_openid": user_openid,
                "content": content if isinstance(content, str) else json.dumps(content),
            }
        ).encode()
        if signature is None:
            signature = webhook_signature(
                body,
                client.client_secret if client_secret is None else client_secret,
                now if timestamp is None else timestamp,
            )
        headers = {"Content-Type": "application/json"}
        if signature:
            headers[WEBHOOK_SIGNATURE_HEADER] = signature
        try:
            response = await AsyncHTTPClient().fetch(
                url, method="POST", body=body, headers=headers, raise_error=False,
                request_timeout=10.0,
            )
            status = response.code
        except HTTPClientError as exc:  # timeouts and dropped connections (599)
            status = exc.code
        except OSError:
            status = 599
        self.sent_webhooks.append((url, event, user_openid, status))
        log.info("webhook %s for %s -> %d", event, user_openid, status)
        return status

    # -- serving --------------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        handlers: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
            (path, handler, {"sandbox": self})
            for path, handler in (
                (AUTHORIZE_PATH, AuthorizeHandler),
                (DECISION_PATH, DecisionHandler),
                ("/v2/oauth/token/", TokenHandler),
                ("/v2/oauth/revoke/", RevokeHandler),
                ("/v2/user/info/", UserInfoHandler),
                ("/sandbox/stats", StatsHandler),
                ("/sandbox/user-info-calls", UserInfoCallsHandler),
                ("/sandbox/reset-stats", ResetStatsHandler),
                ("/sandbox/faults", FaultsHandler),
                ("/sandbox/revoke-user", RevokeUserHandler),
                ("/sandbox/clock", ClockHandler),
                ("/sandbox/webhooks", WebhookHandler),
            )
        ]
        # xsrf stays off: TikTok's endpoints are called by other servers and forms.
        return tornado.web.Application(handlers, xsrf_cookies=False, log_function=_log_request)

    def serve(self, port: int = 0, address: str = "127.0.0.1") -> SandboxServer:
        """Listen on ``address:port`` (0 = any free port, see ``.port``), counting connections."""
        sockets = tornado.netutil.bind_sockets(port, address)
        server = SandboxServer(self.make_app())
        server.stats = self.stats
        server.port = sockets[0].getsockname()[1]
        server.add_sockets(sockets)
        self._servers.append(server)
        return server

    def listen(self, port: int = 0, address: str = "127.0.0.1") -> int:
        """Like ``serve`` but returns the bound port."""
        return self.serve(port, address).port

    async def close(self) -> None:
        """Stop every server started by ``serve``/``listen`` and drop open connections."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.stop()
        for server in servers:
            await server.close_all_connections()


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # Path only: query strings carry states and challenges, and are not worth logging.
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    logging.getLogger("sandbox.access").log(
        level,
        "%d %s %s %.1fms",
        status,
        handler.request.method,
        handler.request.path,
        1000.0 * handler.request.request_time(),
    )


class _Handler(tornado.web.RequestHandler):
    sandbox: Sandbox

    def initialize(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def arg(self, name: str) -> str | None:
        # strip=False: TikTok compares values such as redirect_uri exactly.
        return self.get_argument(name, None, strip=False)

    def send_json(self, status: int, body: object) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(body))


# -- authorize ---------------------------------------------------------------


class _AuthorizeBase(_Handler):
    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def parse_authorize(self) -> _AuthorizeRequest:
        """Validate like TikTok: any problem is a _PageError, raised before any redirect."""
        state = self.sandbox.state
        client_key = self.arg("client_key")
        if not client_key:
            if self.arg("client_id"):
                raise _PageError("invalid_request", "client_id is not accepted; use client_key.")
            raise _PageError("invalid_request", "client_key is required.")
        client = state.clients.get(client_key)
        if client is None:
            raise _PageError("invalid_client", "client_key is not a registered app.")
        redirect_uri = self.arg("redirect_uri")
        if redirect_uri is None or redirect_uri not in client.redirect_uris:
            raise _PageError(
                "invalid_request", "redirect_uri must exactly match a registered redirect URI."
            )
        if self.arg("response_type") != "code":
            raise _PageError("unsupported_response_type", "response_type must be code.")
        scope_text = self.arg("scope")
        if not scope_text:
            raise _PageError("invalid_scope", "scope is required.")
        requested = list(dict.fromkeys(scope_text.split(",")))
        unknown = [s for s in requested if s not in KNOWN_SCOPES]
        if unknown:
            raise _PageError(
                "invalid_scope",
                f"Unknown scope(s): {', '.join(map(repr, unknown))} (scopes are comma-separated).",
            )
        oauth_state = self.arg("state")
        if not oauth_state:
            raise _PageError("invalid_request", "state is required.")
        challenge = self.arg("code_challenge")
        problem = state.check_challenge(challenge, self.arg("code_challenge_method"))
        if problem:
            raise _PageError("invalid_request", problem)
        try:
            user = state.user(self.arg("sandbox_user"))
        except ValueError as exc:
            raise _PageError("invalid_request", str(exc)) from None
        granted = requested
        grant_text = self.arg("sandbox_grant")
        if grant_text is not None:
            granted = [s for s in requested if s in grant_text.split(",")]
            extra = set(grant_text.split(",")) - set(requested)
            if extra or not granted:
                raise _PageError(
                    "invalid_request", "sandbox_grant must be a non-empty subset of scope."
                )
        carried = [(name, value) for name in _CARRIED_PARAMS if (value := self.arg(name))]
        return _AuthorizeRequest(
            client=client,
            redirect_uri=redirect_uri,
            state=oauth_state,
            code_challenge=challenge or None,
            granted=granted,
            requested=requested,
            user=user,
            carried=carried,
        )

    def error_page(self, exc: _PageError) -> None:
        self.set_status(400)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(pages.render_error(exc.error, exc.description))

    def decide(self, request: _AuthorizeRequest, decision: str) -> None:
        if decision == "deny":
            params = [
                ("error", "access_denied"),
                ("error_description", "The user denied the authorization request."),
                ("state", request.state),
            ]
        else:
            code = self.sandbox.issue_code(
                request.client.client_key,
                request.redirect_uri,
                request.granted,
                code_challenge=request.code_challenge,
                open_id=request.user.open_id,
            )
            log.info("issued code %s for %s", redact(code), request.user.open_id)
            # scopes= reports what was granted, which may be less than what was asked.
            params = [
                ("code", code),
                ("scopes", ",".join(request.granted)),
                ("state", request.state),
            ]
        self.redirect(url_concat(request.redirect_uri, params))

    def handle(self, decision: str | None) -> None:
        try:
            request = self.parse_authorize()
            if decision not in (None, "approve", "deny"):
                raise _PageError("invalid_request", "sandbox_decision must be approve or deny.")
        except _PageError as exc:
            self.error_page(exc)
            return
        if decision is None and self.sandbox.consent == "page":
            self.consent_page(request)
        else:
            self.decide(request, decision or "approve")

    def consent_page(self, request: _AuthorizeRequest) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(
            pages.render_consent(
                app_name=request.client.app_name,
                display_name=request.user.display_name,
                scopes=[(s, SCOPE_DESCRIPTIONS[s]) for s in request.requested],
                hidden=request.carried,
                action=DECISION_PATH,
            )
        )


class AuthorizeHandler(_AuthorizeBase):
    def get(self) -> None:
        self.sandbox.stats["authorize"] += 1
        self.handle(self.arg("sandbox_decision"))


class DecisionHandler(_AuthorizeBase):
    """The consent page's Approve/Deny buttons post here."""

    def post(self) -> None:
        self.handle(self.arg("sandbox_decision") or "missing")


# -- TikTok API --------------------------------------------------------------


class _ApiHandler(_Handler):
    """Shared by token, revoke and user info: log_id, latency, faults, error bodies."""

    endpoint: ClassVar[str]
    flat_errors: ClassVar[bool] = True  # OAuth endpoints: flat; open API: data/error envelope
    log_id: str

    def set_default_headers(self) -> None:
        self.log_id = new_log_id()
        self.set_header("X-Tt-Logid", self.log_id)
        self.set_header("Cache-Control", "no-store")

    def count(self) -> None:
        self.sandbox.stats[self.endpoint] += 1

    def admit(self) -> bool:
        """Whether TikTok's rate limit lets this call through (only user info has one)."""
        return True

    async def prepare(self) -> None:
        self.count()
        if not self.admit():
            self.send_json(429, self.error_body(
                "rate_limit_exceeded",
                "The API rate limit was exceeded. Please try again later.",
            ))
            return
        if self.sandbox.latency:
            await asyncio.sleep(self.sandbox.latency)
        fault = self.sandbox.take_fault(self.endpoint)
        if fault is None:
            return
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status == 200 and fault.body is None:
            return  # a slow but otherwise normal answer
        if fault.retry_after is not None:
            self.set_header("Retry-After", str(fault.retry_after))
        if fault.body is None:
            codes = _FLAT_FAULT_CODES if self.flat_errors else _ENVELOPE_FAULT_CODES
            default = "server_error" if self.flat_errors else "internal_error"
            code = codes.get(fault.status, default)
            self.send_json(fault.status, self.error_body(code, "Something went wrong. Try again."))
            return
        self.set_status(fault.status)
        looks_json = fault.body.lstrip().startswith(("{", "["))
        self.set_header("Content-Type", "application/json" if looks_json else "text/html")
        self.finish(fault.body)

    def error_body(self, code: str, message: str) -> dict[str, Any]:
        if self.flat_errors:
            return {"error": code, "error_description": message, "log_id": self.log_id}
        return {"data": {}, "error": {"code": code, "message": message, "log_id": self.log_id}}

    def answer(self, run: Callable[[], dict[str, Any]]) -> None:
        try:
            body = run()
        except OAuthError as exc:
            self.send_json(exc.status, self.error_body(exc.error, exc.description))
            return
        self.send_json(200, body)


class _FormHandler(_ApiHandler):
    """TikTok's OAuth endpoints: form-encoded POSTs authenticated by client key + secret."""

    def form(self, *names: str) -> list[str]:
        content_type = self.request.headers.get("Content-Type", "")
        # Exact match on purpose: a field report says "; charset=UTF-8" is refused.
        if content_type.strip().lower() != FORM_CONTENT_TYPE:
            raise OAuthError(
                "invalid_request", f"Content-Type must be exactly {FORM_CONTENT_TYPE}."
            )
        values = [self.get_body_argument(name, "", strip=False) for name in names]
        missing = [name for name, value in zip(names, values, strict=True) if not value]
        if missing:
            raise OAuthError(
                "invalid_request", f"Missing required parameter(s): {', '.join(missing)}."
            )
        return values


class TokenHandler(_FormHandler):
    endpoint = "token"

    def count(self) -> None:
        super().count()
        grant_type = self.get_body_argument("grant_type", "")
        key = _GRANT_STATS.get(grant_type)
        if key:
            self.sandbox.stats[key] += 1

    def post(self) -> None:
        self.answer(self.token)

    def token(self) -> dict[str, Any]:
        key, secret, grant_type = self.form("client_key", "client_secret", "grant_type")
        state = self.sandbox.state
        client = state.authenticate(key, secret)
        if grant_type == "authorization_code":
            code, redirect_uri = self.form("code", "redirect_uri")
            verifier = self.get_body_argument("code_verifier", None, strip=False)
            return state.exchange_code(client, code, redirect_uri, verifier)
        if grant_type == "refresh_token":
            (refresh_token,) = self.form("refresh_token")
            return state.refresh(client, refresh_token)
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported.")


class RevokeHandler(_FormHandler):
    endpoint = "revoke"

    def post(self) -> None:
        self.answer(self.revoke)

    def send_json(self, status: int, body: object) -> None:
        if status == 200 and self.sandbox.revoke_empty_body:
            # The only 200 here is a success; TikTok's revoke page describes it as an
            # empty body (its older page's example shows {}).
            self.set_status(200)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish()
            return
        super().send_json(status, body)

    def revoke(self) -> dict[str, Any]:
        key, secret, token = self.form("client_key", "client_secret", "token")
        client = self.sandbox.state.authenticate(key, secret)
        # Unknown tokens succeed too (RFC 7009): revoking is idempotent.
        if self.sandbox.state.revoke(client, token):
            log.info("revoked grant of token %s", redact(token))
        return {}


class UserInfoHandler(_ApiHandler):
    endpoint = "userinfo"
    flat_errors = False

    def admit(self) -> bool:
        return self.sandbox.admit_user_info()

    def get(self) -> None:
        self.answer(self.user_info)

    def user_info(self) -> dict[str, Any]:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OAuthError(
                "access_token_invalid", "Authorization: Bearer <token> is required.", 401
            )
        granted, user = self.sandbox.state.check_access(token.strip())
        fields_text = self.get_query_argument("fields", None, strip=False)
        if not fields_text:
            raise OAuthError("invalid_params", "fields is required.")
        fields = list(dict.fromkeys(fields_text.split(",")))
        unknown = [f for f in fields if f not in SCOPE_OF_FIELD]
        if unknown:
            raise OAuthError("invalid_params", f"Unknown field(s): {', '.join(unknown)}.")
        needed = sorted({SCOPE_OF_FIELD[f] for f in fields} - set(granted))
        if needed:
            raise OAuthError(
                "scope_not_authorized",
                f"The user did not authorize the scope(s) required: {', '.join(needed)}.",
                401,
            )
        return {
            "data": {"user": user.fields(fields)},
            "error": {"code": "ok", "message": "", "log_id": self.log_id},
        }


# -- sandbox controls (not TikTok's) -----------------------------------------


class _ControlHandler(_Handler):
    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise tornado.web.HTTPError(400, reason="Body is not JSON") from None
        if not isinstance(body, dict):
            raise tornado.web.HTTPError(400, reason="Body must be a JSON object")
        return body

    def bad_request(self, message: str) -> None:
        self.send_json(400, {"error": message})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.send_json(status_code, {"error": self._reason})


class StatsHandler(_ControlHandler):
    def get(self) -> None:
        self.send_json(200, self.sandbox.stats)


class UserInfoCallsHandler(_ControlHandler):
    """Arrival times of the user-info calls since the last stats reset (seconds, the
    sandbox's clock), and the rate limit: a benchmark computes every window's count."""

    def get(self) -> None:
        limit = self.sandbox.user_info_rate_limit
        self.send_json(200, {
            "times": self.sandbox.user_info_calls,
            "limit": None if limit is None else {"calls": limit.calls, "seconds": limit.seconds},
            "rate_limited": self.sandbox.stats["userinfo_rate_limited"],
        })


class ResetStatsHandler(_ControlHandler):
    def post(self) -> None:
        self.sandbox.reset_stats()
        self.send_json(200, self.sandbox.stats)


class FaultsHandler(_ControlHandler):
    def get(self) -> None:
        self.send_json(200, self.sandbox.pending_faults())

    def post(self) -> None:
        body = self.json_body()
        try:
            self.sandbox.add_fault(**body)
        except (TypeError, ValueError) as exc:
            self.bad_request(str(exc))
            return
        self.send_json(201, self.sandbox.pending_faults())

    def delete(self) -> None:
        self.sandbox.clear_faults()
        self.send_json(200, self.sandbox.pending_faults())


class RevokeUserHandler(_ControlHandler):
    """Simulates the user removing the app in TikTok: POST {"open_id": "..."}."""

    def post(self) -> None:
        open_id = self.json_body().get("open_id")
        if not isinstance(open_id, str) or open_id not in self.sandbox.state.users:
            self.bad_request("open_id must name a sandbox user")
            return
        self.sandbox.revoke_all_for(open_id)
        self.send_json(200, {"open_id": open_id})


class ClockHandler(_ControlHandler):
    """POST {"advance": seconds} to expire codes or tokens without waiting."""

    def post(self) -> None:
        seconds = self.json_body().get("advance")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            self.bad_request("advance must be a non-negative number of seconds")
            return
        self.sandbox.advance_clock(float(seconds))
        self.send_json(200, {"offset": self.sandbox.state.clock_offset})


class WebhookHandler(_ControlHandler):
    """Sends a webhook as TikTok would: POST {"url": ..., "event": "authorization.removed",
    "open_id": ..., "reason": 1}, signed with the client's secret.

    For ``authorization.removed`` the user's tokens are revoked first, as TikTok does
    when a user removes the app. Other events take their ``content`` object as is.
    Answers ``{"status": <the receiver's HTTP status>, "delivered": status == 200}``.
    """

    async def post(self) -> None:
        body = self.json_body()
        url = body.get("url")
        event = body.get("event", AUTHORIZATION_REMOVED)
        open_id = body.get("open_id")
        client_key = body.get("client_key")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            self.bad_request("url must be an absolute http(s) URL")
            return
        if not isinstance(event, str) or not event:
            self.bad_request("event must be a non-empty string")
            return
        if not isinstance(open_id, str) or open_id not in self.sandbox.state.users:
            self.bad_request("open_id must name a sandbox user")
            return
        if client_key is not None and client_key not in self.sandbox.state.clients:
            self.bad_request("client_key must name a registered client")
            return
        if event == AUTHORIZATION_REMOVED:
            reason = body.get("reason", 1)
            if not isinstance(reason, int) or isinstance(reason, bool) or (
                reason not in REMOVAL_REASONS
            ):
                self.bad_request("reason must be one of TikTok's codes 0-5")
                return
            content: dict[str, Any] = {"reason": reason}
            self.sandbox.revoke_all_for(open_id)
        else:
            content = body.get("content", {})
            if not isinstance(content, dict):
                self.bad_request("content must be a JSON object")
                return
        status = await self.sandbox.send_webhook(
            url, event, open_id, content, client_key=client_key
        )
        self.send_json(200, {"status": status, "delivered": status == 200})

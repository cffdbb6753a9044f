"""Configuration from environment variables, validated all at once at start-up.

Each setting is declared once, in ``Config``: its variable, parser, default, help and
whether it is secret. ``load_config`` reads them from that table, and the README's
configuration table is generated from it (``python scripts/settings_table.py``).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, TypeVar, dataclass_transform, overload
from urllib.parse import urlsplit

from core.errors import ConfigError
from services.budget import (
    DEFAULT_BACKGROUND_SHARE,
    DEFAULT_FALLBACK_SHARE,
    DEFAULT_MARGIN_SECONDS,
    DEFAULT_RATE_LIMITS,
    RateLimit,
    share_of,
)
from services.http_client import DEFAULT_MAX_CONNECTIONS, HTTP_CLIENTS, curl_available
from services.redirects import AllowedOrigins, RedirectRejected
from services.scopes import KNOWN_SCOPES
from storage.base import CALL_BUDGETS
from storage.crypto import TokenCipher

MIN_HMAC_KEY_BYTES = 32
PKCE_MODES = ("hex", "s256", "off")
MONGODB_DRIVERS = ("motor", "pymongo")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TIKTOK_REQUESTS_PER_MINUTE = 600  # per endpoint, sliding window (TIKTOK_API.md)
WEBHOOK_RETRY_WINDOW_SECONDS = 72 * 3600  # TikTok retries a webhook for up to 72 h
# Account events: waits in seconds between delivery attempts, then hourly up to 24 h.
EVENT_RETRY_WINDOW_SECONDS = 24 * 3600
_FIRST_RETRY_WAITS = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
DEFAULT_EVENT_RETRY_SCHEDULE = _FIRST_RETRY_WAITS + (3600.0,) * int(
    (EVENT_RETRY_WINDOW_SECONDS - sum(_FIRST_RETRY_WAITS)) // 3600
)
_KEEP_WARM_SECONDS: int | None = 3600  # typed so that "all" (None) may replace it
# Standard Webhooks: a secret is "whsec_" and the base64 of 24 to 64 random bytes.
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
WEBHOOK_SECRET_BYTES = (24, 64)

T = TypeVar("T")
C = TypeVar("C")
N = TypeVar("N", int, float)
_SETTING = "setting"  # the key of a Config field's metadata that holds its Setting


# -- Declaring a setting --------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One environment variable, as ``setting()`` declares it on a ``Config`` field."""

    name: str  # the environment variable
    parse: Callable[[str], Any]  # raises ValueError saying why a value is refused
    help: str  # the README's "meaning", Markdown
    default: Any = MISSING  # MISSING: required
    required: str | None = None  # a required one: what it is, when it is missing
    empty: Any = None  # a required one: its value while missing or invalid
    expect: str = ""  # what a refused value should have been
    # Never echoed in a configuration error, left out of repr(), no default shown.
    secret: bool = False
    unset: str | None = None  # the README's default when unset means more than "unset"
    attribute: str = ""  # the Config field

    @property
    def fallback(self) -> Any:
        """The value while it is missing or invalid (load_config then raises)."""
        return self.default if self.required is None else self.empty


class _OneOf:
    """A parser for one of a few words, any case."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.expect = "one of " + ", ".join(choices)

    def __call__(self, text: str) -> str:
        for choice in self.choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError("")


@overload
def setting(
    name: str,
    parse: Callable[[str], T],
    *,
    default: T,
    help: str,
    expect: str = "",
    secret: bool = False,
    unset: str | None = None,
) -> T: ...


@overload
def setting(
    name: str,
    parse: Callable[[str], T],
    *,
    required: str,
    empty: T,
    help: str,
    expect: str = "",
    secret: bool = False,
) -> T: ...


def setting(
    name: str,
    parse: Callable[[str], Any],
    *,
    help: str,
    default: Any = MISSING,
    required: str | None = None,
    empty: Any = None,
    expect: str = "",
    secret: bool = False,
    unset: str | None = None,
) -> Any:
    """A ``Config`` field read from the environment variable ``name``."""
    if isinstance(parse, _OneOf):
        expect = expect or parse.expect
    if (default is MISSING) is (required is None):
        raise TypeError(f"{name}: give either a default or why it is required")
    if secret and default not in (MISSING, None, ()):
        raise TypeError(f"{name}: a secret has no default value (it would be shown)")
    if unset is not None and default not in (None, ()):
        raise TypeError(f"{name}: 'unset' describes a default of None or () only")
    record = Setting(
        name=name, parse=parse, help=help, default=default, required=required,
        empty=empty, expect=expect, secret=secret, unset=unset,
    )
    if default is MISSING:
        return field(repr=not secret, metadata={_SETTING: record})
    return field(default=default, repr=not secret, metadata={_SETTING: record})


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(setting,))
def _settings_table(cls: type[C]) -> type[C]:
    return dataclass(frozen=True, kw_only=True)(cls)


# -- Parsers: each returns the value or raises ValueError saying why ------------------


def _number(
    convert: Callable[[str], N], refuse: Callable[[N], bool], reason: str
) -> Callable[[str], N]:
    """A parser of one number: ``convert`` it, then refuse it (ValueError(reason)) when
    ``refuse`` says so."""

    def parse(text: str) -> N:
        number = convert(text)
        if refuse(number):
            raise ValueError(reason)
        return number

    return parse


# Each refusal is written as the condition to refuse, so NaN and inf fare as they
# always did.
_positive_int = _number(int, lambda n: n <= 0, "must be greater than 0")
_port = _number(int, lambda n: not 0 <= n <= 65535, "must be between 0 and 65535")
_positive_float = _number(float, lambda n: n <= 0, "must be greater than 0")
_non_negative_float = _number(
    float, lambda n: not n >= 0 or n == float("inf"), "must be 0 or more"
)
_share = _number(float, lambda n: not 0 < n <= 1, "must be above 0 and at most 1")
_fraction = _number(float, lambda n: not 0 <= n <= 1, "must be from 0 to 1")
_non_negative_int = _number(int, lambda n: n < 0, "must be 0 or more")


def _refresh_rate(text: str) -> int:
    number = _positive_int(text)
    if number > TIKTOK_REQUESTS_PER_MINUTE:
        raise ValueError(f"TikTok allows at most {TIKTOK_REQUESTS_PER_MINUTE} per minute")
    return number


def _keep_warm(text: str) -> int | None:
    return None if text.lower() == "all" else _non_negative_int(text)


def _hmac_keys(text: str) -> tuple[bytes, ...]:
    keys = tuple(part.strip().encode() for part in text.split(","))
    for index, key in enumerate(keys, start=1):
        if len(key) < MIN_HMAC_KEY_BYTES:
            raise ValueError(
                f"key {index} is {len(key)} bytes; HS256 keys must be at least "
                f"{MIN_HMAC_KEY_BYTES} bytes (generate one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
    return keys


def _scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown or not scopes:
        raise ValueError(f"unknown scope(s) {', '.join(unknown) or '(none given)'}")
    return scopes


def _absolute_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http(s) URL")
    return text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_url(text: str) -> str:
    """Codes, tokens and the client secret travel here: https, except to this machine
    (the sandbox and the demo)."""
    _absolute_url(text)
    parts = urlsplit(text)
    if parts.scheme != "https" and not _is_loopback(parts.hostname or ""):
        raise ValueError(
            "must use https; plain http only to a loopback host: 127.0.0.0/8, ::1 or "
            "localhost"
        )
    return text


def _callback_url(text: str) -> str:
    _tls_url(text)
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise ValueError("TikTok requires a redirect URI without query or fragment")
    if len(text) >= 512:
        raise ValueError("TikTok requires a redirect URI shorter than 512 characters")
    return text


def _webhook_secrets(text: str) -> tuple[str, ...]:
    secrets = tuple(part.strip() for part in text.split(","))
    low, high = WEBHOOK_SECRET_BYTES
    for index, secret in enumerate(secrets, start=1):
        if not secret.startswith(WEBHOOK_SECRET_PREFIX):
            raise ValueError(f"secret {index} does not start with {WEBHOOK_SECRET_PREFIX}")
        encoded = secret[len(WEBHOOK_SECRET_PREFIX):]
        try:
            # Unpadded is fine too, as the standardwebhooks package reads it.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret {index} is not base64 after the prefix") from None
        if not low <= len(key) <= high:
            raise ValueError(
                f"secret {index} holds {len(key)} bytes; use {low} to {high} random bytes "
                "(generate one with: python -c 'import base64, os; "
                "print(\"whsec_\" + base64.b64encode(os.urandom(32)).decode())')"
            )
    return secrets


def _retry_schedule(text: str) -> tuple[float, ...]:
    waits = tuple(_positive_float(part.strip()) for part in text.split(","))
    if sum(waits) > EVENT_RETRY_WINDOW_SECONDS:
        raise ValueError(f"the waits add up to more than {EVENT_RETRY_WINDOW_SECONDS} s (24 h)")
    return waits


def _flag(text: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a yes/no value")


def _api_base_url(text: str) -> str:
    return _tls_url(text).rstrip("/")


def _token_keys(text: str) -> tuple[tuple[str, bytes], ...]:
    return tuple(TokenCipher.parse_keys(text))


def _log_level(text: str) -> str:
    # Python's aliases (WARN, FATAL, NOTSET) too, as logging itself takes them.
    if text.upper() not in logging.getLevelNamesMapping():
        raise ValueError("")
    return text.upper()


_PERIOD_UNITS = {"s": 1.0, "m": 60.0}


def _rate_limits(text: str) -> tuple[tuple[str, RateLimit], ...]:
    """``user_info=600/60s,token=1200/60s``: each named endpoint replaces its default;
    ``name=off`` removes one."""
    limits = dict(DEFAULT_RATE_LIMITS)
    named: set[str] = set()
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, equals, value = (piece.strip() for piece in entry.partition("="))
        if not equals or not value:
            raise ValueError(f"{entry!r} is not name=calls/seconds")
        if name not in CALL_BUDGETS:
            raise ValueError(f"unknown endpoint {name!r}; known: {', '.join(CALL_BUDGETS)}")
        if name in named:
            raise ValueError(f"{name} is given twice")
        named.add(name)
        if value.lower() in ("off", "none"):
            limits.pop(name, None)
            continue
        limits[name] = _rate_limit(name, value)
    return tuple(sorted(limits.items()))


def _rate_limit(name: str, value: str) -> RateLimit:
    calls_text, slash, period = (piece.strip() for piece in value.partition("/"))
    unit = _PERIOD_UNITS.get(period[-1:].lower(), 1.0) if period else 1.0
    if period[-1:].lower() in _PERIOD_UNITS:
        period = period[:-1].strip()
    try:
        calls, seconds = int(calls_text), float(period) * unit
    except ValueError:
        calls, seconds = 0, 0.0
    if not slash or calls <= 0 or not 0 < seconds < float("inf"):
        raise ValueError(
            f"{name}={value!r}: expected a whole number of calls above 0, '/', and a "
            "period above 0 such as 60s or 1m"
        )
    return RateLimit(calls, seconds)


# -- The settings ---------------------------------------------------------------------


@_settings_table
class Config:
    """The gateway's settings: one field per environment variable, in the README's order.

    Build one with ``load_config(environ)``; secrets are left out of ``repr()``, so a
    logged or printed config does not leak them."""

    host: str = setting("HOST", str, default="127.0.0.1", help="listen address")
    port: int = setting("PORT", _port, default=8080, expect="a port number", help="listen port")
    workers: int = setting(
        "WORKERS", _positive_int, default=1, expect="a number of processes",
        help="processes serving that one port, forked and supervised by the first (a crashed "
        "one is replaced); more than `1` requires `MONGODB_URI`. See "
        "[docs/deployment.md](docs/deployment.md)",
    )
    prometheus_multiproc_dir: str | None = setting(
        "PROMETHEUS_MULTIPROC_DIR", str, default=None, unset="a temporary directory",
        help="with `WORKERS` above `1`: a directory of its own where the workers keep their "
        "metrics, emptied of them at start (see Operating it)",
    )
    shutdown_timeout_seconds: float = setting(
        "SHUTDOWN_TIMEOUT_SECONDS", _non_negative_float, default=20.0, expect="seconds",
        help="on `SIGTERM`/`SIGINT`: new connections are refused and requests in flight get "
        "this long to finish before they are cut; then the process exits 0",
    )
    tiktok_client_key: str = setting(
        "TIKTOK_CLIENT_KEY", str, required="your TikTok app's client key", empty="",
        help="your TikTok app's client key",
    )
    tiktok_client_secret: str = setting(
        "TIKTOK_CLIENT_SECRET", str, required="your TikTok app's client secret", empty="",
        secret=True, help="your TikTok app's client secret",
    )
    tiktok_redirect_uri: str = setting(
        "TIKTOK_REDIRECT_URI", _callback_url, expect="an absolute URL", empty="",
        required="this gateway's public callback URL, registered with TikTok",
        help="this gateway's public callback URL, registered with TikTok (absolute `https`, "
        "no query or fragment)",
    )
    tiktok_authorize_url: str = setting(
        "TIKTOK_AUTHORIZE_URL", _tls_url, default="https://www.tiktok.com/v2/auth/authorize/",
        expect="an absolute URL", help="TikTok's consent page",
    )
    tiktok_api_base_url: str = setting(
        "TIKTOK_API_BASE_URL", _api_base_url, default="https://open.tiktokapis.com",
        expect="an absolute URL",
        help="token, user info and revoke live under it. This, `TIKTOK_AUTHORIZE_URL` and "
        "`TIKTOK_REDIRECT_URI` must be `https` (codes, tokens and the client secret travel "
        "over them); plain `http` only to a loopback host (`127.0.0.0/8`, `::1`, "
        "`localhost`: the sandbox, the demo)",
    )
    tiktok_scopes: tuple[str, ...] = setting(
        "TIKTOK_SCOPES", _scopes, default=("user.info.basic",),
        expect="comma-separated TikTok scopes",
        help="default scopes, comma-separated; `user.info.basic` is always requested too, "
        "named or not",
    )
    tiktok_pkce: str = setting(
        "TIKTOK_PKCE", _OneOf(*PKCE_MODES), default="hex",
        help="`hex` (TikTok's documented challenge: hex SHA-256), `s256` (RFC 7636 "
        "base64url) or `off`",
    )
    state_secrets: tuple[bytes, ...] = setting(
        "STATE_SECRET", _hmac_keys, expect="keys of at least 32 bytes", empty=(), secret=True,
        required="HS256 key(s) that sign the OAuth state, comma-separated",
        help="HS256 key(s) for the state JWT, at least 32 bytes each; comma-separated: the "
        "first signs, all verify (rotation)",
    )
    state_ttl_seconds: int = setting(
        "STATE_TTL_SECONDS", _positive_int, default=600, expect="seconds",
        help="lifetime of a state",
    )
    # The product's bearer keys: any of them verifies (rotation, like state_secrets).
    auth_jwt_secrets: tuple[bytes, ...] = setting(
        "AUTH_JWT_SECRET", _hmac_keys, expect="keys of at least 32 bytes", empty=(),
        secret=True,
        required="HS256 key(s) that verify your product's bearer tokens, comma-separated",
        help="HS256 key(s) (32+ bytes each) that verify your product's bearer tokens; "
        "comma-separated: any of them verifies (rotation: SECURITY.md); each must differ "
        "from every `STATE_SECRET` key",
    )
    auth_jwt_issuer: str | None = setting(
        "AUTH_JWT_ISSUER", str, default=None,
        help="recommended: the bearer token's `iss` must then equal it, so a token your "
        "product signed with the same key for another service is refused; a warning at "
        "start-up names it while unset",
    )
    auth_jwt_audience: str | None = setting(
        "AUTH_JWT_AUDIENCE", str, default=None,
        help="recommended: the bearer token's `aud` must then equal it, so a token your "
        "product signed with the same key for another service is refused; a warning at "
        "start-up names it while unset",
    )
    allowed_redirect_origins: AllowedOrigins = setting(
        "ALLOWED_REDIRECT_ORIGINS", AllowedOrigins.parse, empty=AllowedOrigins(()),
        expect="origins like https://app.example.com",
        required="comma-separated origins the product may be sent back to",
        help="comma-separated origins (`https://app.example.com`) a redirect URI may point to",
    )
    # May hold the database password.
    mongodb_uri: str | None = setting(
        "MONGODB_URI", str, default=None, secret=True,
        help="set: MongoDB store; unset: in-memory store (a warning says nothing persists and "
        "it serves one process only)",
    )
    mongodb_database: str = setting(
        "MONGODB_DATABASE", str, default="tiktok_gateway", help="database name",
    )
    mongodb_driver: str = setting(
        "MONGODB_DRIVER", _OneOf(*MONGODB_DRIVERS), default="motor",
        help="`motor` or `pymongo` (PyMongo's `AsyncMongoClient`, motor's successor)",
    )
    mongodb_timeout_ms: int = setting(
        "MONGODB_TIMEOUT_MS", _positive_int, default=2000, expect="milliseconds",
        help="server selection and connect timeout (MongoDB down or unreachable)",
    )
    mongodb_operation_timeout_ms: int = setting(
        "MONGODB_OPERATION_TIMEOUT_MS", _positive_int, default=5000, expect="milliseconds",
        help="socket timeout of one store call (MongoDB reachable but stalled)",
    )
    token_encryption_keys: tuple[tuple[str, bytes], ...] = setting(
        "TOKEN_ENCRYPTION_KEYS", _token_keys, default=(), secret=True,
        expect="kid:base64key entries of 32-byte keys",
        unset="required with MongoDB; a random per-process key otherwise",
        help="`kid:base64key` entries of 32-byte AES-256-GCM keys, comma-separated: the first "
        "encrypts, all decrypt (rotation: SECURITY.md; `python scripts/reseal_tokens.py` "
        "re-encrypts stored tokens with the first)",
    )
    tiktok_connect_timeout: float = setting(
        "TIKTOK_CONNECT_TIMEOUT_SECONDS", _positive_float, default=2.0, expect="seconds",
        help="timeout of every call to TikTok to get a connection (a free one from the pool, "
        "or a new one); a callback's calls wait for a free pooled connection within its "
        "budget instead (`TIKTOK_MAX_CONNECTIONS`)",
    )
    tiktok_request_timeout: float = setting(
        "TIKTOK_REQUEST_TIMEOUT_SECONDS", _positive_float, default=4.0, expect="seconds",
        help="timeout of every call to TikTok for the whole call, waiting for a connection "
        "included",
    )
    # None: curl when pycurl imports, else simple (services/http_client.py).
    tiktok_http_client: str | None = setting(
        "TIKTOK_HTTP_CLIENT", _OneOf(*HTTP_CLIENTS), default=None,
        unset="`curl` when `pycurl` imports, else `simple` (with a warning)",
        help="`curl`: pooled keep-alive connections to TikTok (Tornado's curl client on "
        "`pycurl`); `simple`: Tornado's pure-Python client, a new connection per call",
    )
    tiktok_max_connections: int = setting(
        "TIKTOK_MAX_CONNECTIONS", _positive_int, default=DEFAULT_MAX_CONNECTIONS,
        expect="a number",
        help="most calls to TikTok in flight at once per process (the pool's size). A "
        "callback's call beyond it queues, in arrival order, for a free connection as long "
        "as the callback's budget leaves time for the call, then gets its full request "
        "timeout (never past the budget): a burst queues instead of failing. Other calls (a "
        "product's token request, a disconnect, the background work) wait at most the "
        "connect timeout, and the wait comes off their request timeout. A call that gets no "
        "connection in time fails with the 503 envelope without reaching TikTok (a "
        "callback's profile call is then left pending). A pool of N carries about N / (2 x "
        "TikTok's latency) callbacks/s; the default is measured below",
    )
    tiktok_callback_budget: float = setting(
        "TIKTOK_CALLBACK_BUDGET_SECONDS", _positive_float, default=10.0, expect="seconds",
        help="how long one callback may wait for TikTok: for a pooled connection, and for "
        "its profile call, retries included (past it the profile is left pending and filled "
        "in the background); a code exchange already sent keeps its own request timeout",
    )
    # One budget per endpoint shared by every process through the store (services/budget.py).
    tiktok_rate_limits: tuple[tuple[str, RateLimit], ...] = setting(
        "TIKTOK_RATE_LIMITS", _rate_limits, default=tuple(DEFAULT_RATE_LIMITS.items()),
        expect="comma-separated name=calls/seconds (e.g. user_info=600/60s,token=1200/60s; "
        "name=off for no limit)",
        help="TikTok's rate limits the gateway keeps to, one budget per endpoint shared by "
        "every process through the store ([TikTok rate limits](#tiktok-rate-limits)): "
        "comma-separated `name=calls/seconds`, names `user_info`, `token` (code exchanges "
        "and refreshes), `revoke`, the period as `60s`, `60` or `1m`; each one named replaces "
        "its default, `name=off` removes it (TikTok documents none for token and revoke). "
        "The same on every process",
    )
    tiktok_rate_limit_margin_seconds: float = setting(
        "TIKTOK_RATE_LIMIT_MARGIN_SECONDS", _non_negative_float, default=DEFAULT_MARGIN_SECONDS,
        expect="seconds",
        help="each budget's window is kept this much longer than TikTok's, for the time a "
        "call takes to reach TikTok",
    )
    tiktok_background_share: float = setting(
        "TIKTOK_BACKGROUND_SHARE", _share, default=DEFAULT_BACKGROUND_SHARE,
        expect="a fraction above 0, at most 1",
        help="the most of each budget background work (the refresher) may use in any "
        "window; above `0`, at most `1`",
    )
    tiktok_fallback_share: float = setting(
        "TIKTOK_FALLBACK_SHARE", _fraction, default=DEFAULT_FALLBACK_SHARE,
        expect="a fraction from 0 to 1",
        help="while the store cannot be asked: the part of each limit one process uses on its "
        "own for interactive calls (background calls pause); keep it at most 1 / the number "
        "of processes; `0` stops every call then",
    )
    refresh_skew_seconds: int = setting(
        "REFRESH_SKEW_SECONDS", _positive_int, default=300, expect="seconds",
        help="`POST /accounts/{id}/access-token` refreshes first when the access token "
        "expires within this many seconds",
    )
    # Whether a retry is signed afresh is undocumented: accept the whole retry window.
    webhook_tolerance_seconds: int = setting(
        "WEBHOOK_TOLERANCE_SECONDS", _positive_int, default=WEBHOOK_RETRY_WINDOW_SECONDS,
        expect="seconds",
        help="how old a webhook's signed timestamp may be. The default is TikTok's 72-hour "
        "retry window, since TikTok does not say whether a retry is signed afresh; the "
        "trade-off is in SECURITY.md. A timestamp ahead of now is allowed 300 s of clock "
        "skew (or this value, if smaller)",
    )
    refresh_interval_seconds: float = setting(
        "REFRESH_INTERVAL_SECONDS", _non_negative_float, default=60.0,
        expect="seconds (0 disables)",
        help="seconds between two background refresh rounds; `0` turns the refresher off",
    )
    refresh_ahead_seconds: int = setting(
        "REFRESH_AHEAD_SECONDS", _positive_int, default=3600, expect="seconds",
        help="the refresher renews access tokens expiring within this many seconds",
    )
    # None ("all"): every connected account; 0: none (on demand only).
    refresh_keep_warm_seconds: int | None = setting(
        "REFRESH_KEEP_WARM_SECONDS", _keep_warm, default=_KEEP_WARM_SECONDS,
        expect="seconds (0: none) or 'all'",
        help="the refresher keeps fresh only the accounts whose token "
        "`POST /accounts/{id}/access-token` handed out within this many seconds; `0`: none "
        "(on demand only), `all`: every connected account. See "
        "[Background token refresh](#background-token-refresh)",
    )
    refresh_max_per_minute: int = setting(
        "REFRESH_MAX_PER_MINUTE", _refresh_rate, default=300,
        expect="a number of refreshes per minute",
        help="most refresh calls to TikTok per minute from one gateway's refresher (with "
        "`WORKERS`, worker 0 runs it; TikTok allows 600 per endpoint; at most `600`)",
    )
    # Account events (issue 15): pushed to the product when both are set.
    product_webhook_url: str | None = setting(
        "PRODUCT_WEBHOOK_URL", _tls_url, default=None, secret=True,
        expect="an absolute URL of your product's receiver",
        help="where [account events](#account-events) are pushed; with "
        "`PRODUCT_WEBHOOK_SECRET` it turns push delivery on (unset: events are only "
        "pulled). `https`, plain `http` only to a loopback host; never echoed (it may hold "
        "a token)",
    )
    product_webhook_secrets: tuple[str, ...] = setting(
        "PRODUCT_WEBHOOK_SECRET", _webhook_secrets, default=(), secret=True,
        expect="comma-separated whsec_ secrets",
        help="Standard Webhooks secret(s): `whsec_` and the base64 of 24 to 64 random bytes; "
        "comma-separated: each one signs every delivery (rotation)",
    )
    product_webhook_retry_schedule: tuple[float, ...] = setting(
        "PRODUCT_WEBHOOK_RETRY_SCHEDULE", _retry_schedule,
        default=DEFAULT_EVENT_RETRY_SCHEDULE, expect="comma-separated waits in seconds",
        help="waits in seconds between delivery attempts, comma-separated, adding up to at "
        "most 24 h; once the attempt after the last wait fails, the event is `failed`",
    )
    events_retention_days: int = setting(
        "EVENTS_RETENTION_DAYS", _positive_int, default=7, expect="days",
        help="how long account events are kept for `GET /events`",
    )
    events_expiry_notice_days: int = setting(
        "EVENTS_EXPIRY_NOTICE_DAYS", _positive_int, default=14, expect="days",
        help="`tiktok.account.reauthorization_due` is sent when an account's refresh token "
        "expires within this many days",
    )
    log_level: str = setting(
        "LOG_LEVEL", _log_level, default="INFO", expect="one of " + ", ".join(LOG_LEVELS),
        help="Python logging level: " + ", ".join(f"`{level}`" for level in LOG_LEVELS),
    )
    log_format: str = setting(
        "LOG_FORMAT", _OneOf(*LOG_FORMATS), default="text",
        help="`text` (one plain line per record) or `json` (one JSON object per line; see "
        "[Operating it](#operating-it))",
    )
    # Serves /demo, the browser demo's stand-in product (make demo); never in production.
    demo_mode: bool = setting(
        "DEMO_MODE", _flag, default=False, expect="1 or 0 (true/false, yes/no, on/off)",
        help="`1` serves the browser demo at `/demo` (see \"Try it\"); for a local demo "
        "against the sandbox only, never in production",
    )

    @property
    def events_push_enabled(self) -> bool:
        return bool(self.product_webhook_url and self.product_webhook_secrets)

    def cipher(self) -> TokenCipher:
        if self.token_encryption_keys:
            return TokenCipher(list(self.token_encryption_keys))
        return TokenCipher.ephemeral()


# Config's fields in order: the table load_config reads and the README shows.
SETTINGS: tuple[Setting, ...] = tuple(
    replace(item.metadata[_SETTING], attribute=item.name) for item in fields(Config)
)
# Never echoed back in a configuration error: they end up in terminals and CI logs.
SECRET_VARIABLES = frozenset(item.name for item in SETTINGS if item.secret)


def setting_named(name: str) -> Setting:
    """The declaration of the environment variable ``name``."""
    for item in SETTINGS:
        if item.name == name:
            return item
    raise KeyError(name)


# -- Reading them ---------------------------------------------------------------------


class _Reader:
    """Reads variables and collects every problem instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def read(self, item: Setting) -> Any:
        value = self.raw(item.name)
        if value is None:
            if item.required is not None:
                self.problems.append(f"{item.name} is required ({item.required})")
            return item.fallback
        try:
            return item.parse(value)
        except ValueError as exc:
            reason = str(exc) if str(exc) and not str(exc).startswith("invalid literal") else ""
            shown = item.name if item.secret else f"{item.name}={value!r}"
            self.problems.append(
                f"{shown} is invalid: expected {item.expect}" + (f" ({reason})" if reason else "")
            )
            return item.fallback


def load_config(environ: Mapping[str, str]) -> Config:
    """Build the configuration or raise ``ConfigError`` naming every problem."""
    env = _Reader(environ)
    config = Config(**{item.attribute: env.read(item) for item in SETTINGS})
    if (
        config.auth_jwt_secrets
        and config.state_secrets
        and set(config.auth_jwt_secrets) & set(config.state_secrets)
    ):
        env.problems.append(
            "AUTH_JWT_SECRET must differ from every STATE_SECRET key, so a product token "
            "can never be mistaken for a state"
        )
    if config.mongodb_uri and not env.raw("TOKEN_ENCRYPTION_KEYS"):
        env.problems.append(
            "TOKEN_ENCRYPTION_KEYS is required with MONGODB_URI (tokens are stored encrypted; "
            "generate one with: python -c 'import base64, os; "
            "print(\"k1:\" + base64.b64encode(os.urandom(32)).decode())')"
        )
    if config.tiktok_http_client == "curl" and not curl_available():
        env.problems.append("TIKTOK_HTTP_CLIENT=curl needs pycurl (pip install pycurl)")
    if config.workers > 1 and not config.mongodb_uri:
        env.problems.append(
            f"WORKERS={config.workers} requires MONGODB_URI: the in-memory store lives in "
            "one process, so a state started in one worker would be unknown to the others"
        )
    _check_demo_mode(env, config)
    _check_rate_limits(env, config)
    _check_events(env, config)
    if env.problems:
        raise ConfigError(env.problems)
    return config


def logging_settings(environ: Mapping[str, str]) -> tuple[str, str]:
    """``LOG_LEVEL`` and ``LOG_FORMAT``, for logging set up before the configuration is
    loaded: an invalid value falls back to its default here, and load_config names it."""
    env = _Reader(environ)
    return env.read(setting_named("LOG_LEVEL")), env.read(setting_named("LOG_FORMAT"))


# -- Checks across settings -----------------------------------------------------------


_TIKTOK_HOSTS = ("tiktok.com", "tiktokapis.com")


def _check_demo_mode(env: _Reader, config: Config) -> None:
    """DEMO_MODE serves a page that connects accounts for a demo user without any login:
    only against a stand-in for TikTok, and only if the browser may come back to it."""
    if not config.demo_mode:
        return
    for name, url in (
        ("TIKTOK_AUTHORIZE_URL", config.tiktok_authorize_url),
        ("TIKTOK_API_BASE_URL", config.tiktok_api_base_url),
    ):
        host = (urlsplit(url).hostname or "").lower()
        if any(host == known or host.endswith("." + known) for known in _TIKTOK_HOSTS):
            env.problems.append(
                f"DEMO_MODE=1 is for the local sandbox only, but {name} points at TikTok"
            )
    if config.tiktok_redirect_uri and config.allowed_redirect_origins.origins:
        parts = urlsplit(config.tiktok_redirect_uri)
        origin = f"{parts.scheme}://{parts.netloc}"
        try:
            config.allowed_redirect_origins.check(origin + "/demo")
        except RedirectRejected:
            env.problems.append(
                f"DEMO_MODE=1 sends the browser back to /demo on this gateway: add {origin} "
                "to ALLOWED_REDIRECT_ORIGINS"
            )


def _check_rate_limits(env: _Reader, config: Config) -> None:
    """Each share must leave at least one call of every limit."""
    for name, limit in config.tiktok_rate_limits:
        if not share_of(limit, config.tiktok_background_share):
            env.problems.append(
                f"TIKTOK_BACKGROUND_SHARE={config.tiktok_background_share:g} leaves background "
                f"work (refreshes, profile filling) no call of {name}={limit}: raise that limit "
                "or the share"
            )
        if config.tiktok_fallback_share and not share_of(limit, config.tiktok_fallback_share):
            env.problems.append(
                f"TIKTOK_FALLBACK_SHARE={config.tiktok_fallback_share:g} leaves a process that "
                f"cannot reach the store no call of {name}={limit}: raise the share, or set 0 "
                "to stop every call while the store cannot be asked"
            )


def _check_events(env: _Reader, config: Config) -> None:
    """Push delivery needs both where and how to sign."""
    url, secrets = env.raw("PRODUCT_WEBHOOK_URL"), env.raw("PRODUCT_WEBHOOK_SECRET")
    if url and not secrets:
        env.problems.append(
            "PRODUCT_WEBHOOK_URL is set without PRODUCT_WEBHOOK_SECRET: every delivery is "
            "signed, so set one (a whsec_ secret your product verifies with)"
        )
    elif secrets and not url:
        env.problems.append(
            "PRODUCT_WEBHOOK_SECRET is set without PRODUCT_WEBHOOK_URL: set where your "
            "product receives account events, or unset the secret"
        )

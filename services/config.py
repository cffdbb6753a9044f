"""Configuration from environment variables, validated all at once at start-up."""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
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
TIKTOK_REQUESTS_PER_MINUTE = 600  # per endpoint, sliding window (TIKTOK_API.md)
WEBHOOK_RETRY_WINDOW_SECONDS = 72 * 3600  # TikTok retries a webhook for up to 72 h
# Never echoed back in a configuration error: they end up in terminals and CI logs.
SECRET_VARIABLES = frozenset(
    {
        "TIKTOK_CLIENT_SECRET",
        "STATE_SECRET",
        "AUTH_JWT_SECRET",
        "TOKEN_ENCRYPTION_KEYS",
        "MONGODB_URI",
        "PRODUCT_WEBHOOK_SECRET",
        # May carry a token in its query string.
        "PRODUCT_WEBHOOK_URL",
    }
)
# Account events: waits in seconds between delivery attempts, then hourly up to 24 h.
EVENT_RETRY_WINDOW_SECONDS = 24 * 3600
_FIRST_RETRY_WAITS = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
DEFAULT_EVENT_RETRY_SCHEDULE = _FIRST_RETRY_WAITS + (3600.0,) * int(
    (EVENT_RETRY_WINDOW_SECONDS - sum(_FIRST_RETRY_WAITS)) // 3600
)
# Standard Webhooks: a secret is "whsec_" and the base64 of 24 to 64 random bytes.
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
WEBHOOK_SECRET_BYTES = (24, 64)

T = TypeVar("T")
D = TypeVar("D")


@dataclass(frozen=True)
class Config:
    # Secrets are left out of repr(): a logged or printed config must not leak them.
    tiktok_client_key: str
    tiktok_client_secret: str = field(repr=False)
    tiktok_redirect_uri: str
    state_secrets: tuple[bytes, ...] = field(repr=False)
    # The product's bearer keys: any of them verifies (rotation, like state_secrets).
    auth_jwt_secrets: tuple[bytes, ...] = field(repr=False)
    allowed_redirect_origins: AllowedOrigins
    host: str = "127.0.0.1"
    port: int = 8080
    log_format: str = "text"
    tiktok_authorize_url: str = "https://www.tiktok.com/v2/auth/authorize/"
    tiktok_api_base_url: str = "https://open.tiktokapis.com"
    tiktok_scopes: tuple[str, ...] = ("user.info.basic",)
    tiktok_pkce: str = "hex"
    state_ttl_seconds: int = 600
    auth_jwt_issuer: str | None = None
    auth_jwt_audience: str | None = None
    # May hold the database password.
    mongodb_uri: str | None = field(default=None, repr=False)
    mongodb_database: str = "tiktok_gateway"
    mongodb_driver: str = "motor"
    mongodb_timeout_ms: int = 2000
    mongodb_operation_timeout_ms: int = 5000
    token_encryption_keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    tiktok_connect_timeout: float = 2.0
    tiktok_request_timeout: float = 4.0
    tiktok_callback_budget: float = 10.0
    # None: curl when pycurl imports, else simple (services/http_client.py).
    tiktok_http_client: str | None = None
    tiktok_max_connections: int = DEFAULT_MAX_CONNECTIONS
    # The access-token endpoint refreshes first when the token expires within this.
    refresh_skew_seconds: int = 300
    # Whether a retry is signed afresh is undocumented: accept the whole retry window.
    webhook_tolerance_seconds: int = WEBHOOK_RETRY_WINDOW_SECONDS
    refresh_interval_seconds: float = 60.0
    refresh_ahead_seconds: int = 3600
    # The refresher keeps warm the accounts whose token was handed out within this;
    # None ("all"): every connected account; 0: none (on demand only).
    refresh_keep_warm_seconds: int | None = 3600
    refresh_max_per_minute: int = 300
    # Processes forked on one port (python server.py); more than 1 needs MongoDB.
    workers: int = 1
    # On SIGTERM/SIGINT, how long requests in flight may take before they are cut.
    shutdown_timeout_seconds: float = 20.0
    # Serves /demo, the browser demo's stand-in product (make demo); never in production.
    demo_mode: bool = False
    # TikTok's rate limits per endpoint, one budget shared by every process through the
    # store (services/budget.py); kept margin seconds longer than TikTok's window.
    tiktok_rate_limits: tuple[tuple[str, RateLimit], ...] = tuple(DEFAULT_RATE_LIMITS.items())
    tiktok_rate_limit_margin_seconds: float = DEFAULT_MARGIN_SECONDS
    # The most of each budget background work may use in any window.
    tiktok_background_share: float = DEFAULT_BACKGROUND_SHARE
    # What one process may use of each budget on its own while the store cannot be asked.
    tiktok_fallback_share: float = DEFAULT_FALLBACK_SHARE
    # Account events (issue 15): pushed to the product when both are set.
    product_webhook_url: str | None = field(default=None, repr=False)
    product_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    product_webhook_retry_schedule: tuple[float, ...] = DEFAULT_EVENT_RETRY_SCHEDULE
    events_retention_days: int = 7
    events_expiry_notice_days: int = 14

    @property
    def events_push_enabled(self) -> bool:
        return bool(self.product_webhook_url and self.product_webhook_secrets)

    def cipher(self) -> TokenCipher:
        if self.token_encryption_keys:
            return TokenCipher(list(self.token_encryption_keys))
        return TokenCipher.ephemeral()


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

    def required(self, name: str, meaning: str) -> str:
        value = self.raw(name)
        if value is None:
            self.problems.append(f"{name} is required ({meaning})")
            return ""
        return value

    def parsed(self, name: str, default: D, parse: Callable[[str], T], expect: str) -> T | D:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            reason = str(exc) if str(exc) and not str(exc).startswith("invalid literal") else ""
            shown = name if name in SECRET_VARIABLES else f"{name}={value!r}"
            self.problems.append(
                f"{shown} is invalid: expected {expect}" + (f" ({reason})" if reason else "")
            )
            return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.raw(name) or default).lower()
        if value not in choices:
            self.problems.append(
                f"{name}={value!r} is invalid: expected one of {', '.join(choices)}"
            )
            return default
        return value


def _positive_int(text: str) -> int:
    number = int(text)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _port(text: str) -> int:
    number = int(text)
    if not 0 <= number <= 65535:
        raise ValueError("must be between 0 and 65535")
    return number


def _positive_float(text: str) -> float:
    number = float(text)
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def _non_negative_float(text: str) -> float:
    number = float(text)
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be 0 or more")
    return number


def _refresh_rate(text: str) -> int:
    number = _positive_int(text)
    if number > TIKTOK_REQUESTS_PER_MINUTE:
        raise ValueError(f"TikTok allows at most {TIKTOK_REQUESTS_PER_MINUTE} per minute")
    return number


def _keep_warm(text: str) -> int | None:
    if text.lower() == "all":
        return None
    number = int(text)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


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


def _http_client(env: _Reader) -> str | None:
    if env.raw("TIKTOK_HTTP_CLIENT") is None:
        return None
    kind = env.choice("TIKTOK_HTTP_CLIENT", "curl", HTTP_CLIENTS)
    if kind == "curl" and not curl_available():
        env.problems.append("TIKTOK_HTTP_CLIENT=curl needs pycurl (pip install pycurl)")
    return kind


def _flag(text: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a yes/no value")


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


def load_config(environ: Mapping[str, str]) -> Config:
    """Build the configuration or raise ``ConfigError`` naming every problem."""
    env = _Reader(environ)
    client_key = env.required("TIKTOK_CLIENT_KEY", "your TikTok app's client key")
    client_secret = env.required("TIKTOK_CLIENT_SECRET", "your TikTok app's client secret")
    redirect_uri = env.required(
        "TIKTOK_REDIRECT_URI", "this gateway's public callback URL, registered with TikTok"
    )
    if redirect_uri:
        redirect_uri = env.parsed("TIKTOK_REDIRECT_URI", "", _callback_url, "an absolute URL")

    state_secrets: tuple[bytes, ...] = ()
    if env.required("STATE_SECRET", "HS256 key(s) that sign the OAuth state, comma-separated"):
        state_secrets = env.parsed("STATE_SECRET", (), _hmac_keys, "keys of at least 32 bytes")
    auth_secret: tuple[bytes, ...] = ()
    if env.required(
        "AUTH_JWT_SECRET", "HS256 key(s) that verify your product's bearer tokens, comma-separated"
    ):
        auth_secret = env.parsed("AUTH_JWT_SECRET", (), _hmac_keys, "keys of at least 32 bytes")
    if auth_secret and state_secrets and set(auth_secret) & set(state_secrets):
        env.problems.append(
            "AUTH_JWT_SECRET must differ from every STATE_SECRET key, so a product token "
            "can never be mistaken for a state"
        )

    origins = AllowedOrigins(())
    if env.required(
        "ALLOWED_REDIRECT_ORIGINS", "comma-separated origins the product may be sent back to"
    ):
        origins = env.parsed(
            "ALLOWED_REDIRECT_ORIGINS", origins, AllowedOrigins.parse, "origins like https://app.example.com"
        )

    mongodb_uri = env.raw("MONGODB_URI")
    keys: tuple[tuple[str, bytes], ...] = ()
    if env.raw("TOKEN_ENCRYPTION_KEYS"):
        keys = env.parsed(
            "TOKEN_ENCRYPTION_KEYS",
            (),
            lambda text: tuple(TokenCipher.parse_keys(text)),
            "kid:base64key entries of 32-byte keys",
        )
    elif mongodb_uri:
        env.problems.append(
            "TOKEN_ENCRYPTION_KEYS is required with MONGODB_URI (tokens are stored encrypted; "
            "generate one with: python -c 'import base64, os; "
            "print(\"k1:\" + base64.b64encode(os.urandom(32)).decode())')"
        )

    config = Config(
        host=env.raw("HOST") or "127.0.0.1",
        port=env.parsed("PORT", 8080, _port, "a port number"),
        log_format=env.choice("LOG_FORMAT", "text", LOG_FORMATS),
        tiktok_client_key=client_key,
        tiktok_client_secret=client_secret,
        tiktok_redirect_uri=redirect_uri,
        tiktok_authorize_url=env.parsed(
            "TIKTOK_AUTHORIZE_URL",
            "https://www.tiktok.com/v2/auth/authorize/",
            _tls_url,
            "an absolute URL",
        ),
        tiktok_api_base_url=env.parsed(
            "TIKTOK_API_BASE_URL", "https://open.tiktokapis.com", _tls_url, "an absolute URL"
        ).rstrip("/"),
        tiktok_scopes=env.parsed(
            "TIKTOK_SCOPES", ("user.info.basic",), _scopes, "comma-separated TikTok scopes"
        ),
        tiktok_pkce=env.choice("TIKTOK_PKCE", "hex", PKCE_MODES),
        state_secrets=state_secrets,
        state_ttl_seconds=env.parsed("STATE_TTL_SECONDS", 600, _positive_int, "seconds"),
        auth_jwt_secrets=auth_secret,
        auth_jwt_issuer=env.raw("AUTH_JWT_ISSUER"),
        auth_jwt_audience=env.raw("AUTH_JWT_AUDIENCE"),
        allowed_redirect_origins=origins,
        mongodb_uri=mongodb_uri,
        mongodb_database=env.raw("MONGODB_DATABASE") or "tiktok_gateway",
        mongodb_driver=env.choice("MONGODB_DRIVER", "motor", MONGODB_DRIVERS),
        mongodb_timeout_ms=env.parsed("MONGODB_TIMEOUT_MS", 2000, _positive_int, "milliseconds"),
        mongodb_operation_timeout_ms=env.parsed(
            "MONGODB_OPERATION_TIMEOUT_MS", 5000, _positive_int, "milliseconds"
        ),
        token_encryption_keys=keys,
        tiktok_connect_timeout=env.parsed(
            "TIKTOK_CONNECT_TIMEOUT_SECONDS", 2.0, _positive_float, "seconds"
        ),
        tiktok_request_timeout=env.parsed(
            "TIKTOK_REQUEST_TIMEOUT_SECONDS", 4.0, _positive_float, "seconds"
        ),
        tiktok_callback_budget=env.parsed(
            "TIKTOK_CALLBACK_BUDGET_SECONDS", 10.0, _positive_float, "seconds"
        ),
        tiktok_http_client=_http_client(env),
        tiktok_max_connections=env.parsed(
            "TIKTOK_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, _positive_int, "a number"
        ),
        refresh_skew_seconds=env.parsed("REFRESH_SKEW_SECONDS", 300, _positive_int, "seconds"),
        webhook_tolerance_seconds=env.parsed(
            "WEBHOOK_TOLERANCE_SECONDS", WEBHOOK_RETRY_WINDOW_SECONDS, _positive_int, "seconds"
        ),
        refresh_interval_seconds=env.parsed(
            "REFRESH_INTERVAL_SECONDS", 60.0, _non_negative_float, "seconds (0 disables)"
        ),
        refresh_ahead_seconds=env.parsed("REFRESH_AHEAD_SECONDS", 3600, _positive_int, "seconds"),
        refresh_keep_warm_seconds=env.parsed(
            "REFRESH_KEEP_WARM_SECONDS", 3600, _keep_warm, "seconds (0: none) or 'all'"
        ),
        refresh_max_per_minute=env.parsed(
            "REFRESH_MAX_PER_MINUTE", 300, _refresh_rate, "a number of refreshes per minute"
        ),
        workers=env.parsed("WORKERS", 1, _positive_int, "a number of processes"),
        shutdown_timeout_seconds=env.parsed(
            "SHUTDOWN_TIMEOUT_SECONDS", 20.0, _non_negative_float, "seconds"
        ),
        demo_mode=env.parsed("DEMO_MODE", False, _flag, "1 or 0 (true/false, yes/no, on/off)"),
        tiktok_rate_limits=env.parsed(
            "TIKTOK_RATE_LIMITS",
            tuple(DEFAULT_RATE_LIMITS.items()),
            _rate_limits,
            "comma-separated name=calls/seconds (e.g. user_info=600/60s,token=1200/60s; "
            "name=off for no limit)",
        ),
        tiktok_rate_limit_margin_seconds=env.parsed(
            "TIKTOK_RATE_LIMIT_MARGIN_SECONDS", DEFAULT_MARGIN_SECONDS, _non_negative_float,
            "seconds",
        ),
        tiktok_background_share=env.parsed(
            "TIKTOK_BACKGROUND_SHARE", DEFAULT_BACKGROUND_SHARE, _share,
            "a fraction above 0, at most 1",
        ),
        tiktok_fallback_share=env.parsed(
            "TIKTOK_FALLBACK_SHARE", DEFAULT_FALLBACK_SHARE, _fraction,
            "a fraction from 0 to 1",
        ),
        product_webhook_url=env.parsed(
            "PRODUCT_WEBHOOK_URL", None, _tls_url, "an absolute URL of your product's receiver"
        ),
        product_webhook_secrets=env.parsed(
            "PRODUCT_WEBHOOK_SECRET", (), _webhook_secrets, "comma-separated whsec_ secrets"
        ),
        product_webhook_retry_schedule=env.parsed(
            "PRODUCT_WEBHOOK_RETRY_SCHEDULE",
            DEFAULT_EVENT_RETRY_SCHEDULE,
            _retry_schedule,
            "comma-separated waits in seconds",
        ),
        events_retention_days=env.parsed("EVENTS_RETENTION_DAYS", 7, _positive_int, "days"),
        events_expiry_notice_days=env.parsed(
            "EVENTS_EXPIRY_NOTICE_DAYS", 14, _positive_int, "days"
        ),
    )
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


# -- TikTok rate limits (services/budget.py) ----------------------------------------

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


def _share(text: str) -> float:
    number = float(text)
    if not 0 < number <= 1:
        raise ValueError("must be above 0 and at most 1")
    return number


def _fraction(text: str) -> float:
    number = float(text)
    if not 0 <= number <= 1:
        raise ValueError("must be from 0 to 1")
    return number


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

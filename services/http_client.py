"""The HTTP client the gateway calls TikTok with, built once per process.

``curl`` (default when ``pycurl`` imports): Tornado's ``CurlAsyncHTTPClient``, a
libcurl multi handle whose keep-alive connections are reused across requests, so
a callback costs no TCP (or, against TikTok, TLS) handshake. ``simple``: Tornado's
pure-Python client, one new connection per request.

Both are bounded by ``TIKTOK_MAX_CONNECTIONS`` requests in flight (``TikTokClient``
holds calls beyond that itself, for a bounded time) and created with
``force_instance=True``: never the per-IOLoop shared ``AsyncHTTPClient()``, whose
settings any other code could change.

Both also report failures differently; ``is_refused``, ``is_timeout`` and
``nothing_sent`` read either: the simple client raises ``OSError(ECONNREFUSED)``
and ``HTTPTimeoutError``, curl raises ``CurlError`` (HTTP 599) with libcurl's code.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
from typing import Any, Protocol

from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient

log = logging.getLogger("gateway.http")

HTTP_CLIENTS = ("curl", "simple")
# Measured (README, "Sizing the pool"): at TikTok's ~200 ms a call, 500 keeps the pool
# from being a callback burst's bottleneck on one process; 50 capped it at ~110/s.
DEFAULT_MAX_CONNECTIONS = 500
# libcurl error codes (curl.h): nothing was sent / the time ran out.
CURLE_COULDNT_RESOLVE_HOST = 6
CURLE_COULDNT_CONNECT = 7
CURLE_OPERATION_TIMEDOUT = 28
# How each client words a timeout that struck before the request was written: curl
# while resolving or connecting (multi.c), Tornado's simple client while connecting
# or still queued. Any other timeout struck with the request sent, or maybe sent.
_CURL_UNSENT_TIMEOUTS = ("Resolving timed out", "Connection timed out")
_SIMPLE_UNSENT_TIMEOUTS = ("Timeout while connecting", "Timeout in request queue")


@functools.cache
def curl_available() -> bool:
    """Whether ``pycurl`` (and the libcurl its wheel bundles) imports."""
    try:
        import pycurl  # noqa: F401
        import tornado.curl_httpclient  # noqa: F401
    except ImportError:
        return False
    return True


def client_kind(configured: str | None) -> str:
    """The configured client, or curl when it imports and simple otherwise."""
    if configured:
        return configured
    return "curl" if curl_available() else "simple"


class HttpClientSettings(Protocol):
    """The settings ``make_http_client`` reads: ``services.config.Config`` has them.
    Named here, not imported: the configuration imports this module's defaults."""

    @property
    def tiktok_http_client(self) -> str | None: ...
    @property
    def tiktok_max_connections(self) -> int: ...


def make_http_client(config: HttpClientSettings) -> AsyncHTTPClient:
    """A new client for calls to TikTok; call it inside the running event loop.

    Its owner closes it (``close_http_client``) on shutdown.
    """
    kind = client_kind(config.tiktok_http_client)
    max_connections = config.tiktok_max_connections
    if kind == "curl":
        client: AsyncHTTPClient = _pooled_curl_client(max_connections)
    else:
        if config.tiktok_http_client is None:
            log.warning(
                "pycurl is not installed: calling TikTok with Tornado's simple HTTP client, "
                "which opens a new connection per request (pip install pycurl)"
            )
        client = SimpleAsyncHTTPClient(force_instance=True, max_clients=max_connections)
    log.info("TikTok HTTP client: %s, at most %d requests in flight", kind, max_connections)
    return client


def _pooled_curl_client(max_connections: int) -> AsyncHTTPClient:
    import pycurl
    from tornado.curl_httpclient import CurlAsyncHTTPClient

    client = CurlAsyncHTTPClient(
        force_instance=True,
        max_clients=max_connections,
        defaults={"prepare_curl_callback": _never_verbose},
    )
    # Keep as many idle connections as transfers may run at once (libcurl's own
    # default depends on the handles attached at the time).
    client._multi.setopt(pycurl.M_MAXCONNECTS, max_connections)
    return client


def _never_verbose(curl: Any) -> None:
    """Tornado turns libcurl's verbose trace on when its logger is at DEBUG, and
    that trace holds request headers and bodies: the client secret, codes, PKCE
    verifiers, tokens. Never, whatever LOG_LEVEL says."""
    import pycurl

    curl.setopt(pycurl.VERBOSE, 0)


def capacity_of(client: AsyncHTTPClient) -> int | None:
    """How many requests ``client`` runs at once, when it says (Tornado's simple and
    curl clients do); more wait in its own queue."""
    if isinstance(client, SimpleAsyncHTTPClient):
        return int(client.max_clients)
    curls = getattr(client, "_curls", None)  # the curl client: one handle per slot
    return len(curls) if isinstance(curls, list) else None


def close_http_client(client: AsyncHTTPClient | None) -> None:
    """Close a client made by ``make_http_client``, with its idle connections."""
    if client is None:
        return
    # Sockets of transfers still running are registered with the IOLoop: unregister
    # them first, or closing the loop later would close their numbers a second time.
    io_loop = getattr(client, "io_loop", None)
    for fd in list(getattr(client, "_fds", {})):
        with contextlib.suppress(Exception):
            io_loop.remove_handler(fd)  # type: ignore[union-attr]
    client.close()


def is_refused(exc: BaseException) -> bool:
    """The connection was refused: nothing was sent, so a retry is always safe."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ECONNREFUSED
    return _curl_code(exc) == CURLE_COULDNT_CONNECT


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, HTTPTimeoutError) or _curl_code(exc) == CURLE_OPERATION_TIMEDOUT


def nothing_sent(exc: BaseException) -> bool:
    """The request surely never reached the server: refused, its name not resolved,
    or timed out while connecting. Otherwise (a timeout or a dropped connection once
    connected) it may have arrived and been acted on, its answer lost."""
    if isinstance(exc, HTTPTimeoutError):
        return str(exc.message or "").startswith(_SIMPLE_UNSENT_TIMEOUTS)
    if isinstance(exc, OSError):
        # The simple client raises these from the connect itself; other socket
        # errors may come after the request was written.
        return exc.errno == errno.ECONNREFUSED or isinstance(exc, socket.gaierror)
    code = _curl_code(exc)
    if code in (CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_CONNECT):
        return True
    message = getattr(exc, "message", None) or ""
    return code == CURLE_OPERATION_TIMEDOUT and str(message).startswith(_CURL_UNSENT_TIMEOUTS)


def _curl_code(exc: BaseException) -> int | None:
    # CurlError keeps libcurl's error code in ``errno``; other 599s have none.
    code: int | None = getattr(exc, "errno", None) if isinstance(exc, HTTPClientError) else None
    return code

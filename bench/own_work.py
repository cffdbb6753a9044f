"""The gateway's own work per callback, without HTTP: ``python -m bench.own_work``.

Runs ``ConnectionService.complete`` (the callback minus Tornado's HTTP server)
in this process against a fake TikTok that answers at once, with no socket, no
HTTP client machinery beyond ``AsyncHTTPClient.fetch`` itself, and the memory
store. It reports the CPU microseconds per callback (plain, then under
cProfile) and where cProfile sees them go, grouped like ``bench.profile``:
state JWT, logging, store, metrics, JSON, URL encoding... Together with
``bench.floor`` (the HTTP alone) it splits a callback's cost in two.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import pstats
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders

from bench.profile import area_of

TOKEN = {
    "open_id": "bench-open-id", "access_token": "act." + "a" * 60,
    "refresh_token": "rft." + "r" * 60, "expires_in": 7200,
    "refresh_expires_in": 15552000, "scope": "user.info.basic", "token_type": "Bearer",
}
USER = {
    "data": {"user": {
        "open_id": "bench-open-id", "union_id": "bench-union-id", "display_name": "Bench",
        "avatar_url": "https://example.invalid/a.jpeg",
        "avatar_url_100": "https://example.invalid/b.jpeg",
        "avatar_large_url": "https://example.invalid/c.jpeg",
    }},
    "error": {"code": "ok", "message": "", "log_id": "bench-log-id"},
}


class InstantTikTok(AsyncHTTPClient):
    """Answers the token and user-info calls at once, from memory."""

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        body = TOKEN if "/oauth/token/" in request.url else USER
        callback(HTTPResponse(
            request, 200,
            headers=HTTPHeaders({"Content-Type": "application/json", "X-Tt-Logid": "bench"}),
            buffer=BytesIO(json.dumps(body).encode()),
        ))


async def measure(count: int, log_level: str) -> dict[str, Any]:
    from server import build_gateway
    from services.connect import CallbackParams
    from tests.support import make_config

    # Records are formatted and written as by `python server.py`, to a null stream.
    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115 - lives with the run
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=log_level, handlers=[handler], force=True)
    gateway = build_gateway(make_config(), http_client=InstantTikTok(force_instance=True))

    async def mint(n: int) -> list[CallbackParams]:
        params = []
        for index in range(n):
            started = await gateway.service.start(
                f"bench-user-{index % 1000}", "https://app.example.com/settings", None
            )
            params.append(CallbackParams(
                state=started.state, code=f"code-{index}", error=None,
                error_description=None, granted_scopes="user.info.basic",
            ))
        return params

    for params in await mint(200):  # warm-up
        await gateway.service.complete(params)
    callbacks = await mint(count)
    began = time.process_time()
    for params in callbacks:
        await gateway.service.complete(params)
    plain = (time.process_time() - began) / count

    callbacks = await mint(count)
    profiler = cProfile.Profile()
    began = time.process_time()
    profiler.enable()
    for params in callbacks:
        await gateway.service.complete(params)
    profiler.disable()
    profiled = (time.process_time() - began) / count

    areas: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = 0.0
    for (filename, line, name), (_, _, tottime, cumtime, _) in stats.items():
        total += tottime
        where = f"{name} ({filename.rsplit('site-packages/', 1)[-1]}:{line})"
        areas[area_of(f"x ({filename})") if filename != "~" else builtin_area(name)] += tottime
        functions[where] = max(functions[where], cumtime)
    return {
        "callbacks": count,
        "log_level": log_level,
        "cpu_us_per_callback": round(plain * 1e6, 1),
        "cpu_us_per_callback_under_cprofile": round(profiled * 1e6, 1),
        "areas_percent": [(a, round(100 * t / total, 1)) for a, t in areas.most_common()],
        "cumulative_us_per_callback_under_cprofile": [
            (f, round(t / count * 1e6, 1)) for f, t in functions.most_common(40)
        ],
    }


# Functions written in C (cProfile files them under "~"), by what their names say.
BUILTIN_AREAS = (
    # PyJWT 2.15 checks every character of each base64url segment in a generator.
    (("builtins.any",), "JWT (state)"),
    (("flush", "localtime", "strftime"), "logging"),
    (("AESGCM", "encrypt", "decrypt"), "token encryption (AES-GCM)"),
    (("hmac", "hashlib", "digest", "sha256"), "hashing (HMAC, SHA-256)"),
    (("scanner", "json", "encode_basestring"), "JSON"),
    (("urandom", "token_", "getrandbits", "uuid"), "random"),
    (("time", "monotonic", "fromtimestamp", "datetime"), "clock and datetimes"),
    (("b64", "base64", "binascii"), "base64"),
)


def builtin_area(name: str) -> str:
    for fragments, area in BUILTIN_AREAS:
        if any(fragment in name for fragment in fragments):
            return area
    return "other built-ins (isinstance, dict and str methods...)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.own_work", description=__doc__)
    parser.add_argument("--callbacks", type=int, default=3000)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.callbacks, args.log_level))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['cpu_us_per_callback']:.0f} us of CPU per callback "
          f"({result['cpu_us_per_callback_under_cprofile']:.0f} us under cProfile), "
          f"LOG_LEVEL={args.log_level}, fake TikTok, memory store, no HTTP server")
    print("self time by area (cProfile):")
    for area, share in result["areas_percent"]:
        print(f"  {share:5.1f}%  {area}")
    print("cumulative per callback (under cProfile, which inflates small calls):")
    for where, micros in result["cumulative_us_per_callback_under_cprofile"][:30]:
        print(f"  {micros:7.1f} us  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

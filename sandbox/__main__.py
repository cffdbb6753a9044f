"""Run the TikTok sandbox: ``python -m sandbox --port 9000``.

Point the gateway's TikTok authorize URL at ``http://HOST:PORT/v2/auth/authorize/``
and its API base URL at ``http://HOST:PORT``.

To play TikTok's webhooks (the user removes the app), with the sandbox's client secret
equal to the gateway's ``TIKTOK_CLIENT_SECRET``::

    curl -X POST http://HOST:PORT/sandbox/webhooks -d '{"url": \
      "http://127.0.0.1:8080/webhooks/tiktok", "open_id": "sbx-open-0001-4a1b-9c2d-000000000001",
      "reason": 1}'
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from sandbox.app import CONSENT_MODES, RateLimit, Sandbox
from sandbox.state import PKCE_MODES, SandboxClient

# Obviously fake, so nobody mistakes a sandbox run for a real TikTok app.
DEFAULT_CLIENT_KEY = "sandbox-client-key"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret-not-real"  # noqa: S105 (fake on purpose)
DEFAULT_REDIRECT_URI = "http://127.0.0.1:8080/oauth/tiktok/callback"


def _rate_limit(text: str) -> RateLimit:
    try:
        return RateLimit.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description="Local stand-in for TikTok's OAuth + user-info API.",
        epilog="POST /sandbox/webhooks {\"url\": ..., \"open_id\": ..., \"reason\": 1} sends "
        "a signed authorization.removed webhook (and revokes that user's tokens here).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--client-key", default=env.get("TIKTOK_CLIENT_KEY") or DEFAULT_CLIENT_KEY)
    parser.add_argument(
        "--client-secret", default=env.get("TIKTOK_CLIENT_SECRET") or DEFAULT_CLIENT_SECRET
    )
    parser.add_argument(
        "--redirect-uri",
        action="append",
        dest="redirect_uris",
        help="registered redirect URI, compared exactly (repeatable)",
    )
    parser.add_argument("--app-name", default="Sandbox App")
    parser.add_argument("--pkce", choices=PKCE_MODES, default="hex")
    parser.add_argument("--consent", choices=CONSENT_MODES, default="auto")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to API calls")
    parser.add_argument(
        "--user-info-rate-limit",
        type=_rate_limit,
        metavar="CALLS/SECONDS",
        help="enforce TikTok's per-app limit on /v2/user/info/ over a sliding window, "
        "answering 429 rate_limit_exceeded beyond it (TikTok's: 600/60s; default: none)",
    )
    parser.add_argument(
        "--revoke-empty-body",
        action="store_true",
        help="answer a successful revoke with an empty body, as TikTok's revoke page "
        "describes (default: {}, as its older page's example shows)",
    )
    parser.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    if not args.redirect_uris:
        args.redirect_uris = [env.get("TIKTOK_REDIRECT_URI") or DEFAULT_REDIRECT_URI]
    if args.latency < 0:
        parser.error("--latency must be >= 0")
    return args


async def run(args: argparse.Namespace) -> int:
    client = SandboxClient(
        client_key=args.client_key,
        client_secret=args.client_secret,
        redirect_uris=args.redirect_uris,
        app_name=args.app_name,
    )
    sandbox = Sandbox(
        [client],
        pkce=args.pkce,
        consent=args.consent,
        latency=args.latency,
        revoke_empty_body=args.revoke_empty_body,
        user_info_rate_limit=args.user_info_rate_limit,
    )
    port = sandbox.listen(args.port, args.host)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"TikTok sandbox listening on http://{host}:{port} "
        f"(client_key={client.client_key}, pkce={args.pkce}, consent={args.consent}, "
        f"revoke_body={'empty' if args.revoke_empty_body else '{}'}, "
        f"user_info_rate_limit={args.user_info_rate_limit or 'none'}, "
        f"redirect_uris={','.join(client.redirect_uris)})",
        flush=True,
    )
    await stop.wait()
    await sandbox.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

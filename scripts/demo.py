"""`make demo`: the sandbox as TikTok plus the gateway, and one whole flow to paste.

The gateway runs in demo mode (``DEMO_MODE=1``): ``/demo`` is a stand-in product page
to connect TikTok from a browser, through the sandbox's consent page.

Everything secret here is generated per run and fake; the sandbox stands in for
TikTok, so no real account or credential is involved.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_ORIGIN = "http://localhost:3000"
# The sandbox's consent page names the app; the demo page plays this product.
APP_NAME = "Acme Studio"


def wait_for_port(host: str, port: int, process: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: the {name} exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo: the {name} did not start listening on {host}:{port}")


def demo_environment(host: str, gateway_port: int, sandbox_port: int) -> dict[str, str]:
    sandbox = f"http://{host}:{sandbox_port}"
    return {
        **os.environ,
        "HOST": host,
        "PORT": str(gateway_port),
        "TIKTOK_CLIENT_KEY": "demo-client-key",
        "TIKTOK_CLIENT_SECRET": "demo-secret-" + secrets.token_hex(12),
        "TIKTOK_REDIRECT_URI": f"http://{host}:{gateway_port}/oauth/tiktok/callback",
        "TIKTOK_AUTHORIZE_URL": f"{sandbox}/v2/auth/authorize/",
        "TIKTOK_API_BASE_URL": sandbox,
        "TIKTOK_SCOPES": "user.info.basic,user.info.profile",
        "STATE_SECRET": secrets.token_urlsafe(48),
        "AUTH_JWT_SECRET": secrets.token_urlsafe(48),
        # The demo page sends the browser back to the gateway's own /demo.
        "ALLOWED_REDIRECT_ORIGINS": f"{PRODUCT_ORIGIN},http://{host}:{gateway_port}",
        "DEMO_MODE": "1",
        "TOKEN_ENCRYPTION_KEYS": "demo:" + base64.b64encode(os.urandom(32)).decode(),
        "PYTHONUNBUFFERED": "1",
    }


def curl_steps(gateway: str, token: str) -> str:
    return f"""\
# 1. Your backend starts a connection for its signed-in user (bearer = the product's JWT):
TOKEN='{token}'
AUTH_URL=$(curl -s -X POST {gateway}/oauth/tiktok/authorize \\
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
  -d '{{"redirectUri": "{PRODUCT_ORIGIN}/settings/connections"}}' \\
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["authorizationUrl"])')
echo "$AUTH_URL"

# 2. The browser visits TikTok (here the sandbox; sandbox_decision=approve presses its
#    Approve button for you) and is sent back to the gateway's callback with a code:
CALLBACK_URL=$(curl -s -o /dev/null -w '%{{redirect_url}}' "$AUTH_URL&sandbox_decision=approve")
echo "$CALLBACK_URL"

# 3. The gateway exchanges the code, stores the account, and sends the browser back:
curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}\\n' "$CALLBACK_URL"
#    -> 302 {PRODUCT_ORIGIN}/settings/connections?platform=tiktok&status=connected
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="gateway port")
    parser.add_argument("--sandbox-port", type=int, default=9000)
    args = parser.parse_args()

    env = demo_environment(args.host, args.port, args.sandbox_port)
    sandbox = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
        [
            sys.executable, "-m", "sandbox",
            "--host", args.host,
            "--port", str(args.sandbox_port),
            "--client-key", env["TIKTOK_CLIENT_KEY"],
            "--client-secret", env["TIKTOK_CLIENT_SECRET"],
            "--redirect-uri", env["TIKTOK_REDIRECT_URI"],
            "--consent", "page",
            "--app-name", APP_NAME,
        ],
        cwd=ROOT,
        env=env,
    )
    gateway = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=env)  # noqa: S603
    children = (gateway, sandbox)

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        wait_for_port(args.host, args.sandbox_port, sandbox, "sandbox")
        wait_for_port(args.host, args.port, gateway, "gateway")
        token = jwt.encode(
            {"sub": "demo-user-1", "iat": int(time.time()), "exp": int(time.time()) + 86400},
            env["AUTH_JWT_SECRET"],
            algorithm="HS256",
        )
        gateway_url = f"http://{args.host}:{args.port}"
        print(
            f"\nThe gateway is up on {gateway_url} with the in-memory store, and the TikTok "
            f"sandbox on http://{args.host}:{args.sandbox_port}.\n\n"
            f"Open {gateway_url}/demo in your browser.\n\n"
            "In another terminal, paste:\n\n"
            f"{curl_steps(gateway_url, token)}\nPress Ctrl+C to stop.\n",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())

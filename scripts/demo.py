"""`make demo`: the sandbox as TikTok plus the gateway, and one whole flow to paste.

The gateway runs in demo mode (``DEMO_MODE=1``): ``/demo`` is a stand-in product page
to connect TikTok from a browser, through the sandbox's consent page.

Everything secret here is generated per run and fake; the sandbox stands in for
TikTok, so no real account or credential is involved.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_ORIGIN = "http://localhost:3000"
# The sandbox's consent page names the app; the demo page plays this product.
APP_NAME = "Acme Studio"
# Ctrl+C, `kill`, the terminal closing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL_SECONDS = 0.1
CHILD_STOP_SECONDS = 10
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` by which Linux sends the child SIGTERM when this process dies,
    however it dies (even SIGKILL): no sandbox or gateway outlives the demo."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the demo died before the line above
            os._exit(1)

    return preexec


def wait_for_port(
    host: str, port: int, process: subprocess.Popen, name: str, stopping: Callable[[], bool]
) -> None:
    """Until ``port`` accepts connections, or a stop is asked for."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not stopping():
        if process.poll() is not None:
            raise SystemExit(f"demo: the {name} exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(POLL_SECONDS)
    if not stopping():
        raise SystemExit(f"demo: the {name} did not start listening on {host}:{port}")


def stop_children(children: dict[str, subprocess.Popen]) -> None:
    """SIGTERM (their graceful shutdown), then SIGKILL for one that does not end."""
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children.values():
        try:
            child.wait(timeout=CHILD_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


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
        # Account events are pushed to the demo product's own receiver, which verifies
        # them with this per-run signing secret (plain http: a loopback address).
        "PRODUCT_WEBHOOK_URL": f"http://{host}:{gateway_port}/demo/product/webhook",
        "PRODUCT_WEBHOOK_SECRET": "whsec_" + base64.b64encode(os.urandom(32)).decode(),
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
    # A stop signal only sets this flag; the loops below look at it, so a signal never
    # lands in the middle of starting or stopping a child.
    signals: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: signals.append(signum))
    children: dict[str, subprocess.Popen] = {}
    try:
        return run(args, env, children, lambda: bool(signals))
    finally:
        stop_children(children)


def run(
    args: argparse.Namespace,
    env: dict[str, str],
    children: dict[str, subprocess.Popen],
    stopping: Callable[[], bool],
) -> int:
    """Start the sandbox and the gateway into ``children``; serve until a stop signal
    (0) or until one of them exits on its own (1).

    Each child gets a process group of its own: Ctrl+C reaches only this process,
    which stops them with SIGTERM whatever they are doing (one still importing its
    modules would otherwise die of KeyboardInterrupt with a traceback).
    """
    preexec = die_with_parent()

    def spawn(argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(  # noqa: S603 - our own interpreter, fixed arguments
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, process_group=0,
            preexec_fn=preexec,  # safe: the demo runs no threads
        )

    children["sandbox"] = spawn(
        [
            sys.executable, "-m", "sandbox",
            "--host", args.host,
            "--port", str(args.sandbox_port),
            "--client-key", env["TIKTOK_CLIENT_KEY"],
            "--client-secret", env["TIKTOK_CLIENT_SECRET"],
            "--redirect-uri", env["TIKTOK_REDIRECT_URI"],
            "--consent", "page",
            "--app-name", APP_NAME,
        ]
    )
    children["gateway"] = spawn([sys.executable, "server.py"])
    wait_for_port(args.host, args.sandbox_port, children["sandbox"], "sandbox", stopping)
    wait_for_port(args.host, args.port, children["gateway"], "gateway", stopping)
    if stopping():
        return 0
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
    while not stopping():
        for name, child in children.items():
            # Checked again: Ctrl+C also reaches the children, which may end first.
            if child.poll() is not None and not stopping():
                print(f"demo: the {name} exited with code {child.returncode}; stopping",
                      file=sys.stderr, flush=True)
                return 1
        time.sleep(POLL_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

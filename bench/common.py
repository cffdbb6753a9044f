"""What the benchmark scripts share: where things are, the child processes they start,
the environment they give them, and how they wait for them (``bench.run``,
``bench.burst``, ``bench.simulate`` and ``bench.mongo_scale`` use it)."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
LOOPBACK = "127.0.0.1"
PRODUCT_ORIGIN = "http://localhost:3000"
CLIENT_KEY = "bench-client-key"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class Service:
    """A child process with its output in a log file; always stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"bench-{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter, fixed argv
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()

    def tail(self, limit: int = 3000) -> str:
        return self.log_path.read_bytes()[-limit:].decode(errors="replace")


def wait_http(service: Service, url: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise SystemExit(f"{service.name} exited:\n{service.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{service.name} did not answer {url} within {timeout:.0f}s")


def memory_of(pid: int) -> dict[str, float]:
    """``VmHWM`` (peak resident set since start or the last reset) and ``VmRSS``, MB."""
    figures: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                figures[key] = int(value.split()[0]) / 1024
    return figures


def max_in_window(times: Sequence[float], seconds: float) -> int:
    """The most of ``times`` (ascending) within any window of ``seconds``."""
    best, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - seconds:
            first += 1
        best = max(best, last - first + 1)
    return best


def _gateway_variable(name: str) -> bool:
    prefixes = ("TIKTOK_", "MONGODB_", "STATE_", "AUTH_JWT_", "ALLOWED_REDIRECT_",
                "TOKEN_ENCRYPTION_", "REFRESH_", "WEBHOOK_", "LOG_", "WORKERS", "SHUTDOWN_")
    return name.startswith(prefixes) or name in ("HOST", "PORT", "PROMETHEUS_MULTIPROC_DIR")


def inherited_environment() -> dict[str, str]:
    """This process's environment without the gateway's variables: a child gets only
    the settings the benchmark gives it, whatever the shell running it has set."""
    return {k: v for k, v in os.environ.items() if not _gateway_variable(k)}


def gateway_secrets(redirect_uri: str) -> dict[str, str]:
    """Fresh credentials for one run, the same in the sandbox's and the gateway's env."""
    return {
        "TIKTOK_CLIENT_KEY": CLIENT_KEY,
        "TIKTOK_CLIENT_SECRET": secrets.token_urlsafe(32),
        "TIKTOK_REDIRECT_URI": redirect_uri,
        "STATE_SECRET": secrets.token_urlsafe(48),
        "AUTH_JWT_SECRET": secrets.token_urlsafe(48),
    }


def against_sandbox(sandbox_url: str, log_level: str) -> dict[str, str]:
    """A gateway's settings for TikTok played by the sandbox at ``sandbox_url``."""
    return {
        "HOST": LOOPBACK,
        "ALLOWED_REDIRECT_ORIGINS": PRODUCT_ORIGIN,
        "TIKTOK_API_BASE_URL": sandbox_url,
        "TIKTOK_AUTHORIZE_URL": f"{sandbox_url}/v2/auth/authorize/",
        "LOG_LEVEL": log_level,
    }


def mongodb_settings(uri: str, driver: str, database_prefix: str) -> dict[str, str]:
    """A gateway's settings for a database of its own on ``uri`` (encrypted tokens)."""
    return {
        "MONGODB_URI": uri,
        "MONGODB_DRIVER": driver,
        "MONGODB_DATABASE": f"{database_prefix}_{uuid.uuid4().hex[:12]}",
        "TOKEN_ENCRYPTION_KEYS": "k1:" + base64.b64encode(os.urandom(32)).decode(),
    }


@contextlib.contextmanager
def secantus_server(prefix: str) -> Iterator[str]:
    """A SecantusDB server process (the tests' MongoDB) on a temporary directory named
    with ``prefix``; its URI."""
    from tests.fixtures_mongo import SecantusProcess

    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        server = SecantusProcess(Path(directory) / "data")
        server.start()
        try:
            yield server.uri
        finally:
            server.stop()

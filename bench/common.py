"""What the benchmark scripts share: where things are, the child processes they start,
and how they wait for them (``bench.run`` and ``bench.burst`` both use it)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
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


def _gateway_variable(name: str) -> bool:
    prefixes = ("TIKTOK_", "MONGODB_", "STATE_", "AUTH_JWT_", "ALLOWED_REDIRECT_",
                "TOKEN_ENCRYPTION_", "REFRESH_", "WEBHOOK_", "LOG_", "WORKERS", "SHUTDOWN_")
    return name.startswith(prefixes) or name in ("HOST", "PORT", "PROMETHEUS_MULTIPROC_DIR")

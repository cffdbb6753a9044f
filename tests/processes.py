"""The gateway as its own process (``python server.py``), for outage and multi-process
tests, and the demo (``scripts/demo.py``, what ``make demo`` runs).

``GatewayProcess`` starts ``server.py`` with a test environment on a free loopback
port, writes its output to a log file (quoted when something goes wrong) and stops
it with SIGTERM, as a process manager would; ``started_gateway`` also waits until it
answers. ``poll_until`` is the one bounded wait these tests use. ``demo_process``
starts the demo on free ports; ``until_ready`` reads what it prints until it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse

from services.config import SETTINGS
from storage.mongodb import (
    ACCOUNT_KEY_INDEX,
    ACCOUNTS_COLLECTION,
    PENDING_COLLECTION,
    PENDING_TTL_INDEX,
)
from tests.fixtures_mongo import mongo_settings, raw_database
from tests.flow import sandbox_settings
from tests.support import LOOPBACK, ROOT, environ, free_port

_STOP_TIMEOUT_S = 15.0
# Variables the gateway reads: never inherited from the developer's shell.
_CONFIG_NAMES = frozenset(item.name for item in SETTINGS)

_T = TypeVar("_T")


async def poll_until(
    probe: Callable[[], Awaitable[_T]],
    accept: Callable[[_T], bool],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str,
) -> _T:
    """Call ``probe`` until ``accept`` approves its result; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if accept(last):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout:.0f}s; last: {last!r}")
        await asyncio.sleep(interval)


def gateway_settings(
    mongodb_uri: str, database: str, sandbox_url: str, *, driver: str = "motor", **extra: str
) -> dict[str, str]:
    """Environment of a gateway on MongoDB and the sandbox, with a 500 ms store timeout."""
    return {
        **mongo_settings(mongodb_uri, database, driver),
        "MONGODB_TIMEOUT_MS": "500",
        "TIKTOK_REQUEST_TIMEOUT_SECONDS": "2",
        **sandbox_settings(sandbox_url),
        **extra,
    }


async def wait_for_indexes(uri: str, database_name: str, timeout: float = 20.0) -> dict[str, Any]:
    """Until the gateway's ``initialize_store`` has created its indexes (bounded).

    Also a precondition for the first write through a gateway: SecantusDB 0.7.0b3
    deadlocks (the whole server) when ``createIndexes`` and the first insert or
    upsert into the same not-yet-existing collection run at once, which is
    exactly a gateway's background start-up racing its first ``/authorize``.
    mongod has no such problem; the tests wait instead of tripping over it.
    """
    with raw_database(uri, database_name) as database:
        async def indexes() -> dict[str, Any]:
            return {
                "accounts": database[ACCOUNTS_COLLECTION].index_information(),
                "states": database[PENDING_COLLECTION].index_information(),
            }

        return await poll_until(
            indexes,
            lambda i: ACCOUNT_KEY_INDEX in i["accounts"] and PENDING_TTL_INDEX in i["states"],
            timeout=timeout,
            what="indexes created by the gateway",
        )


class GatewayProcess:
    """``python server.py`` on a free port; a context manager that always stops it."""

    def __init__(self, log_path: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = Path(log_path)
        inherited = {
            name: value
            for name, value in os.environ.items()
            if name not in _CONFIG_NAMES
        }
        self.env = inherited | environ(
            HOST=LOOPBACK, PORT=str(self.port), LOG_LEVEL="INFO", **settings
        )
        self.returncode: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # whatever happened inside: it always stops

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("gateway process already started")
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "server.py"],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> int | None:
        """SIGTERM (the gateway's graceful shutdown), SIGKILL if that does not end it."""
        process, self._process = self._process, None
        try:
            if process is not None:
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=_STOP_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(timeout=_STOP_TIMEOUT_S)
                self.returncode = process.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return self.returncode

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("gateway process not started")
        return self._process.pid

    def send_signal(self, signum: int) -> None:
        """Signal the process and return at once (``stop()`` still cleans up)."""
        if self._process is None:
            raise RuntimeError("gateway process not started")
        self._process.send_signal(signum)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        """Until the process exits; its exit code. Polled, so the test's event loop
        (and an in-process sandbox the gateway may be calling) keeps running."""
        process = self._process
        if process is None:
            raise RuntimeError("gateway process not started")

        async def exit_code() -> int | None:
            return process.poll()

        try:
            code = await poll_until(
                exit_code, lambda code: code is not None, timeout=timeout,
                what=f"gateway (pid {process.pid}) exited",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- gateway output ---\n{self.log_tail()}") from None
        assert code is not None
        return code

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return "(no output)"

    async def get(self, client: AsyncHTTPClient, path: str) -> HTTPResponse | None:
        """GET ``path``; ``None`` when nothing answers (not listening yet, or gone)."""
        try:
            return await client.fetch(
                self.url + path, raise_error=False, request_timeout=5, connect_timeout=1
            )
        except (OSError, HTTPClientError):
            return None

    async def wait_healthy(self, client: AsyncHTTPClient, timeout: float = 20.0) -> None:
        """Until ``/healthz`` answers 200; fails at once, with its output, if it exits."""

        async def probe() -> HTTPResponse | None:
            if not self.running:
                code = self._process.returncode if self._process is not None else None
                raise AssertionError(f"gateway exited with code {code}")
            return await self.get(client, "/healthz")

        try:
            await poll_until(
                probe, lambda r: r is not None and r.code == 200, timeout=timeout,
                what=f"gateway {self.url} healthy",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- gateway output ---\n{self.log_tail()}") from None

    async def wait_ready(self, client: AsyncHTTPClient, timeout: float = 20.0) -> None:
        """Until ``/readyz`` answers 200 (the store answers)."""
        await self.wait_healthy(client, timeout)
        try:
            await poll_until(
                lambda: self.get(client, "/readyz"),
                lambda r: r is not None and r.code == 200,
                timeout=timeout,
                what=f"gateway {self.url} ready",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- gateway output ---\n{self.log_tail()}") from None


@contextlib.asynccontextmanager
async def started_gateway(
    client: AsyncHTTPClient, log_path: Path, *, ready: bool = True, timeout: float = 20.0,
    **settings: str,
) -> AsyncIterator[GatewayProcess]:
    """A ``GatewayProcess`` answering: ``/readyz`` 200 (its store answers), or with
    ``ready=False`` only ``/healthz``; stopped on the way out."""
    with GatewayProcess(log_path, **settings) as gateway:
        await (gateway.wait_ready if ready else gateway.wait_healthy)(client, timeout)
        yield gateway


def demo_process(**popen: Any) -> subprocess.Popen[str]:
    """``scripts/demo.py`` on two free ports, its standard output piped as text
    (``popen``: more ``subprocess.Popen`` arguments, ``stderr`` among them)."""
    return subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, "scripts/demo.py", "--port", str(free_port()),
         "--sandbox-port", str(free_port())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        **popen,
    )


def until_ready(demo: subprocess.Popen[str]) -> str:
    """What the demo printed up to the line that says it is ready (``Press Ctrl+C``)."""
    assert demo.stdout is not None
    printed = []
    for line in demo.stdout:
        printed.append(line)
        if line.startswith("Press Ctrl+C"):
            break
    return "".join(printed)

"""Fixtures for tests against a real MongoDB wire-protocol server (SecantusDB).

Nothing here mocks a driver: the stores talk to SecantusDB over TCP.

* ``mongo_server`` (session): an in-process SecantusDB on a free loopback port;
  use ``mongo_server.uri``.
* ``mongo_database_name`` (function): a fresh database name per test.
* ``mongo_driver`` (function, parametrized ``motor`` / ``pymongo``).
* ``mongo_process`` (function): a ``SecantusProcess``, a SecantusDB in a child
  process that a test can ``stop()`` / ``kill()`` / ``start()`` / ``restart()``
  (same port, same data directory, so data survives a restart).
* ``open_mongo_store(uri, database, driver)``: async context manager yielding an
  initialized ``MongoStore`` and closing its client. Drivers bind to the running
  event loop, so call it inside the ``gen_test`` coroutine, never in a sync
  fixture.
* ``collect_leaked_driver_sockets()``: see there (a pymongo async bug); the
  ``mongo_driver`` fixture runs it at teardown.
* ``mongo_failpoint(uri, **data)``: context manager arming SecantusDB's
  ``failCommand`` failpoint (mongod's test command) and disarming it on exit.
* ``make_store`` (function, parametrized ``memory`` / ``motor`` / ``pymongo``):
  ``async with make_store() as store:`` (optionally ``make_store(cipher)``), an
  initialized store of each backend, opened inside the test's running loop.
* ``mongo_settings(uri, database, driver)``: a gateway's settings for that store.
* ``raw_database(uri, name)``: context manager yielding the database through a
  synchronous client of its own, to see what the gateway wrote.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from secantus import SecantusDBServer

from storage.base import Account, PendingAuthorization, Store, TokenGrant
from storage.crypto import TokenCipher
from storage.memory import MemoryStore
from storage.mongodb import MongoStore, connect_mongo
from tests.support import LOOPBACK, fake_grant, fake_pending, free_port, utc_now

StoreFactory = Callable[..., contextlib.AbstractAsyncContextManager[Store]]
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2):
            return True
    except OSError:
        return False


# The daemon run by ``SecantusProcess``. Not ``python -m secantus``: its main
# thread waits in ``Event.wait()`` for a Python signal handler, and a SIGTERM
# that lands just as it enters that wait (or on one of its other threads) is
# never handled, so ``stop()`` right after ``start()`` hung about one time in
# five. Here every thread blocks SIGTERM/SIGINT and the main thread takes them
# with ``sigwait``, which cannot miss one. Same server class and options the
# CLI uses (single-node replica set "secantus", durable WiredTiger journal),
# plus test commands (``configureFailPoint``).
_DAEMON = """
import contextlib, signal, socket, sys
from secantus.server import SecantusDBServer

host, port, storage_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
signals = {signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # inherited by every thread
server = SecantusDBServer(
    host=host, port=port, storage_path=storage_path, enable_test_commands=True, durable=True
)
server.start()
signal.sigwait(signals)
# Wake the accept() thread now rather than after stop()'s 2 s join timeout.
with contextlib.suppress(Exception):
    server._socket.shutdown(socket.SHUT_RDWR)
server.stop()
"""


class SecantusProcess:
    """A SecantusDB server in a child process, for outage and restart tests.

    ``start()`` blocks until the port accepts connections (or raises
    ``RuntimeError`` with the server's output); ``stop()`` is a clean shutdown
    (SIGTERM); ``kill()`` is a crash (SIGKILL; committed writes survive, the
    journal is replayed on the next start); ``restart()`` is stop + start.
    The port and the storage directory stay the same, so data survives.
    """

    def __init__(self, storage_path: Path, port: int | None = None) -> None:
        self.storage_path = Path(storage_path)
        self.port = port if port is not None else free_port()
        self.log_path = self.storage_path.parent / f"{self.storage_path.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def uri(self) -> str:
        return f"mongodb://{LOOPBACK}:{self.port}/"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = _START_TIMEOUT_S) -> None:
        if self.running:
            raise RuntimeError("SecantusDB process is already running")
        self.storage_path.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        env = dict(os.environ)
        env.pop("SECANTUS_TEST_FAST_STORAGE", None)  # would disable the journal
        self._process = subprocess.Popen(  # noqa: S603 - fixed argv, our own interpreter
            [
                sys.executable,
                "-c",
                _DAEMON,
                LOOPBACK,
                str(self.port),
                str(self.storage_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._cleanup()
                raise RuntimeError(
                    f"SecantusDB exited with code {code} before listening on "
                    f"{LOOPBACK}:{self.port}:\n{self._log_tail()}"
                )
            if _port_accepts(self.port):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"SecantusDB did not accept connections on {LOOPBACK}:{self.port} within "
            f"{timeout:.0f}s:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, signum: int) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_TIMEOUT_S)
        self._cleanup()

    def _cleanup(self) -> None:
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return "(no output)"


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecantusDBServer]:
    storage = tmp_path_factory.mktemp("secantus")
    server = SecantusDBServer(host=LOOPBACK, port=0, storage_path=str(storage))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mongo_database_name() -> str:
    return f"test_{uuid.uuid4().hex}"


def collect_leaked_driver_sockets() -> None:
    """Collect sockets pymongo's async driver leaks, without a ResourceWarning.

    pymongo 4.20.1 (PYTHON-5867): ``AsyncMongoClient.close()`` cancels its
    monitor tasks, and a monitor cancelled while connecting (typically: MongoDB
    is down and it keeps retrying) never closes the socket it was connecting
    with. The socket lives on in the cancelled task until a garbage collection,
    whose ``ResourceWarning`` then fails whichever test happens to be running.
    Call this after the client is closed and unreferenced (fixture teardown).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"unclosed <socket\.socket", category=ResourceWarning
        )
        gc.collect()


@pytest.fixture(params=["motor", "pymongo"], ids=["motor", "pymongo"])
def mongo_driver(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.param)
    if request.param == "pymongo":
        collect_leaked_driver_sockets()


@pytest.fixture(params=["memory", "motor", "pymongo"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The store backend a gateway under test runs on, one per parameter."""
    yield str(request.param)
    if request.param == "pymongo":
        collect_leaked_driver_sockets()


@pytest.fixture
def mongo_process(tmp_path: Path) -> Iterator[SecantusProcess]:
    process = SecantusProcess(tmp_path / "secantus-data")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@contextlib.asynccontextmanager
async def open_mongo_store(
    uri: str,
    database: str,
    driver: str,
    cipher: TokenCipher | None = None,
    *,
    initialize: bool = True,
    server_selection_timeout_ms: int = 2000,
) -> AsyncIterator[MongoStore]:
    """An initialized ``MongoStore`` on a client created in the running loop."""
    client, db = connect_mongo(
        uri,
        database,
        driver=driver,
        server_selection_timeout_ms=server_selection_timeout_ms,
        connect_timeout_ms=server_selection_timeout_ms,
    )
    store = MongoStore(db, cipher or TokenCipher.ephemeral(), client=client)
    try:
        if initialize:
            await store.initialize()
        yield store
    finally:
        with contextlib.suppress(Exception):
            await store.close()


@contextlib.asynccontextmanager
async def open_memory_store(cipher: TokenCipher | None = None) -> AsyncIterator[Store]:
    store = MemoryStore(cipher)
    await store.initialize()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "motor", "pymongo"])
def make_store(request: pytest.FixtureRequest, mongo_database_name: str) -> Iterator[StoreFactory]:
    """``async with make_store() as store:`` -- one backend per parameter."""
    if request.param == "memory":
        yield open_memory_store
        return
    server = request.getfixturevalue("mongo_server")
    yield functools.partial(open_mongo_store, server.uri, mongo_database_name, request.param)
    if request.param == "pymongo":
        collect_leaked_driver_sockets()


def mongo_settings(uri: str, database: str, driver: str = "motor") -> dict[str, str]:
    """A gateway's settings for its store on ``database`` (``make_config(**...)``)."""
    return {"MONGODB_URI": uri, "MONGODB_DATABASE": database, "MONGODB_DRIVER": driver}


@contextlib.contextmanager
def raw_database(uri: str, name: str) -> Iterator[Any]:
    """The database ``name`` through a synchronous client of its own, closed on exit:
    what the gateway wrote, as MongoDB holds it."""
    client: MongoClient[dict[str, Any]] = MongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=5000
    )
    try:
        yield client[name]
    finally:
        client.close()


@contextlib.contextmanager
def mongo_failpoint(uri: str, mode: Any = "alwaysOn", **data: Any) -> Iterator[None]:
    """Arm ``failCommand``, e.g. ``failCommands=["find"], errorCode=13`` or
    ``closeConnection=True``; ``mode`` is ``"alwaysOn"`` or ``{"times": n}``.

    Like mongod, SecantusDB refuses to inject codes that need extra info
    (11000 DuplicateKey among them): the command then fails with 40671.
    Failpoints are server-wide; this one is disarmed on exit. The admin client
    uses its own appname, so ``appName="tiktok-gateway"`` can scope a failpoint
    to the gateway's clients while this one can still switch it off.
    """
    admin: MongoClient[dict[str, Any]] = MongoClient(
        uri, appname="tests-failpoint-admin", serverSelectionTimeoutMS=5000
    )
    try:
        admin.admin.command({"configureFailPoint": "failCommand", "mode": mode, "data": data})
        try:
            yield
        finally:
            admin.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    finally:
        admin.close()


@contextlib.asynccontextmanager
async def saved_pending(
    make_store: StoreFactory, **kwargs: Any
) -> AsyncIterator[tuple[Store, PendingAuthorization, datetime]]:
    """A store holding one pending authorization made ``now``."""
    now = utc_now()
    pending = fake_pending(now=now, **kwargs)
    async with make_store() as store:
        await store.save_pending(pending)
        yield store, pending, now


@contextlib.asynccontextmanager
async def saved_account(
    make_store: StoreFactory, owner: str
) -> AsyncIterator[tuple[Any, Account, TokenGrant, datetime]]:
    """A store holding ``owner``'s account, connected ``now`` with ``grant``."""
    now = utc_now()
    grant = fake_grant(now=now)
    async with make_store() as store:
        account = await store.save_account_tokens(owner, grant, now=now)
        yield store, account, grant, now


__all__ = [
    "SecantusProcess",
    "collect_leaked_driver_sockets",
    "mongo_database_name",
    "mongo_driver",
    "mongo_failpoint",
    "mongo_process",
    "mongo_server",
    "mongo_settings",
    "open_mongo_store",
    "raw_database",
]

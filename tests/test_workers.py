"""``WORKERS=N``: N forked gateway processes on one port, supervised by the first.

The gateway runs as ``python server.py`` (``tests.processes.GatewayProcess``) on the
session's SecantusDB (``mongo_server``, a fresh database per test); TikTok is the
in-process sandbox, served on the test's event loop. The workers are found through
the process tree (``/proc``), not through anything the gateway answers. Every wait
is a bounded poll; the supervisor is stopped, and any worker left is killed, in
``finally``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from tornado.httpclient import AsyncHTTPClient

from core.errors import ConfigError
from services.metrics import prepare_multiprocess_dir
from storage.mongodb import ACCOUNTS_COLLECTION
from tests.fixtures_mongo import raw_database
from tests.flow import connect
from tests.processes import ROOT, GatewayProcess, gateway_settings, poll_until, wait_for_indexes
from tests.support import Scrape, make_config

WORKERS = 2
TIMEOUT_S = 30.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def live_children(parent: int) -> set[int]:
    """The children of ``parent`` that are alive (zombies excluded), from ``/proc``."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may itself hold spaces and parentheses.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z":
            children.add(int(entry.name))
    return children


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def workers_of(
    gateway: GatewayProcess, accept: Callable[[set[int]], bool] | None = None
) -> set[int]:
    """Until the supervisor has exactly ``WORKERS`` live children (and ``accept`` agrees)."""

    async def children() -> set[int]:
        return live_children(gateway.pid)

    return await poll_until(
        children,
        lambda pids: len(pids) == WORKERS and (accept is None or accept(pids)),
        timeout=TIMEOUT_S,
        what=f"{WORKERS} workers under pid {gateway.pid}",
    )


async def log_count(gateway: GatewayProcess, text: str, count: int) -> None:
    async def occurrences() -> int:
        return gateway.log_path.read_text(errors="replace").count(text)

    await poll_until(
        occurrences, lambda n: n >= count, timeout=TIMEOUT_S, what=f"{count} x {text!r} logged"
    )


async def assert_metrics_of_all_workers(
    client: AsyncHTTPClient, gateway: GatewayProcess, *, starts: int, connected: int
) -> None:
    """Whichever worker answers, ``/metrics`` sums every worker, dead ones included:
    each worker that started created the indexes once."""
    for _ in range(8):  # several scrapes, so more than one worker answers some
        response = await gateway.get(client, "/metrics")
        assert response is not None and response.code == 200
        scrape = Scrape(response.body.decode())
        initialized = scrape.value(
            "tiktok_gateway_store_operation_seconds_count", operation="initialize"
        )
        assert initialized == starts, scrape.samples
        assert scrape.value("tiktok_gateway_callbacks_total", outcome="connected") == connected
        assert scrape.value("tiktok_gateway_callbacks_in_flight") == 0


def refreshers_started(gateway: GatewayProcess) -> int:
    return gateway.log_path.read_text(errors="replace").count("background refresh every")


def worker_number(gateway: GatewayProcess, pid: int) -> int:
    [number] = re.findall(rf"worker (\d+) \(pid {pid}\) serving",
                          gateway.log_path.read_text(errors="replace"))
    return int(number)


def count_accounts(uri: str, database_name: str) -> int:
    with raw_database(uri, database_name) as database:
        return database[ACCOUNTS_COLLECTION].count_documents({})


@pytest.mark.gen_test(timeout=120)
async def test_workers_share_one_port_restart_after_a_crash_and_stop_on_sigterm(
    tmp_path, mongo_server, mongo_database_name, sandbox, client
):
    settings = gateway_settings(
        mongo_server.uri, mongo_database_name, sandbox.url, WORKERS=str(WORKERS)
    )
    gateway = GatewayProcess(tmp_path / "gateway.log", **settings)
    seen: set[int] = set()
    try:
        gateway.start()
        workers = await workers_of(gateway)
        seen |= workers
        assert gateway.pid not in workers
        await gateway.wait_ready(client, TIMEOUT_S)
        # Both workers created the indexes before the first write (see wait_for_indexes).
        await log_count(gateway, "store ready", WORKERS)
        await wait_for_indexes(mongo_server.uri, mongo_database_name)

        # Whole flows at once, each state started and completed by whichever worker
        # the kernel hands the connection to: the states live in MongoDB.
        owners = [f"user-{n}" for n in range(6)]
        await asyncio.gather(*(connect(client, gateway.url, owner=owner) for owner in owners))
        assert sandbox.stats["token"] == len(owners)
        assert count_accounts(mongo_server.uri, mongo_database_name) == len(owners)
        health = await asyncio.gather(*(gateway.get(client, "/healthz") for _ in range(20)))
        assert all(r is not None and r.code == 200 for r in health)
        await assert_metrics_of_all_workers(client, gateway, starts=WORKERS,
                                            connected=len(owners))
        # One refresher for the gateway, in worker 0: one REFRESH_MAX_PER_MINUTE budget.
        assert refreshers_started(gateway) == 1

        # A worker that crashes is replaced; the port keeps answering.
        crashed = min(workers)
        crashed_number = worker_number(gateway, crashed)
        os.kill(crashed, signal.SIGKILL)
        workers = await workers_of(gateway, lambda pids: crashed not in pids)
        seen |= workers
        await log_count(gateway, "store ready", WORKERS + 1)
        # A new worker 0 starts the refresher again; any other does not.
        assert refreshers_started(gateway) == (2 if crashed_number == 0 else 1)
        await connect(client, gateway.url, owner="user-after-crash")
        assert count_accounts(mongo_server.uri, mongo_database_name) == len(owners) + 1
        # The crashed worker's counts stay; its replacement's add up.
        await assert_metrics_of_all_workers(client, gateway, starts=WORKERS + 1,
                                            connected=len(owners) + 1)

        # SIGTERM to the supervisor stops every worker gracefully, then itself: 0.
        gateway.send_signal(signal.SIGTERM)
        assert await gateway.wait_exit(TIMEOUT_S) == 0
        assert not any(alive(pid) for pid in workers)
        log = gateway.log_path.read_text(errors="replace")
        assert log.count("shutdown complete") == WORKERS, log
        assert "all workers stopped" in log, log
        assert "Traceback" not in log, log
        # The metrics directory the supervisor made for the workers is gone with it.
        [metrics_dir] = re.findall(r"the workers' metrics are kept in (\S+)", log)
        assert not Path(metrics_dir).exists()
    finally:
        gateway.stop()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def unused_pid() -> int:
    """A process id no process has right now."""
    pid = 4_000_000
    while alive(pid) or Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


def leave_in_flight_gauge(directory: Path, pid: int, value: float) -> None:
    """The in-flight gauge file a worker killed mid-callback would leave behind."""
    name = "tiktok_gateway_callbacks_in_flight"
    gauge = MmapedDict(str(directory / f"gauge_livesum_{pid}.db"))
    try:
        gauge.write_value(mmap_key(name, name, [], [], "OAuth callbacks being handled right now."),
                          value, 0.0)
    finally:
        gauge.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_configured_metrics_directory_and_a_dead_workers_in_flight_gauge(
    tmp_path, mongo_server, mongo_database_name, sandbox, client
):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    stale = metrics_dir / "counter_4000001.db"  # an earlier run's
    stale.write_bytes(b"")
    settings = gateway_settings(mongo_server.uri, mongo_database_name, sandbox.url,
                                WORKERS=str(WORKERS), PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    gateway = GatewayProcess(tmp_path / "gateway.log", **settings)
    seen: set[int] = set()

    async def in_flight() -> float | None:
        response = await gateway.get(client, "/metrics")
        assert response is not None and response.code == 200
        return Scrape(response.body.decode()).value("tiktok_gateway_callbacks_in_flight")

    try:
        gateway.start()
        workers = await workers_of(gateway)
        seen |= workers
        await gateway.wait_ready(client, TIMEOUT_S)
        await log_count(gateway, "store ready", WORKERS)
        # Emptied at start; then each worker writes files of its own there.
        assert not stale.exists()
        writers = {int(pid) for pid in re.findall(r"_(\d+)\.db", " ".join(
            path.name for path in metrics_dir.iterdir()))}
        assert workers <= writers

        # A worker killed with 3 callbacks in flight left its gauge: it counts until
        # the next worker starts, which drops it.
        leave_in_flight_gauge(metrics_dir, unused_pid(), 3)
        assert await in_flight() == 3
        crashed = min(workers)
        os.kill(crashed, signal.SIGKILL)
        workers = await workers_of(gateway, lambda pids: crashed not in pids)
        seen |= workers
        await log_count(gateway, "store ready", WORKERS + 1)
        assert await in_flight() == 0

        gateway.send_signal(signal.SIGTERM)
        assert await gateway.wait_exit(TIMEOUT_S) == 0
        assert metrics_dir.is_dir()  # the operator's directory stays
        # Workers that stopped gracefully took their live gauges with them.
        assert not list(metrics_dir.glob("gauge_live*.db"))
        assert list(metrics_dir.glob("counter_*.db"))
    finally:
        gateway.stop()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_configured_metrics_directory_loses_only_metric_files(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    stale = [metrics_dir / f"{kind}_4000001.db" for kind in ("counter", "gauge_livesum",
                                                            "histogram", "summary")]
    for path in stale:
        path.write_bytes(b"")
    unrelated = metrics_dir / "notes.db"  # someone else's file: never deleted
    unrelated.write_text("keep me")
    config = make_config(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    assert prepare_multiprocess_dir(config.prometheus_multiproc_dir) == (str(metrics_dir), False)
    assert not any(path.exists() for path in stale)
    assert unrelated.read_text() == "keep me"


def refused_start_up(gateway: GatewayProcess) -> str:
    """Run ``python server.py`` with the gateway's environment: it must refuse to start
    (exit code 2); what it said."""
    result = subprocess.run(
        [sys.executable, "server.py"], cwd=ROOT, env=gateway.env, stdin=subprocess.DEVNULL,
        capture_output=True, timeout=TIMEOUT_S, check=False,
    )
    assert result.returncode == 2, result
    return result.stderr.decode()


def test_an_unusable_metrics_directory_stops_the_start_up(tmp_path):
    not_a_directory = tmp_path / "metrics"
    not_a_directory.write_text("a file")
    gateway = GatewayProcess(tmp_path / "gateway.log", WORKERS="2",
                             MONGODB_URI="mongodb://127.0.0.1:9/",
                             PROMETHEUS_MULTIPROC_DIR=str(not_a_directory))
    stderr = refused_start_up(gateway)
    assert "no directory for the workers' metrics (PROMETHEUS_MULTIPROC_DIR)" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_several_workers_require_mongodb(tmp_path):
    gateway = GatewayProcess(tmp_path / "gateway.log", WORKERS="2")
    assert "MONGODB_URI" not in gateway.env
    stderr = refused_start_up(gateway)
    assert "WORKERS=2 requires MONGODB_URI" in stderr, stderr
    assert "in-memory store" in stderr, stderr


def test_workers_configuration():
    assert make_config().workers == 1
    assert make_config(WORKERS="1").workers == 1
    assert make_config(WORKERS="4", MONGODB_URI="mongodb://db.internal/").workers == 4
    with pytest.raises(ConfigError, match="WORKERS=3 requires MONGODB_URI"):
        make_config(WORKERS="3")
    for bad in ("0", "-2", "two"):
        with pytest.raises(ConfigError, match="WORKERS"):
            make_config(WORKERS=bad, MONGODB_URI="mongodb://db.internal/")

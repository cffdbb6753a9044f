"""``make bench`` works end to end: a tiny run of ``python -m bench``.

Processes and plumbing only (the sandbox, the gateway, the load generator, the
report and the chart). No timing is asserted: a benchmark prints figures, a test
must not depend on how fast this machine is right now.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen import Connection, percentile
from tests.processes import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """``python -m bench`` with ``args``, bounded and small; its stdout and report."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--callbacks", "100", "--max-seconds", "30",
         "--out", str(out), "--chart", str(tmp_path / "bench.png"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_a_small_run_reports_every_figure(tmp_path: Path):
    stdout, report = run_bench(
        tmp_path, "--concurrency", "4", "--latency", "0.05", "--latency-concurrency", "8",
        "--no-floor",
    )
    assert report["machine"]["nproc"] >= 1 and report["machine"]["python"]
    scenarios = {s["name"]: s for s in report["scenarios"]}
    assert set(scenarios) == {"healthz c=4", "callbacks c=4", "callbacks c=8 +50ms"}
    for scenario in scenarios.values():
        assert scenario["errors"] == 0, scenario["error_samples"]
        assert scenario["ok"] == scenario["requested"]
        assert scenario["rate_per_second"] > 0
        assert scenario["latency_seconds"]["p50"] <= scenario["latency_seconds"]["p99"]
        assert scenario["gateway_peak_rss_mb"] > 0
        assert scenario["gateway_cpu_seconds_per_1000"] > 0
        assert scenario["loadgen_cpu_seconds"] is not None
    for name in ("callbacks c=4", "callbacks c=8 +50ms"):
        # A count, not a time: the pool is warm after the warm-up.
        assert scenarios[name]["sandbox_connections_per_100"] <= 2
    assert scenarios["callbacks c=4"]["ratio_to_baseline"] > 0
    assert report["targets"]["connections_per_100_callbacks"]["met"]
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_MAGIC)
    assert "targets:" in stdout


def test_the_callback_split_in_its_http_and_the_gateways_own_work(tmp_path: Path):
    """--floor adds bench.floor (the HTTP alone) and bench.no_upstream (all but TikTok's
    HTTP); each is its own process, measured like the gateway."""
    _, report = run_bench(tmp_path, "--concurrency", "50", "--latency", "0", "--floor")
    scenarios = {s["name"]: s for s in report["scenarios"]}
    assert set(scenarios) == {"healthz c=50", "callbacks c=50", "floor c=50",
                              "no-upstream c=50"}
    for scenario in scenarios.values():
        assert scenario["errors"] == 0, scenario["error_samples"]
        assert scenario["ok"] == scenario["requested"] >= 100
    # Three different processes answered: the pids differ.
    pids = {scenarios[name]["gateway_pid"] for name in
            ("callbacks c=50", "floor c=50", "no-upstream c=50")}
    assert len(pids) == 3
    # No callback of bench.no_upstream reached the sandbox's API: no connection at all.
    assert scenarios["no-upstream c=50"]["sandbox_connections"] == 0
    assert scenarios["no-upstream c=50"]["mode"] == "no-upstream"
    ratio = report["targets"]["ratio_to_baseline"]
    assert ratio["ratio_without_tiktok_http"] > 0 and ratio["ratio_of_the_http_alone"] > 0


class _Transport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


@pytest.mark.gen_test
async def test_loadgen_reads_keep_alive_answers_split_anywhere():
    connection = Connection()
    connection.connection_made(_Transport())
    answer = (
        b"HTTP/1.1 302 Found\r\nLocation: http://localhost:3000/?status=connected\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    waiting = connection.request(b"GET / HTTP/1.1\r\n\r\n")
    for at in range(0, len(answer), 7):
        connection.data_received(answer[at : at + 7])
    response = await waiting
    assert (response.status, response.body) == (302, b"hello")
    assert response.header("location") == "http://localhost:3000/?status=connected"


def test_percentile_is_nearest_rank():
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) is None

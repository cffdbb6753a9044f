"""``make bench`` works end to end: a tiny run of ``python -m bench`` and of each of
issue 14's benchmarks (``bench.burst``, ``bench.simulate``, ``bench.mongo_scale``).

Processes and plumbing only (the sandbox, the gateway, the load generator, the
report and the chart). No timing is asserted: a benchmark prints figures, a test
must not depend on how fast this machine is right now. Counts that do not depend on
speed (errors, 429s, the most calls in a window, which index a plan uses) are.
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
        [sys.executable, "-m", "bench", "--only", "callbacks", "--callbacks", "100",
         "--max-seconds", "30", "--out", str(out), "--chart", str(tmp_path / "bench.png"),
         *args],
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


def run_module(module: str, *args: str, timeout: float = 420) -> str:
    """``python -m <module> args``, bounded; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_a_tiny_burst_through_one_gateway_and_through_two_sharing_mongodb(tmp_path: Path):
    """15 callbacks within a second against a user-info limit of 10 in 3 s: the budget
    holds the sandbox to the limit (no 429), the rest connect with their profile
    pending, and the filler loads them; the same through two gateways and one MongoDB."""
    out = tmp_path / "burst.json"
    stdout = run_module(
        "bench.burst", "--callbacks", "15", "--limit", "10/3s", "--latency", "0.05",
        "--fill-timeout", "150", "--max-seconds", "30", "--out", str(out),
    )
    report = json.loads(out.read_text())
    one, two = report["one"], report["two"]
    assert one["burst"]["ok"] == 15 and one["burst"]["errors"] == 0
    assert one["baseline_healthz"]["ok"] == 15
    assert one["sandbox"]["rate_limited"] == 0
    assert one["sandbox"]["max_in_window"] <= 10 and one["sandbox"]["limit"] == 10
    assert one["profiles"]["left_pending"] >= 5
    assert one["profiles"]["profile_statuses"] == {"complete": 15}
    # Without the budget, the sandbox refuses what is past its limit.
    assert one["without_budget"]["sandbox"]["rate_limited"] > 0
    assert two["burst"]["ok"] == 15 and two["sandbox"]["max_in_window"] <= 10
    assert two["sandbox"]["rate_limited"] == 0
    for line in ("burst: 15 callbacks", "baseline", "burst-2: 15 callbacks", "targets:"):
        assert line in stdout


def test_a_tiny_simulation_prints_its_figures():
    stdout = run_module("bench.simulate", "--accounts", "40", "--days", "3",
                        "--replay-hours", "0.1", "--json")
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["sampled_accounts"] == 40 and result["days"] == 3
    assert result["expired_unnoticed"] == 0
    assert result["tiktok_refused"].get("rate_limited", 0) == 0
    assert result["tiktok_refused"].get("refresh_token_rotated", 0) == 0
    assert result["tiktok_calls"]["token"] > 0
    assert result["replay"]["budgets"]["token"]["max_in_window"] <= 1200
    for line in ("simulation: 40 sampled accounts", "busiest", "memory: peak RSS"):
        assert line in stdout


def test_a_tiny_mongodb_scale_run_uses_the_indexes():
    stdout = run_module("bench.mongo_scale", "--baseline", "60", "--accounts", "300",
                        "--round-batch", "2", "--json")
    report = json.loads(stdout.strip().splitlines()[-1])
    for size in report["sizes"].values():
        for name, query in size["queries"].items():
            assert query["uses_its_index"], (name, query)
        assert size["refresher_round"]["peak_mb"] > 0
        assert size["filler_round"]["peak_mb"] > 0
    assert "MongoDB (SecantusDB) with 300 accounts beside the baseline of 60" in stdout


def test_make_bench_selects_the_benchmarks_by_name(tmp_path: Path):
    out = tmp_path / "bench.json"
    stdout = run_module("bench", "--only", "simulate", "--quick", "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["benchmarks"]) == {"simulate"}
    assert "simulation: 200 sampled accounts" in stdout
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "nothing"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown benchmark(s) nothing" in done.stderr

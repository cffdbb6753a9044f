"""The benchmark run: ``python -m bench`` (``make bench``).

Each piece is its own process: the sandbox standing in for TikTok
(``python -m sandbox --latency ...``), the gateway (``python server.py``, memory
store, or ``--store mongodb`` against a SecantusDB server process) and, per
scenario, the load generator (``python -m bench.loadgen``). Scenarios are run per
upstream latency, each group with a fresh sandbox and gateway:

* no added latency: the baseline (``GET /healthz``) and the callbacks, at each
  ``--concurrency``;
* ``--latency`` seconds added to every TikTok call: the callbacks at each
  ``--latency-concurrency`` (the largest shows memory with that many flows in flight);
* with ``--floor``: the callback's two parts, each in place of the gateway:
  ``bench.floor`` (its HTTP alone) and ``bench.no_upstream`` (all but its calls to
  TikTok).

For each scenario: callbacks/s, latency p50/p95/p99, the gateway's CPU seconds
per 1,000 requests, its peak RSS during the scenario (``VmHWM``, reset before
each scenario through ``/proc/<pid>/clear_refs`` where allowed), connections
the sandbox accepted per 100 callbacks, errors, the load generator's own CPU,
and the ratio of callbacks/s to the baseline's requests/s. The figures are
printed, written to ``artifacts/bench.json`` and drawn to ``artifacts/bench.png``.
Everything is bounded (counts, ``--max-seconds`` per phase) and on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    ARTIFACTS,
    LOOPBACK,
    PRODUCT_ORIGIN,
    ROOT,
    Service,
    against_sandbox,
    free_port,
    gateway_secrets,
    inherited_environment,
    memory_of,
    mongodb_settings,
    secantus_server,
    wait_http,
)

MB = 1024 * 1024

# The issue's targets (BENCHMARKS.md).
TARGET_RATIO = 0.40
TARGET_RATIO_CONCURRENCY = 50
TARGET_LATENCY_CONCURRENCY = 500
TARGET_P99_SLACK_S = 0.150
TARGET_THROUGHPUT_SHARE = 0.80
TARGET_RSS_MB = 150
TARGET_RSS_FLOWS = 1000
TARGET_CONNECTIONS_PER_100 = 2.0

# What `--only` picks from: the callback scenarios above, and issue 14's benchmarks,
# each its own module with its own figures and baseline (BENCHMARKS.md).
BENCHMARKS = ("callbacks", "burst", "burst-2", "simulate", "mongo-scale")


@dataclass(frozen=True)
class Scenario:
    name: str
    # "callbacks", "healthz", "floor" (bench.floor instead of the gateway) or
    # "no-upstream" (callbacks to bench.no_upstream: the gateway, TikTok answered in process)
    mode: str
    latency: float
    concurrency: int
    count: int
    warmup: int
    profile: bool = False




# -- processes ------------------------------------------------------------------






def peak_rss_reset(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` (needs to own it, or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False




class Stack:
    """The sandbox and the gateway for one upstream latency (and the store)."""

    def __init__(
        self,
        args: argparse.Namespace,
        latency: float,
        mongo_uri: str | None,
        process: str = "gateway",
    ) -> None:
        self.args = args
        self.latency = latency
        self.sandbox_port = free_port()
        self.gateway_port = free_port()
        self.sandbox_url = f"http://{LOOPBACK}:{self.sandbox_port}"
        self.gateway_url = f"http://{LOOPBACK}:{self.gateway_port}"
        base = inherited_environment()
        self.secrets = gateway_secrets(f"{self.gateway_url}/oauth/tiktok/callback")
        self.sandbox = Service(
            "sandbox",
            [sys.executable, "-m", "sandbox", "--port", str(self.sandbox_port),
             "--latency", str(latency), "--log-level", "WARNING"],
            base | self.secrets,
            args.log_dir,
        )
        gateway_env = base | self.secrets | against_sandbox(self.sandbox_url, args.log_level) | {
            "PORT": str(self.gateway_port),
            "TIKTOK_MAX_CONNECTIONS": str(args.max_connections),
            # Thousands of callbacks a second against the sandbox, far past TikTok's 600
            # user-info calls a minute: the budget would measure TikTok, not the gateway.
            "TIKTOK_RATE_LIMITS": "user_info=off",
        }
        if args.http_client:
            gateway_env["TIKTOK_HTTP_CLIENT"] = args.http_client
        if mongo_uri:
            gateway_env |= mongodb_settings(mongo_uri, args.mongodb_driver, "bench")
        try:
            wait_http(self.sandbox, f"{self.sandbox_url}/sandbox/stats")
            if process == "floor":
                self.gateway = Service(
                    "floor",
                    [sys.executable, "-m", "bench.floor", "--port", str(self.gateway_port),
                     "--upstream", self.sandbox_url,
                     "--max-connections", str(args.max_connections)],
                    base, args.log_dir,
                )
            elif process == "no-upstream":
                self.gateway = Service(
                    "no-upstream", [sys.executable, "-m", "bench.no_upstream"], gateway_env,
                    args.log_dir,
                )
            else:
                self.gateway = Service(
                    "gateway", [sys.executable, "server.py"], gateway_env, args.log_dir
                )
            wait_http(self.gateway, f"{self.gateway_url}/readyz")
        except BaseException:
            self.sandbox.stop()
            raise

    def stop(self) -> None:
        for service in (getattr(self, "gateway", None), self.sandbox):
            if service is not None:
                service.stop()




@contextlib.contextmanager
def mongo_server(args: argparse.Namespace) -> Iterator[str | None]:
    if args.store != "mongodb":
        yield None
        return
    with secantus_server("bench-secantus-") as uri:
        yield uri


# -- one scenario -----------------------------------------------------------------


def run_scenario(args: argparse.Namespace, stack: Stack, scenario: Scenario) -> dict[str, Any]:
    gateway_pid = stack.gateway.pid
    reset = peak_rss_reset(gateway_pid)
    argv = [
        sys.executable, "-m", "bench.loadgen",
        "--gateway", stack.gateway_url,
        # bench.no_upstream is the gateway: the same callbacks.
        "--mode", "callbacks" if scenario.mode == "no-upstream" else scenario.mode,
        "--concurrency", str(scenario.concurrency),
        "--count", str(scenario.count),
        "--warmup", str(scenario.warmup),
        "--max-seconds", str(args.max_seconds),
        "--request-timeout", str(args.request_timeout),
        "--product-redirect", f"{PRODUCT_ORIGIN}/settings/connections",
        "--gateway-pid", str(gateway_pid),
        "--sandbox-pid", str(stack.sandbox.pid),
    ]
    if scenario.mode != "healthz":
        argv += ["--sandbox", stack.sandbox_url]
    env = dict(os.environ) | {"AUTH_JWT_SECRET": stack.secrets["AUTH_JWT_SECRET"]}
    if scenario.profile:
        argv.append("--hold")
    # Bounded: minting, warm-up and measured phases are each bounded by --max-seconds.
    loadgen = subprocess.Popen(  # noqa: S603 - our own interpreter, fixed argv
        argv, cwd=ROOT, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    profiler = None
    try:
        if scenario.profile:
            # Only the measured callbacks: attach once minting and the warm-up are done.
            assert loadgen.stderr is not None and loadgen.stdin is not None
            if loadgen.stderr.readline().strip() == "ready":
                profiler = start_profiler(args, gateway_pid, scenario)
            loadgen.stdin.write("go\n")
            loadgen.stdin.flush()
        stdout, stderr = loadgen.communicate(timeout=4 * args.max_seconds + 60)
    except subprocess.TimeoutExpired:
        loadgen.kill()
        stdout, stderr = loadgen.communicate()
    finally:
        profile = stop_profiler(profiler) if profiler else None
    if loadgen.returncode != 0 or not stdout.strip():
        raise SystemExit(
            f"load generator failed in {scenario.name} ({loadgen.returncode}):\n"
            f"{stderr[-2000:]}\n--- gateway log (end) ---\n{stack.gateway.tail(1500)}"
        )
    result = json.loads(stdout.strip().splitlines()[-1])
    result["mode"] = scenario.mode
    memory = memory_of(gateway_pid)
    ok = result["ok"]
    result.update(
        name=scenario.name,
        gateway_pid=gateway_pid,
        store=args.store,
        upstream_latency_seconds=scenario.latency,
        gateway_peak_rss_mb=round(memory.get("VmHWM", 0.0), 1),
        gateway_peak_rss_scope="scenario" if reset else "process lifetime",
        gateway_rss_mb=round(memory.get("VmRSS", 0.0), 1),
        gateway_cpu_seconds_per_1000=_per(result["gateway_cpu_seconds"], ok, 1000),
        sandbox_cpu_seconds_per_1000=_per(result["sandbox_cpu_seconds"], ok, 1000),
        loadgen_cpu_seconds_per_1000=_per(result["loadgen_cpu_seconds"], ok, 1000),
        gateway_cpu_utilization=_per(result["gateway_cpu_seconds"], result["elapsed_seconds"], 1),
        loadgen_cpu_utilization=_per(result["loadgen_cpu_seconds"], result["elapsed_seconds"], 1),
        sandbox_connections_per_100=(
            _per(result["sandbox_connections"], ok, 100) if scenario.mode != "healthz" else None
        ),
    )
    if profile is not None:
        result["profile"] = profile
    return result


def _per(amount: float | None, count: float, unit: float) -> float | None:
    if amount is None or not count:
        return None
    return round(amount * unit / count, 4)


# -- profiling (py-spy, optional) ---------------------------------------------------


def start_profiler(
    args: argparse.Namespace, pid: int, scenario: Scenario
) -> tuple[subprocess.Popen[bytes], Path] | None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("  (py-spy not installed: no profile)", flush=True)
        return None
    slug = f"c{scenario.concurrency}"
    if scenario.latency:
        slug += f"-{scenario.latency * 1000:.0f}ms"
    output = args.log_dir / f"bench-profile-{slug}.txt"
    process = subprocess.Popen(  # noqa: S603 - fixed argv
        # Blocking (py-spy's default): exact stacks; 100 Hz keeps its pauses small.
        [py_spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
         "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # attached before the load starts
    if process.poll() is not None:
        assert process.stderr is not None  # piped above
        print(f"  (py-spy could not attach: {process.stderr.read().decode()[-300:]})", flush=True)
        return None
    return process, output


def stop_profiler(profiler: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any] | None:
    process, output = profiler
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if not output.exists():
        return None
    from bench.profile import summarize

    return summarize(output)


# -- the plan ---------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Scenario]:
    scenarios: list[Scenario] = []
    scale = 0.25 if args.quick else 1.0

    def count(base: int, factor: int = 1) -> int:
        return max(100, int((args.callbacks or base) * factor * scale))

    for concurrency in args.concurrency:
        scenarios.append(Scenario(
            f"healthz c={concurrency}", "healthz", 0.0, concurrency,
            count(args.default_count, 4), max(200, concurrency),
        ))
        scenarios.append(Scenario(
            f"callbacks c={concurrency}", "callbacks", 0.0, concurrency,
            count(args.default_count if concurrency > 1 else args.default_count // 3),
            max(200, 2 * concurrency),
        ))
    if args.floor:
        scenarios.append(Scenario(
            f"floor c={TARGET_RATIO_CONCURRENCY}", "floor", 0.0, TARGET_RATIO_CONCURRENCY,
            count(args.default_count), 200,
        ))
        scenarios.append(Scenario(
            f"no-upstream c={TARGET_RATIO_CONCURRENCY}", "no-upstream", 0.0,
            TARGET_RATIO_CONCURRENCY, count(args.default_count), 200,
        ))
    if args.latency > 0:
        for concurrency in args.latency_concurrency:
            # Enough callbacks for ~8 s at full speed, never fewer than 4 per flow.
            base = max(4 * concurrency, int(8 * concurrency / (2 * args.latency)))
            scenarios.append(Scenario(
                f"callbacks c={concurrency} +{args.latency * 1000:.0f}ms",
                "callbacks", args.latency, concurrency,
                count(min(base, 2 * args.default_count)), max(200, 2 * concurrency),
            ))
    # Profiled runs come last in their group: they leave the figures above untouched.
    if args.profile:
        scenarios.append(Scenario(
            f"callbacks c={TARGET_RATIO_CONCURRENCY} (profiled)", "callbacks", 0.0,
            TARGET_RATIO_CONCURRENCY, count(args.default_count, 2), 200, profile=True,
        ))
        if args.latency > 0:
            scenarios.append(Scenario(
                f"callbacks c={TARGET_LATENCY_CONCURRENCY} +{args.latency * 1000:.0f}ms "
                "(profiled)", "callbacks", args.latency, TARGET_LATENCY_CONCURRENCY,
                count(args.default_count, 2), 2 * TARGET_LATENCY_CONCURRENCY, profile=True,
            ))
    return scenarios


# -- reporting ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        # Other work on the machine takes cores from the three processes measured here.
        "load_average_at_start": [round(n, 2) for n in os.getloadavg()],
    }
    with contextlib.suppress(ImportError):
        import pycurl

        info["pycurl"] = pycurl.version
    return info


def evaluate(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The issue's targets, each with its figures and whether it is met."""

    def find(mode: str, concurrency: int, latency: float) -> dict[str, Any] | None:
        for result in results:
            if (result["mode"], result["concurrency"]) == (mode, concurrency) and (
                result["upstream_latency_seconds"] == latency and "profile" not in result
            ):
                return result
        return None

    targets: dict[str, Any] = {}
    callbacks = find("callbacks", TARGET_RATIO_CONCURRENCY, 0.0)
    baseline = find("healthz", TARGET_RATIO_CONCURRENCY, 0.0)
    if callbacks and baseline and baseline["rate_per_second"]:
        ratio = callbacks["rate_per_second"] / baseline["rate_per_second"]
        targets["ratio_to_baseline"] = {
            "target": f">= {TARGET_RATIO} at concurrency {TARGET_RATIO_CONCURRENCY}, no error",
            "callbacks_per_second": callbacks["rate_per_second"],
            "baseline_per_second": baseline["rate_per_second"],
            "ratio": round(ratio, 3),
            "errors": callbacks["errors"],
            "met": ratio >= TARGET_RATIO and callbacks["errors"] == 0,
        }
        # The same ratio for the callback's parts: what an HTTP client can still win.
        for mode, key in (("no-upstream", "ratio_without_tiktok_http"),
                          ("floor", "ratio_of_the_http_alone")):
            part = find(mode, TARGET_RATIO_CONCURRENCY, 0.0)
            if part and part["rate_per_second"]:
                targets["ratio_to_baseline"][key] = round(
                    part["rate_per_second"] / baseline["rate_per_second"], 3
                )
    zero = [r["rate_per_second"] or 0 for r in results
            if r["mode"] == "callbacks" and r["upstream_latency_seconds"] == 0.0]
    loaded = find("callbacks", TARGET_LATENCY_CONCURRENCY, args.latency)
    if loaded and zero:
        floor = 2 * args.latency
        ideal = min(max(zero), TARGET_LATENCY_CONCURRENCY / floor)
        p99 = loaded["latency_seconds"]["p99"]
        targets["latency_500_flows"] = {
            "target": (
                f"no error, p99 <= {floor + TARGET_P99_SLACK_S:.3f}s, callbacks/s >= "
                f"{TARGET_THROUGHPUT_SHARE} x min(best zero-latency callbacks/s, "
                f"{TARGET_LATENCY_CONCURRENCY}/{floor:g}s)"
            ),
            "errors": loaded["errors"],
            "p99_seconds": p99,
            "callbacks_per_second": loaded["rate_per_second"],
            "required_per_second": round(TARGET_THROUGHPUT_SHARE * ideal, 1),
            "met": loaded["errors"] == 0
            and p99 is not None
            and p99 <= floor + TARGET_P99_SLACK_S
            and (loaded["rate_per_second"] or 0) >= TARGET_THROUGHPUT_SHARE * ideal,
        }
    memory = find("callbacks", TARGET_RSS_FLOWS, args.latency)
    if memory:
        targets["rss_1000_flows"] = {
            "target": f"gateway peak RSS <= {TARGET_RSS_MB} MB, {TARGET_RSS_FLOWS} flows in flight",
            "peak_rss_mb": memory["gateway_peak_rss_mb"],
            "scope": memory["gateway_peak_rss_scope"],
            "met": memory["gateway_peak_rss_mb"] <= TARGET_RSS_MB,
        }
    pooled = [r["sandbox_connections_per_100"] for r in results
              if r["mode"] == "callbacks" and r["sandbox_connections_per_100"] is not None]
    if pooled:
        targets["connections_per_100_callbacks"] = {
            "target": f"<= {TARGET_CONNECTIONS_PER_100} at steady state (after the warm-up)",
            "worst": max(pooled),
            "met": max(pooled) <= TARGET_CONNECTIONS_PER_100,
        }
    return targets


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_result(result: dict[str, Any], baseline: float | None) -> None:
    latency = result["latency_seconds"]
    ratio = (
        f"{result['rate_per_second'] / baseline:.2f}"
        if baseline and result["mode"] != "healthz" and result["rate_per_second"] else "-"
    )
    result["ratio_to_baseline"] = None if ratio == "-" else float(ratio)
    print(
        f"{result['name']:<28} {_fmt(result['rate_per_second'], '8.1f')}/s "
        f"p50 {_fmt(ms(latency['p50']), '7.1f')} p95 {_fmt(ms(latency['p95']), '7.1f')} "
        f"p99 {_fmt(ms(latency['p99']), '7.1f')} ms | gw cpu/1k "
        f"{_fmt(result['gateway_cpu_seconds_per_1000'], '5.2f')}s "
        f"({_fmt(result['gateway_cpu_utilization'], '4.0%')}) rss "
        f"{result['gateway_peak_rss_mb']:5.1f}MB | conn/100 "
        f"{_fmt(result['sandbox_connections_per_100'], '4.1f')} | err {result['errors']} | "
        f"ratio {ratio} | loadgen cpu {_fmt(result['loadgen_cpu_utilization'], '4.0%')}",
        flush=True,
    )
    if result["errors"]:
        print(f"    errors: {result['errors_by_kind']} e.g. {result['error_samples'][:2]}")
    if result["warmup_errors"]:
        print(f"    warm-up errors: {result['warmup_errors']} e.g. "
              f"{result['warmup_error_samples'][:2]}")


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def benchmark_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown) or '(none)'}; known: "
            f"{', '.join(BENCHMARKS)}"
        )
    return names


def run_others(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 14's benchmarks that ``--only`` selects, each printing its own figures."""
    quick = ["--quick"] if args.quick else []
    results: dict[str, Any] = {}
    bursts = [name for name in ("burst", "burst-2") if name in args.only]
    if bursts:
        from bench import burst

        print(flush=True)
        only = [] if len(bursts) == 2 else ["--only", "one" if bursts == ["burst"] else "two"]
        results["burst"] = burst.main(
            [*quick, *only, "--out", str(args.log_dir / "bench-burst.json")])
    if "simulate" in args.only:
        from bench import simulate

        print(flush=True)
        simulated = simulate.run(simulate.parse_args(quick))
        simulate.print_report(simulated)
        results["simulate"] = simulated
    if "mongo-scale" in args.only:
        from bench import mongo_scale

        print(flush=True)
        results["mongo_scale"] = mongo_scale.main(quick)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark the gateway (see BENCHMARKS.md)."
    )
    parser.add_argument("--quick", action="store_true",
                        help="fewer scenarios and a quarter of the callbacks; every other "
                        "benchmark in its short form")
    parser.add_argument("--only", type=benchmark_names, default=list(BENCHMARKS),
                        help="comma-separated, of: " + ", ".join(BENCHMARKS) + " (default: all)."
                        " callbacks: the scenarios above; burst: 1,000 callbacks within a "
                        "second against TikTok's user-info limit (bench.burst); burst-2: the "
                        "same through two gateways sharing MongoDB; simulate: a million "
                        "accounts over 200 days (bench.simulate); mongo-scale: MongoDB with "
                        "100,000 accounts (bench.mongo_scale)")
    parser.add_argument("--store", choices=("memory", "mongodb"), default="memory",
                        help="mongodb: against a SecantusDB server process (a pure-Python "
                        "test server: it, not the gateway, is then the bottleneck)")
    parser.add_argument("--mongodb-driver", choices=("motor", "pymongo"), default="motor")
    parser.add_argument("--latency", type=float, default=0.2,
                        help="seconds the sandbox adds to every TikTok call in the latency "
                        "group (0: skip that group)")
    parser.add_argument("--concurrency", type=numbers, default=None,
                        help="comma-separated, without latency (default 1,10,50,200)")
    parser.add_argument("--latency-concurrency", type=numbers, default=None,
                        help="comma-separated, with --latency (default 50,200,500,1000)")
    parser.add_argument("--callbacks", type=int, default=None,
                        help="measured callbacks per scenario (default: per scenario)")
    parser.add_argument("--max-connections", type=int, default=500,
                        help="the gateway's TIKTOK_MAX_CONNECTIONS (default 500)")
    parser.add_argument("--http-client", choices=("curl", "simple"),
                        help="the gateway's TIKTOK_HTTP_CLIENT (default: its own default)")
    parser.add_argument("--log-level", default="INFO", help="the gateway's LOG_LEVEL")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="bound of each load phase (minting, warm-up, measured)")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--profile", action="store_true",
                        help="also run callbacks at concurrency 50 (and 500 with latency) "
                        "under py-spy (artifacts/bench-profile-*.txt) and summarize where "
                        "the gateway's CPU goes")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the callback's two parts: bench.floor (its "
                        "HTTP without the gateway's work: Tornado's and libcurl's own cost) "
                        "and bench.no_upstream (the gateway with TikTok answered in "
                        "process: everything but the calls to TikTok); default: on, off "
                        "with --quick")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "bench.json")
    parser.add_argument("--chart", type=Path, default=ARTIFACTS / "bench.png")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the chart to docs/bench.png (the committed one)")
    args = parser.parse_args(argv)
    mongodb = args.store == "mongodb"
    if args.concurrency is None:
        args.concurrency = [10, 50] if args.quick or mongodb else [1, 10, 50, 200]
    if args.latency_concurrency is None:
        if mongodb:
            args.latency_concurrency = [50]
        else:
            args.latency_concurrency = [500, 1000] if args.quick else [50, 200, 500, 1000]
    # SecantusDB, the test MongoDB server, is pure Python: tens of callbacks/s at most.
    args.default_count = 600 if mongodb else 4000
    if args.floor is None:
        args.floor = not args.quick and not mongodb
    if min(args.concurrency + args.latency_concurrency) < 1 or args.max_connections < 1:
        parser.error("concurrency and --max-connections must be >= 1")
    if args.latency < 0:
        parser.error("--latency must be >= 0")
    args.log_dir = args.out.parent
    return args


def process_of(scenario: Scenario) -> str:
    """Which process serves the scenario: the gateway, bench.floor or bench.no_upstream."""
    return scenario.mode if scenario.mode in ("floor", "no-upstream") else "gateway"


def group_order(group: tuple[str, float]) -> tuple[int, float]:
    process, latency = group
    return ("gateway", "no-upstream", "floor").index(process), latency


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    raise_file_limit()  # 1,000 flows in flight: connections in, to TikTok, and the loadgen's
    if "callbacks" not in args.only:
        alone = {
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "benchmarks": run_others(args),
        }
        args.out.write_text(json.dumps(alone, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        return 0
    scenarios = plan(args)
    info = machine()
    print(
        f"machine: {info['nproc']} x {info['cpu_model']}, Python {info['python']}; "
        f"store: {args.store}; {len(scenarios)} scenarios; logs in {args.log_dir}",
        flush=True,
    )
    if info["load_average_at_start"][0] > 0.5:
        print(f"warning: load average {info['load_average_at_start'][0]}: something else is "
              "using the CPU, the figures will be lower than this machine can do", flush=True)
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    baselines: dict[int, float] = {}
    with mongo_server(args) as mongo_uri:
        groups = sorted({(process_of(s), s.latency) for s in scenarios}, key=group_order)
        for process, latency in groups:
            stack = Stack(args, latency, mongo_uri, process=process)
            try:
                for scenario in scenarios:
                    if (process_of(scenario), scenario.latency) != (process, latency):
                        continue
                    result = run_scenario(args, stack, scenario)
                    if scenario.mode == "healthz":
                        baselines[scenario.concurrency] = result["rate_per_second"]
                    print_result(
                        result, baselines.get(scenario.concurrency) if not latency else None
                    )
                    results.append(result)
            finally:
                stack.stop()
    # The issue's targets are set for the memory store.
    targets = evaluate(results, args) if args.store == "memory" else {}
    report: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info,
        "settings": {
            "store": args.store,
            "mongodb_driver": args.mongodb_driver if args.store == "mongodb" else None,
            "upstream_latency_seconds": args.latency,
            "tiktok_max_connections": args.max_connections,
            "tiktok_http_client": args.http_client or "default",
            "gateway_log_level": args.log_level,
            "quick": args.quick,
        },
        "scenarios": results,
        "targets": targets,
        "total_seconds": round(time.monotonic() - started, 1),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\ntargets:")
    for name, target in targets.items():
        figures = {k: v for k, v in target.items() if k not in ("target", "met")}
        verdict = "MET    " if target["met"] else "NOT MET"
        print(f"  {verdict} {name}: {target['target']}; {figures}")
    from bench.plot import draw

    draw(report, args.chart)
    if args.publish:
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copyfile(args.chart, docs / "bench.png")
    print(f"\nwrote {args.out} and {args.chart} in {report['total_seconds']:.0f}s")
    for result in results:
        if "profile" in result:
            from bench.profile import print_summary

            print_summary(result["profile"])
    others = run_others(args)
    if others:
        report["benchmarks"] = others
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


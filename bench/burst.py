"""Bursts of connections against TikTok's rate limit: ``python -m bench.burst``.

Issue 14's bursts, each against the sandbox answering every TikTok call in
``--latency`` (200 ms) and enforcing TikTok's ``--limit`` on user info (600 calls in
any sliding 60 s, 429 ``rate_limit_exceeded`` beyond; ``--user-info-rate-limit``),
with the gateway in its default configuration (its shared budget of
``user_info=600/60s``, pool, callback budget, profile filler):

* ``burst``: ``--callbacks`` (1,000) callbacks started evenly within ``--spread``
  (one second), each a browser of its own (a new connection), against one gateway
  (memory store). Figures: errors, browsers redirected ``connected``, latency
  p50/p99, the sandbox's 429s, and how long until every profile is filled (the
  gateway's ``/metrics``, then every account read back through the accounts API).
  Beside it, from the same run: the same burst of ``GET /healthz`` (the baseline:
  what a thousand new connections cost the gateway with no work behind them), and the
  same burst against a gateway without the budget (``TIKTOK_RATE_LIMITS=user_info=off``):
  the 429s the budget saves.
* ``burst-2`` (``--two``): the same burst split between two gateway processes on
  separate ports sharing one MongoDB (a SecantusDB server process): the most user-info
  calls the sandbox saw in any 60 s window, beside the limit.

For each, the sandbox's user-info call times (``/sandbox/user-info-calls``) give the
most calls in any sliding window of the limit's length. Everything runs on
127.0.0.1, bounded in count and time (``--fill-timeout`` for the profiles).

``--quick``: 100 callbacks against a limit of ``60/6s`` on both sides (the same
ratio of burst to limit, a window ten times shorter), so a run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt

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
    max_in_window,
    memory_of,
    mongodb_settings,
    secantus_server,
    wait_http,
)

TARGET_P99_SECONDS = 3.0
TARGET_FILL_SECONDS = 180.0
METRIC = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$")


def metrics_of(url: str) -> dict[str, float]:
    """``/metrics`` as {name{labels}: value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC.match(line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())


class Setup:
    """A sandbox and one or two gateways for one burst; stopped on exit."""

    def __init__(self, args: argparse.Namespace, *, gateways: int = 1,
                 mongo_uri: str | None = None, budget: bool = True, tag: str = "") -> None:
        self.args = args
        self.services: list[Service] = []
        base = inherited_environment()
        sandbox_port = free_port()
        self.sandbox_url = f"http://{LOOPBACK}:{sandbox_port}"
        ports = [free_port() for _ in range(gateways)]
        self.gateway_urls = [f"http://{LOOPBACK}:{port}" for port in ports]
        # One redirect URI for both: a state minted by one completes at either.
        self.secrets = gateway_secrets(f"{self.gateway_urls[0]}/oauth/tiktok/callback")
        try:
            self.sandbox = self._start(
                f"burst-sandbox{tag}",
                [sys.executable, "-m", "sandbox", "--port", str(sandbox_port),
                 "--latency", str(args.latency), "--user-info-rate-limit", args.limit,
                 "--log-level", "WARNING"],
                base | self.secrets,
            )
            wait_http(self.sandbox, f"{self.sandbox_url}/sandbox/stats")
            env = base | self.secrets | against_sandbox(self.sandbox_url, args.log_level) | {
                # Quick runs scale TikTok's window down on both sides alike.
                "TIKTOK_RATE_LIMITS": f"user_info={args.limit}" if budget else "user_info=off",
            }
            if mongo_uri:
                env |= mongodb_settings(mongo_uri, args.mongodb_driver, "burst")
            self.gateways = []
            for index, port in enumerate(ports):
                gateway = self._start(f"burst-gateway{tag}-{index}",
                                      [sys.executable, "server.py"], env | {"PORT": str(port)})
                self.gateways.append(gateway)
            for gateway, url in zip(self.gateways, self.gateway_urls, strict=True):
                wait_http(gateway, f"{url}/readyz")
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Setup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Service:
        service = Service(name, argv, env, self.args.log_dir)
        self.services.append(service)
        return service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def loadgen(self, mode: str, count: int) -> dict[str, Any]:
        argv = [
            sys.executable, "-m", "bench.loadgen", "--gateway", self.gateway_urls[0],
            *(item for url in self.gateway_urls[1:] for item in ("--also-gateway", url)),
            "--mode", mode, "--count", str(count), "--warmup", "0",
            "--spread", str(self.args.spread), "--owners", str(count),
            "--concurrency", "64",  # minting the states
            "--max-seconds", str(self.args.max_seconds),
            "--request-timeout", str(self.args.request_timeout),
            "--product-redirect", f"{PRODUCT_ORIGIN}/settings/connections",
            "--gateway-pid", str(self.gateways[0].pid),
        ]
        if mode == "callbacks":
            argv += ["--sandbox", self.sandbox_url]
        env = dict(os.environ) | {"AUTH_JWT_SECRET": self.secrets["AUTH_JWT_SECRET"]}
        done = subprocess.run(  # noqa: S603 - our own interpreter, fixed argv
            argv, cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=4 * self.args.max_seconds + 60, check=False,
        )
        if done.returncode != 0 or not done.stdout.strip():
            raise SystemExit(f"load generator failed ({done.returncode}):\n{done.stderr[-2000:]}"
                             f"\n--- gateway log (end) ---\n{self.gateways[0].tail(1500)}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def burst(self) -> dict[str, Any]:
        """The burst of callbacks, then what it cost: the store's operations, how long
        until every profile was filled, and the sandbox's user-info calls."""
        started = time.monotonic()
        burst = self.loadgen("callbacks", self.args.callbacks)
        # The burst began at the end of minting: count the fill from its first request.
        began = started + burst["mint_seconds"]
        return {
            "burst": burst,
            "store": self.store_operations(),
            "profiles": self.wait_for_profiles(began, self.args.callbacks),
            "sandbox": self.sandbox_calls(),
        }

    def sandbox_calls(self) -> dict[str, Any]:
        calls = get_json(f"{self.sandbox_url}/sandbox/user-info-calls")
        limit = calls["limit"]
        times = sorted(calls["times"])
        return {
            "user_info_calls": len(times),
            "rate_limited": calls["rate_limited"],
            "max_in_window": max_in_window(times, limit["seconds"]) if limit else None,
            "window_seconds": limit["seconds"] if limit else None,
            "limit": limit["calls"] if limit else None,
        }

    def wait_for_profiles(self, started: float, owners: int) -> dict[str, Any]:
        """Until no connected account's profile is pending, within --fill-timeout: the
        filler's own figures on /metrics first, then every burst owner's accounts read
        back through the accounts API."""
        deadline = started + self.args.fill_timeout
        statuses: dict[str, int] = {}
        done_at: float | None = None
        while True:
            values = [metrics_of(url) for url in self.gateway_urls]
            left_pending = sum(v.get("tiktok_gateway_profiles_left_pending_total", 0.0)
                               for v in values)
            filled = sum(v.get('tiktok_gateway_profile_fills_total{outcome="filled"}', 0.0)
                         for v in values)
            pending = max(v.get("tiktok_gateway_profiles_pending", 0.0) for v in values)
            # The gauge is the filler's count at its last round (every 5 s).
            quiet = time.monotonic() > started + 6 and pending == 0
            if filled >= left_pending or quiet:
                statuses = self.profile_statuses(owners)
                if statuses and not statuses.get("pending"):
                    done_at = time.monotonic()
                    break
            if time.monotonic() > deadline:
                statuses = self.profile_statuses(owners)
                break
            time.sleep(1.0)
        return {
            "left_pending": int(left_pending),
            "filled_by_the_filler": int(filled),
            "profile_statuses": statuses,
            "accounts": sum(statuses.values()),
            "all_filled_after_seconds": round(done_at - started, 1) if done_at else None,
        }

    def store_operations(self) -> dict[str, Any]:
        """The gateways' store operations so far: how many, and their mean time."""
        count = total = 0.0
        for url in self.gateway_urls:
            for name, value in metrics_of(url).items():
                if name.startswith("tiktok_gateway_store_operation_seconds_count"):
                    count += value
                elif name.startswith("tiktok_gateway_store_operation_seconds_sum"):
                    total += value
        return {"count": int(count), "mean_ms": round(total / count * 1000, 2) if count else None}

    def profile_statuses(self, owners: int) -> dict[str, int]:
        """Every burst owner's accounts through the accounts API, by profileStatus."""
        secret = self.secrets["AUTH_JWT_SECRET"]
        expires = int(time.time()) + 600
        counts: dict[str, int] = {}
        for n in range(owners):
            bearer = jwt.encode({"sub": f"bench-user-{n}", "exp": expires}, secret, "HS256")
            url = self.gateway_urls[n % len(self.gateway_urls)]
            body = get_json(f"{url}/accounts", {"Authorization": f"Bearer {bearer}"})
            for account in body["accounts"]:
                counts[account["profileStatus"]] = counts.get(account["profileStatus"], 0) + 1
        return counts


def burst_one(args: argparse.Namespace) -> dict[str, Any]:
    """The burst against one gateway, its /healthz baseline, and the burst without the
    budget."""
    result: dict[str, Any] = {"callbacks": args.callbacks, "spread_seconds": args.spread,
                              "latency_seconds": args.latency, "limit": args.limit}
    with Setup(args) as setup:
        result["baseline_healthz"] = setup.loadgen("healthz", args.callbacks)
        result |= setup.burst()
        result["gateway_peak_rss_mb"] = round(memory_of(setup.gateways[0].pid)["VmHWM"], 1)
    if args.compare:
        with Setup(args, budget=False, tag="-nobudget") as setup:
            result["without_budget"] = setup.loadgen("callbacks", args.callbacks)
            result["without_budget"]["sandbox"] = setup.sandbox_calls()
    return result


def burst_two(args: argparse.Namespace) -> dict[str, Any]:
    """The burst split between two gateway processes sharing one MongoDB."""
    result: dict[str, Any] = {"callbacks": args.callbacks, "gateways": 2, "limit": args.limit}
    with (secantus_server("bench-burst-") as mongo_uri,
          Setup(args, gateways=2, mongo_uri=mongo_uri, tag="-two") as setup):
        result |= setup.burst()
    return result


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def verdicts(result: dict[str, Any], two: dict[str, Any] | None) -> list[tuple[str, bool, str]]:
    """The issue's targets for the bursts: (target, met, figures)."""
    found: list[tuple[str, bool, str]] = []
    if result:
        burst = result["burst"]
        latency = burst["latency_seconds"]
        sandbox = result["sandbox"]
        profiles = result["profiles"]
        filled_in = profiles["all_filled_after_seconds"]
        found += [
            ("0 errors, every browser redirected `connected`",
             burst["errors"] == 0 and burst["ok"] == result["callbacks"],
             f"{burst['ok']} of {result['callbacks']} connected, {burst['errors']} errors "
             f"{burst['errors_by_kind'] or ''}"),
            (f"p99 under {TARGET_P99_SECONDS:g} s",
             latency["p99"] is not None and latency["p99"] < TARGET_P99_SECONDS,
             f"p99 {_ms(latency['p99'])} ms"),
            ("the sandbox's 429 count 0", sandbox["rate_limited"] == 0,
             f"{sandbox['rate_limited']} (without the budget: "
             f"{result.get('without_budget', {}).get('sandbox', {}).get('rate_limited', '-')})"),
            (f"every profile filled within {TARGET_FILL_SECONDS:g} s",
             filled_in is not None and filled_in <= TARGET_FILL_SECONDS
             and profiles["accounts"] == result["callbacks"],
             f"{filled_in} s" if filled_in is not None else
             f"not all: {profiles['profile_statuses']}"),
        ]
    if two:
        sandbox = two["sandbox"]
        found.append((
            "two gateways: never more than the limit in any window",
            sandbox["max_in_window"] is not None and sandbox["max_in_window"] <= sandbox["limit"],
            f"most in {sandbox['window_seconds']:g} s: {sandbox['max_in_window']} of "
            f"{sandbox['limit']}",
        ))
    return found


def print_report(result: dict[str, Any], two: dict[str, Any] | None) -> None:
    if result:
        burst, base = result["burst"], result["baseline_healthz"]
        lat, base_lat = burst["latency_seconds"], base["latency_seconds"]
        sandbox, profiles = result["sandbox"], result["profiles"]
        print(f"burst: {result['callbacks']:,} callbacks started within "
              f"{burst['started_within_seconds']:.2f} s, TikTok "
              f"+{result['latency_seconds'] * 1000:.0f} ms, user info limited to "
              f"{result['limit']} (gateway and sandbox)")
        print(f"  callbacks  {burst['ok']:>5,} connected, {burst['errors']} errors; p50 "
              f"{_ms(lat['p50'])} ms, p99 {_ms(lat['p99'])} ms, max {_ms(lat['max'])} ms; "
              f"gateway CPU {burst['gateway_cpu_seconds'] or 0:.2f} s, peak RSS "
              f"{result['gateway_peak_rss_mb']} MB")
        print(f"  baseline   {base['ok']:>5,} /healthz, {base['errors']} errors; p50 "
              f"{_ms(base_lat['p50'])} ms, p99 {_ms(base_lat['p99'])} ms; callbacks' p99 / "
              f"baseline's: {lat['p99'] / base_lat['p99']:.1f}" if lat["p99"] and base_lat["p99"]
              else "  baseline   -")
        print(f"  sandbox    {sandbox['user_info_calls']:,} user-info calls, 429s "
              f"{sandbox['rate_limited']}, most in any {sandbox['window_seconds']:g} s "
              f"{sandbox['max_in_window']} of {sandbox['limit']}")
        print(f"  store      {result['store']['count']:,} operations during the burst, mean "
              f"{result['store']['mean_ms']} ms (memory store)")
        print(f"  profiles   {profiles['left_pending']} left pending by callbacks, "
              f"{profiles['filled_by_the_filler']} filled by the filler; all filled after "
              f"{profiles['all_filled_after_seconds']} s; accounts API: "
              f"{profiles['profile_statuses']}")
        off = result.get("without_budget")
        if off:
            print(f"  without the budget (user_info=off): {off['ok']:,} connected, "
                  f"{off['errors']} errors, p99 {_ms(off['latency_seconds']['p99'])} ms; "
                  f"sandbox 429s {off['sandbox']['rate_limited']}, most in any "
                  f"{off['sandbox']['window_seconds']:g} s {off['sandbox']['max_in_window']}")
    if two:
        burst, sandbox, profiles = two["burst"], two["sandbox"], two["profiles"]
        lat = burst["latency_seconds"]
        print(f"burst-2: {two['callbacks']:,} callbacks within "
              f"{burst['started_within_seconds']:.2f} s, round-robin to 2 gateways sharing one "
              f"MongoDB (SecantusDB)")
        print(f"  callbacks  {burst['ok']:>5,} connected, {burst['errors']} errors "
              f"{burst['errors_by_kind'] or ''}; p50 {_ms(lat['p50'])} ms, p99 "
              f"{_ms(lat['p99'])} ms")
        print(f"  sandbox    {sandbox['user_info_calls']:,} user-info calls, 429s "
              f"{sandbox['rate_limited']}; most in any {sandbox['window_seconds']:g} s: "
              f"{sandbox['max_in_window']} (limit {sandbox['limit']})")
        print(f"  store      {two['store']['count']:,} operations during the burst, mean "
              f"{two['store']['mean_ms']} ms (SecantusDB, a pure-Python test server: the "
              f"callbacks queue on it)")
        print(f"  profiles   {profiles['accounts']:,} accounts connected in the end, "
              f"{profiles['left_pending']} left pending by callbacks; none pending after "
              f"{profiles['all_filled_after_seconds']} s; {profiles['profile_statuses']}")
    print("targets:")
    for target, met, figures in verdicts(result, two):
        print(f"  {'MET    ' if met else 'NOT MET'} {target}: {figures}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callbacks", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0,
                        help="seconds within which the callbacks start")
    parser.add_argument("--latency", type=float, default=0.2,
                        help="seconds the sandbox adds to every TikTok call")
    parser.add_argument("--limit", default="600/60s",
                        help="user-info limit, at the sandbox and in the gateway's budget")
    parser.add_argument("--only", choices=("one", "two"),
                        help="only the burst against one gateway, or only the two-gateway one")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the burst against a gateway without the budget")
    parser.add_argument("--mongodb-driver", choices=("motor", "pymongo"), default="pymongo")
    parser.add_argument("--fill-timeout", type=float, default=300.0,
                        help="seconds to wait for every profile after the burst begins")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="WARNING", help="the gateways' LOG_LEVEL")
    parser.add_argument("--quick", action="store_true",
                        help="100 callbacks against 60/6s (the same ratio, a shorter window)")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "bench-burst.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.callbacks, args.limit, args.fill_timeout = 100, "60/6s", 60.0
    if args.callbacks < 1 or args.spread < 0:
        parser.error("--callbacks must be >= 1 and --spread >= 0")
    args.log_dir = args.out.parent
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    one = burst_one(args) if args.only in (None, "one") else {}
    two = burst_two(args) if args.only in (None, "two") else None
    report = {"one": one, "two": two,
              "targets": [{"target": t, "met": m, "figures": f}
                          for t, m, f in verdicts(one, two)]}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(one, two)
    return report


if __name__ == "__main__":
    main()

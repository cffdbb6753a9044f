"""The load generator: ``python -m bench.loadgen --mode callbacks|healthz ...``.

One process, one asyncio loop, ``--concurrency`` keep-alive HTTP/1.1 connections
to the gateway, each sending its next request as soon as the previous answer is
in (a closed loop). Requests are written and parsed by hand (Content-Length
bodies only, which is all Tornado sends here): a request costs this process a
few tens of microseconds, a small fraction of what it costs the gateway, so the
generator is not the bottleneck; it reports its own CPU time to show it.

``callbacks`` first mints ``warmup + count`` states the way a product and a
browser would (``POST /oauth/tiktok/authorize`` with a bearer JWT, then TikTok's
authorize page on the sandbox, which consents at once and redirects with a
code), then fires the callbacks: ``warmup`` of them unmeasured (they open the
gateway's pool to TikTok), then ``count`` measured. ``healthz`` fires
``GET /healthz`` the same way (the baseline).

Over the measured window it reads the gateway's and the sandbox's CPU time from
``/proc/<pid>/stat`` and the sandbox's accepted-connection counter
(``/sandbox/stats``, on a connection opened beforehand, so reading it does not
count). Every phase is bounded by ``--max-seconds`` and every request by
``--request-timeout``; a request past either counts as an error. Loopback only.
The result is one JSON object on stdout.

``--spread S`` makes it a burst instead (``bench.burst``): the ``--count`` requests
start evenly within S seconds, open loop, each on a new connection of its own (a
browser each), with no warm-up; callbacks go round-robin to ``--gateway`` and each
``--also-gateway`` (gateways sharing one store complete each other's states).

The product's bearer JWTs are signed with ``AUTH_JWT_SECRET`` from the
environment (never a command-line argument).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CALLBACK_PATH = "/oauth/tiktok/callback"
AUTHORIZE_PATH = "/oauth/tiktok/authorize"
WATCHDOG_SECONDS = 0.25
MAX_ERROR_SAMPLES = 5


class RequestFailed(Exception):
    """No HTTP answer: the connection failed, closed, or the request timed out."""


@dataclass
class Response:
    status: int
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode() + b":"
        for line in self.head.split(b"\r\n")[1:]:
            if line[: len(wanted)].lower() == wanted:
                return line[len(wanted):].strip().decode("latin-1")
        return None


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.sent_at = 0.0
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None:
            self._complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RequestFailed(f"connection closed ({exc or 'by peer'})"))

    # -- client side
    def request(self, data: bytes) -> asyncio.Future[Response]:
        if self.closed or self.transport is None:
            raise RequestFailed("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent_at = time.monotonic()
        self.transport.write(data)
        return self.waiter

    def abort(self, reason: str) -> None:
        self._fail(RequestFailed(reason))
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def _fail(self, error: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _complete(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            self.abort("answer without Content-Length")
            return
        stop = lower.find(b"\r\n", at + 2)
        length = int(lower[at + 17 : stop if stop >= 0 else None])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(int(head[9:12]), head, body))


class Target:
    """Where connections go: a loopback host and port."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK_HOSTS or parts.port is None:
            raise SystemExit(f"loopback URLs with a port only, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port
        self.host_header = f"{parts.hostname}:{parts.port}"
        self.open: set[Connection] = set()

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(Connection, self.host, self.port)
        self.open.add(connection)
        return connection

    def get(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\n\r\n".encode()

    def post_json(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self.host_header}\r\n{lines}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def close_all(self) -> None:
        for connection in list(self.open):
            if connection.transport is not None:
                connection.transport.close()
        self.open.clear()


@dataclass
class Phase:
    """What one closed-loop phase measured."""

    started: float = 0.0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    unsent: int = 0  # not sent before --max-seconds ran out
    spread: float = 0.0  # a burst: seconds between its first and its last request

    def error(self, kind: str, sample: str) -> None:
        self.errors[kind] += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(f"{kind}: {sample[:300]}")


async def closed_loop(
    target: Target,
    requests: Sequence[bytes],
    concurrency: int,
    *,
    max_seconds: float,
    request_timeout: float,
    check: Any,
) -> Phase:
    """Send every request over ``concurrency`` connections; ``check(response)`` returns
    None when the answer is the expected one, else an error kind."""
    phase = Phase()
    jobs: Iterator[bytes] = iter(requests)
    deadline = time.monotonic() + max_seconds
    connections: list[Connection] = []

    async def watchdog() -> None:
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            now = time.monotonic()
            for connection in connections:
                if connection.waiter is not None and now - connection.sent_at > request_timeout:
                    connection.abort(f"no answer within {request_timeout:g}s")

    async def worker() -> None:
        connection: Connection | None = None
        perf = time.perf_counter
        latencies = phase.latencies
        for data in jobs:
            if time.monotonic() > deadline:
                phase.unsent += 1 + sum(1 for _ in jobs)
                return
            try:
                if connection is None or connection.closed:
                    connection = await target.connect()
                    connections.append(connection)
                began = perf()
                response = await connection.request(data)
                took = perf() - began
            except (OSError, RequestFailed) as exc:
                phase.error("connection", repr(exc))
                continue
            problem = check(response)
            if problem is None:
                latencies.append(took)
            else:
                phase.error(problem, f"{response.status} {response.body[:200]!r}")

    guard = asyncio.create_task(watchdog())
    phase.started = time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        guard.cancel()
    phase.elapsed = time.monotonic() - phase.started
    if phase.unsent:
        phase.errors["not_sent_in_time"] += phase.unsent
    return phase


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, from /proc/<pid>/stat."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


# -- minting states -------------------------------------------------------------


async def mint(
    args: argparse.Namespace, gateway: Target, sandbox: Target, total: int,
    targets: Sequence[Target] = (),
) -> list[bytes]:
    """``total`` callback requests, each with a fresh state and code; the n-th one for
    ``targets[n % len(targets)]`` when given (a state is good at any gateway sharing
    the store), else for ``gateway``."""
    secret = os.environ.get("AUTH_JWT_SECRET")
    if not secret:
        raise SystemExit("AUTH_JWT_SECRET must be set in the environment")
    expires = int(time.time()) + 3600
    bearers = [
        "Bearer " + jwt.encode({"sub": f"bench-user-{n}", "exp": expires}, secret, "HS256")
        for n in range(args.owners)
    ]
    body = json.dumps({"redirectUri": args.product_redirect}).encode()
    authorize = [
        gateway.post_json(AUTHORIZE_PATH, body, {"Authorization": bearer})
        for bearer in itertools.islice(itertools.cycle(bearers), total)
    ]
    consent_urls: list[str] = []

    def started(response: Response) -> str | None:
        if response.status != 200:
            return f"authorize_{response.status}"
        consent_urls.append(json.loads(response.body)["authorizationUrl"])
        return None

    concurrency = max(8, min(args.concurrency, 64))
    phase = await closed_loop(
        gateway, authorize, concurrency, max_seconds=args.max_seconds,
        request_timeout=args.request_timeout, check=started,
    )
    _require_clean("minting states (authorize)", phase)
    callbacks: list[bytes] = []

    def consented(response: Response) -> str | None:
        location = response.header("Location") if response.status == 302 else None
        if location is None or "code=" not in location:
            return f"consent_{response.status}"
        target = targets[len(callbacks) % len(targets)] if targets else gateway
        callbacks.append(target.get(f"{CALLBACK_PATH}?{urlsplit(location).query}"))
        return None

    consents = []
    for url in consent_urls:
        parts = urlsplit(url)
        consents.append(sandbox.get(f"{parts.path}?{parts.query}"))
    phase = await closed_loop(
        sandbox, consents, concurrency, max_seconds=args.max_seconds,
        request_timeout=args.request_timeout, check=consented,
    )
    _require_clean("consenting at the sandbox", phase)
    return callbacks


def _require_clean(what: str, phase: Phase) -> None:
    if phase.errors:
        raise SystemExit(f"{what} failed: {dict(phase.errors)}; e.g. {phase.samples}")


def connected(response: Response) -> str | None:
    if response.status != 302:
        return f"http_{response.status}"
    location = response.header("Location") or ""
    return None if "status=connected" in location else "not_connected"


def healthy(response: Response) -> str | None:
    return None if response.status == 200 else f"http_{response.status}"


async def read_sandbox_connections(connection: Connection, sandbox: Target) -> int:
    response = await connection.request(sandbox.get("/sandbox/stats"))
    return int(json.loads(response.body)["connections"])


# -- a burst -----------------------------------------------------------------------


async def burst(
    targets: Sequence[Target], requests: Sequence[bytes], spread: float, *,
    request_timeout: float, check: Any,
) -> Phase:
    """Open loop: request n starts at ``n * spread / len(requests)`` seconds, each on a
    connection of its own (a browser each), to ``targets[n % len(targets)]``, whatever
    the answers before it. Latency counts from the planned start, connecting included."""
    phase = Phase()
    loop = asyncio.get_running_loop()
    count = len(requests)
    begin = loop.time() + 0.05
    phase.started = time.monotonic()
    started_at: list[float] = []

    async def one(index: int, data: bytes) -> None:
        planned = begin + index * spread / count
        await asyncio.sleep(max(planned - loop.time(), 0.0))
        started_at.append(loop.time())
        target = targets[index % len(targets)]
        connection: Connection | None = None
        try:
            connection = await asyncio.wait_for(target.connect(), request_timeout)
            response = await asyncio.wait_for(connection.request(data), request_timeout)
        except (OSError, RequestFailed, TimeoutError) as exc:
            phase.error("connection", repr(exc) or type(exc).__name__)
            return
        finally:
            if connection is not None and connection.transport is not None:
                connection.transport.close()
        took = loop.time() - planned
        problem = check(response)
        if problem is None:
            phase.latencies.append(took)
        else:
            phase.error(problem, f"{response.status} {response.body[:200]!r}")

    await asyncio.gather(*(one(n, data) for n, data in enumerate(requests)))
    phase.elapsed = time.monotonic() - phase.started
    phase.spread = (max(started_at) - min(started_at)) if started_at else 0.0
    return phase


# -- the run --------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    gateway = Target(args.gateway)
    sandbox = Target(args.sandbox) if args.sandbox else None
    total = args.warmup + args.count
    mint_started = time.monotonic()
    targets = [gateway, *(Target(url) for url in args.also_gateway)]
    if args.mode == "callbacks":
        if sandbox is None:
            raise SystemExit("--sandbox is required with --mode callbacks")
        requests = await mint(args, gateway, sandbox, total, targets if args.spread else ())
        check = connected
    elif args.mode == "floor":
        # bench.floor: the callback's HTTP shape only; it needs no state.
        requests = [gateway.get(f"{CALLBACK_PATH}?code=floor&state=floor")] * total
        check = connected
    else:
        requests = [gateway.get("/healthz")] * total
        check = healthy
    mint_seconds = time.monotonic() - mint_started
    if sandbox is not None:
        sandbox.close_all()  # the consent connections: not the gateway's
    if args.spread:
        return await run_burst(args, targets, requests, check, mint_seconds)
    common = {
        "max_seconds": args.max_seconds,
        "request_timeout": args.request_timeout,
        "check": check,
    }
    warmup = await closed_loop(gateway, requests[: args.warmup], args.concurrency, **common)
    if args.hold:
        # The orchestrator attaches its profiler now, then says go.
        print("ready", file=sys.stderr, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    stats_connection = await sandbox.connect() if sandbox is not None else None

    async def counters() -> dict[str, Any]:
        """CPU of the three processes and the sandbox's connection count, right now."""
        return {
            "gateway_cpu": cpu_seconds(args.gateway_pid),
            "sandbox_cpu": cpu_seconds(args.sandbox_pid),
            "own_cpu": time.process_time(),
            "sandbox_connections": (
                await read_sandbox_connections(stats_connection, sandbox)
                if stats_connection is not None and sandbox is not None else None
            ),
        }

    before = await counters()
    measured = await closed_loop(gateway, requests[args.warmup :], args.concurrency, **common)
    after = await counters()
    gateway.close_all()
    if sandbox is not None:
        sandbox.close_all()

    def spent(key: str) -> float | None:
        if before[key] is None or after[key] is None:
            return None
        return after[key] - before[key]

    ordered = sorted(measured.latencies)
    ok = len(ordered)
    elapsed = measured.elapsed
    return {
        "mode": args.mode,
        "concurrency": args.concurrency,
        "requested": args.count,
        "ok": ok,
        "errors": sum(measured.errors.values()),
        "errors_by_kind": dict(measured.errors),
        "error_samples": measured.samples,
        "warmup": args.warmup,
        "warmup_errors": sum(warmup.errors.values()),
        "warmup_error_samples": warmup.samples,
        "mint_seconds": round(mint_seconds, 3),
        "elapsed_seconds": round(elapsed, 3),
        "rate_per_second": round(ok / elapsed, 1) if elapsed else None,
        "latency_seconds": {
            "p50": percentile(ordered, 0.50),
            "p95": percentile(ordered, 0.95),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1] if ordered else None,
            "mean": sum(ordered) / ok if ok else None,
        },
        "gateway_cpu_seconds": spent("gateway_cpu"),
        "sandbox_cpu_seconds": spent("sandbox_cpu"),
        "loadgen_cpu_seconds": spent("own_cpu"),
        "sandbox_connections": spent("sandbox_connections"),
    }


async def run_burst(
    args: argparse.Namespace, targets: Sequence[Target], requests: Sequence[bytes], check: Any,
    mint_seconds: float,
) -> dict[str, Any]:
    gateway_cpu = cpu_seconds(args.gateway_pid)
    phase = await burst(targets, requests, args.spread, request_timeout=args.request_timeout,
                        check=check)
    spent = cpu_seconds(args.gateway_pid)
    ordered = sorted(phase.latencies)
    return {
        "mode": f"{args.mode} burst",
        "requested": len(requests),
        "gateways": len(targets),
        "ok": len(ordered),
        "errors": sum(phase.errors.values()),
        "errors_by_kind": dict(phase.errors),
        "error_samples": phase.samples,
        "mint_seconds": round(mint_seconds, 3),
        "started_within_seconds": round(phase.spread, 3),
        "elapsed_seconds": round(phase.elapsed, 3),
        "latency_seconds": {
            "p50": percentile(ordered, 0.50),
            "p95": percentile(ordered, 0.95),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1] if ordered else None,
        },
        "gateway_cpu_seconds": (
            spent - gateway_cpu if spent is not None and gateway_cpu is not None else None),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--gateway", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--sandbox", help="http://127.0.0.1:PORT (callbacks mode)")
    parser.add_argument("--mode", choices=("callbacks", "healthz", "floor"), default="callbacks")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--count", type=int, default=2000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="bound of each phase")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--owners", type=int, default=1000, help="distinct product users")
    parser.add_argument(
        "--product-redirect", default="http://localhost:3000/settings/connections"
    )
    parser.add_argument("--gateway-pid", type=int)
    parser.add_argument("--sandbox-pid", type=int)
    parser.add_argument(
        "--spread", type=float, default=0.0,
        help="a burst: start the --count requests evenly within this many seconds, open "
        "loop, each on a new connection (no warm-up)",
    )
    parser.add_argument(
        "--also-gateway", action="append", default=[],
        help="a burst's callbacks go round-robin to --gateway and these (same store)",
    )
    parser.add_argument(
        "--hold", action="store_true",
        help="after the warm-up, print 'ready' on stderr and wait for a line on stdin",
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.warmup < 0 or args.concurrency < 1 or args.owners < 1:
        parser.error("--count, --concurrency and --owners must be >= 1, --warmup >= 0")
    if args.spread < 0 or (args.spread and args.warmup):
        parser.error("--spread must be >= 0, and a burst has no --warmup")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

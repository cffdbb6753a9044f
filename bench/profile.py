"""Where the gateway's CPU goes: a summary of a py-spy ``--format raw`` profile.

Each line of the raw format is one distinct stack, ``outer;...;inner COUNT``,
frames written ``function (file)``. ``self`` is the share of samples with the
function innermost; ``inclusive`` the share with it anywhere on the stack.
``areas`` groups the innermost frames by what they belong to (Tornado's HTTP,
JWT, logging, ...).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

TOP = 20
# Innermost-frame file fragments -> area, first match wins.
AREAS = (
    ("curl_httpclient", "HTTP client (curl)"),
    ("simple_httpclient", "HTTP client (simple)"),
    ("httpclient", "HTTP client (common)"),
    ("tornado/http1connection", "HTTP/1.1 protocol (tornado)"),
    ("tornado/httputil", "HTTP/1.1 protocol (tornado)"),
    ("tornado/iostream", "sockets (tornado iostream)"),
    ("tornado/web", "request handling (tornado.web)"),
    ("tornado/routing", "request handling (tornado.web)"),
    ("tornado/httpserver", "request handling (tornado.web)"),
    ("tornado/", "event loop (tornado)"),
    ("asyncio/", "event loop (asyncio)"),
    ("selectors", "event loop (asyncio)"),
    ("jwt/", "JWT (state)"),
    ("cryptography/", "token encryption (AES-GCM)"),
    ("logging/", "logging"),
    ("logging_setup", "logging"),
    ("json/", "JSON"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("services/metrics", "metrics (prometheus_client)"),
    ("urllib/", "URL parsing / encoding"),
    ("storage/", "store"),
    ("core/", "gateway services"),
    ("services/", "gateway services"),
    ("handlers/", "gateway handlers"),
    ("copy.py", "store (deep copies)"),
    ("dataclasses", "dataclasses"),
    ("uuid", "uuid"),
    ("secrets", "random (secrets)"),
    ("random", "random (secrets)"),
    ("hashlib", "hashing"),
)


def _file_of(frame: str) -> str:
    start = frame.rfind("(")
    return frame[start + 1 : -1] if start >= 0 else frame


def area_of(frame: str) -> str:
    where = _file_of(frame)
    for fragment, area in AREAS:
        if fragment in where:
            return area
    return "other"


def summarize(path: Path) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # py-spy starts each stack with the process and thread; skip non-frames.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        areas[area_of(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counter: Counter[str], limit: int) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(limit)]

    if not total:
        return {"samples": 0, "file": str(path)}
    return {
        "file": str(path),
        "samples": total,
        "areas_percent": shares(areas, len(areas)),
        "self_percent": shares(self_time, TOP),
        "inclusive_percent": shares(inclusive, TOP + 10),
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\nprofile of the gateway ({summary['samples']} samples, {summary['file']}):")
    if not summary["samples"]:
        return
    print("  by area (innermost frame):")
    for name, share in summary["areas_percent"]:
        print(f"    {share:5.1f}%  {name}")
    print("  self time:")
    for name, share in summary["self_percent"]:
        print(f"    {share:5.1f}%  {name}")
    print("  inclusive time:")
    for name, share in summary["inclusive_percent"]:
        print(f"    {share:5.1f}%  {name}")


if __name__ == "__main__":
    import sys

    print_summary(summarize(Path(sys.argv[1])))

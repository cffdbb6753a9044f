"""The chart of a run: throughput and latency against concurrency (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in report["scenarios"] if "profile" not in s]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for scenario in scenarios:
        key = (scenario["mode"], scenario["upstream_latency_seconds"])
        groups.setdefault(key, []).append(scenario)

    figure, (rate_axis, latency_axis) = plt.subplots(1, 2, figsize=(12, 7.2))
    for (mode, latency), runs in sorted(groups.items()):
        runs.sort(key=lambda s: s["concurrency"])
        xs = [s["concurrency"] for s in runs]
        label = {
            "healthz": "GET /healthz (baseline)",
            "floor": "floor: the callback's HTTP only (bench.floor)",
            "no-upstream": "the callback without TikTok's HTTP (bench.no_upstream)",
        }.get(mode) or (
            f"callbacks, TikTok +{latency * 1000:.0f} ms/call" if latency else "callbacks"
        )
        style = "-" if mode == "callbacks" else "--"
        line = rate_axis.plot(
            xs, [s["rate_per_second"] or 0 for s in runs], style, marker="o", label=label
        )[0]
        if mode != "healthz":
            color = line.get_color()
            latency_axis.plot(
                xs, [1000 * (s["latency_seconds"]["p50"] or 0) for s in runs], "-",
                marker="o", color=color, label=f"{label}: p50",
            )
            latency_axis.plot(
                xs, [1000 * (s["latency_seconds"]["p99"] or 0) for s in runs], ":",
                marker="^", color=color, label=f"{label}: p99",
            )
    latency = report["settings"]["upstream_latency_seconds"]
    if latency and any(s["upstream_latency_seconds"] for s in scenarios):
        # The issue's p99 target with 500 flows: two calls' latency + 150 ms.
        latency_axis.axhline(
            1000 * (2 * latency + 0.150), color="grey", linestyle="--", linewidth=0.8,
            label=f"target p99 at 500 flows ({1000 * (2 * latency + 0.150):.0f} ms)",
        )
    machine = report["machine"]
    for axis in (rate_axis, latency_axis):
        axis.set_xscale("log")
        axis.set_xlabel("concurrent flows (connections)")
        axis.grid(True, which="both", alpha=0.3)
        # Below the plot: inside, it would hide points.
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    rate_axis.set_ylabel("requests per second")
    rate_axis.set_ylim(bottom=0)
    rate_axis.set_title("throughput")
    latency_axis.set_ylabel("milliseconds")
    latency_axis.set_yscale("log")
    latency_axis.set_title("callback latency")
    figure.suptitle(
        f"TikTok gateway, {report['settings']['store']} store - {machine['nproc']} x "
        f"{machine['cpu_model']}, Python {machine['python']} - {report['generated_at']}",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)

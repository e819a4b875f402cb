"""Run reports: `report.json` (numbers) and `report.png` (p95 and throughput over time)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import orjson

from bench.stats import Stats

SCHEMA = "eventpulse-bench/1"


def build_report(*, scenario: str, base_url: str, config: dict[str, Any], stats: Stats,
                 started_at: float, elapsed_s: float, server: dict[str, Any] | None = None,
                 result: dict[str, Any] | None = None) -> dict[str, Any]:
    total = stats.all_latency()
    return {
        "schema": SCHEMA,
        "scenario": scenario,
        "base_url": base_url,
        "started_at": dt.datetime.fromtimestamp(started_at, dt.UTC).isoformat(),
        "elapsed_s": round(elapsed_s, 3),
        "config": config,
        "totals": {
            "requests": stats.requests,
            "errors": stats.errors,
            "error_rate": round(stats.error_rate(), 6),
            "rps": round(stats.requests / elapsed_s, 3) if elapsed_s > 0 else 0.0,
            "latency_ms": total.summary_ms(),
        },
        "routes": stats.route_summary(elapsed_s),
        "metrics": {name: h.summary_ms() for name, h in sorted(stats.metrics.items())},
        "counters": dict(sorted(stats.counters.items())),
        "timeline": stats.timeline_rows(started_at),
        "server": server or {"available": False, "cache_hit_rate": None, "samples": []},
        "result": result or {},
    }


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    return path


def write_png(report: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = report.get("timeline") or []
    t = [r["t"] for r in rows]
    samples = [s for s in (report.get("server") or {}).get("samples", [])
               if s.get("replicas") is not None or s.get("cache_hit_rate") is not None]
    n_axes = 3 if samples else 2
    fig, axes = plt.subplots(n_axes, 1, figsize=(10, 2.8 * n_axes), sharex=True)
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(t, [r["p95_ms"] for r in rows], color="tab:red", label="p95")
    ax1.plot(t, [r["mean_ms"] for r in rows], color="tab:orange", alpha=0.6, label="mean")
    ax1.set_ylabel("latency (ms)")
    ax1.legend(loc="upper left")
    ax1.grid(alpha=0.3)
    ax1.set_title(f"{report.get('scenario', '')} — {report.get('base_url', '')}")
    ax2.plot(t, [r["requests"] for r in rows], color="tab:blue", label="requests/s")
    ax2.plot(t, [r["errors"] for r in rows], color="tab:red", label="errors/s")
    ax2.set_ylabel("per second")
    ax2.legend(loc="upper left")
    ax2.grid(alpha=0.3)
    if samples:
        ax3 = axes[2]
        st = [s["t"] for s in samples]
        ax3.step(st, [s.get("replicas") for s in samples], where="post", color="tab:green",
                 label="replicas")
        ax3.set_ylabel("replicas")
        ax3b = ax3.twinx()
        ax3b.plot(st, [s.get("cache_hit_rate") for s in samples], color="tab:purple",
                  label="cache hit rate")
        ax3b.set_ylim(0, 1.05)
        ax3b.set_ylabel("cache hit rate")
        ax3.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since start")
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    return write_json(report, out_dir), write_png(report, out_dir)

"""Live terminal progress (rich): users, req/s, p95, errors, plus scenario gauges."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from bench.stats import Stats


def snapshot_line(stats: Stats, now: float, elapsed: float) -> dict[str, Any]:
    """Numbers for the progress table from merged stats (last ~3 complete seconds)."""
    last = int(now) - 1
    recent = stats.window(last - 2, last)
    return {
        "elapsed_s": elapsed,
        "rps": recent.requests / 3.0,
        "p95_ms": recent.latency.percentile(95) * 1e3,
        "requests": stats.requests,
        "errors": stats.errors,
        "error_rate": stats.error_rate(),
    }


def render(title: str, line: dict[str, Any], gauges: dict[str, Any]) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    for col in ("elapsed", "users", "req/s", "p95 3s", "requests", "errors"):
        t.add_column(col, justify="right")
    for k in gauges:
        if k != "users":
            t.add_column(k, justify="right")
    err = f"{line['errors']} ({line['error_rate']:.2%})"
    row = [f"{line['elapsed_s']:.0f} s", str(gauges.get("users", "-")), f"{line['rps']:.0f}",
           f"{line['p95_ms']:.0f} ms", str(line["requests"]), err]
    row += [str(v) for k, v in gauges.items() if k != "users"]
    t.add_row(*row)
    return t


async def progress_loop(title: str, merged: Callable[[], Stats], gauges: dict[str, Any],
                        stop: asyncio.Event, started: float, enabled: bool = True,
                        interval_s: float = 1.0) -> None:
    if not enabled:
        await stop.wait()
        return
    console = Console(stderr=True)
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while not stop.is_set():
            now = time.time()
            live.update(render(title, snapshot_line(merged(), now, now - started), gauges))
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass
        now = time.time()
        live.update(render(title, snapshot_line(merged(), now, now - started), gauges))

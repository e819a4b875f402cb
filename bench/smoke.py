"""`run_smoke(base_url, secret, scenario)` — a tiny, bounded run for integration tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
from pathlib import Path
from typing import Any

from bench.runner import RunConfig, run, run_async

SMALL: dict[str, dict[str, Any]] = {
    "seed-mix": {"users": 4, "duration_s": 4.0, "think": (0.2, 0.5), "max_requests": 400},
    "flash-sale": {"users": 6, "tickets": 3, "duration_s": 30.0, "concurrency": 6,
                   "max_requests": 400, "purchase_wait_s": 5.0, "poll_s": 0.3},
    "waiting-crowd": {"users": 5, "changes": 2, "duration_s": 20.0, "concurrency": 5,
                      "push_timeout_s": 5.0, "max_requests": 400, "poll_s": 0.3},
    "ramp": {"ramp_start": 2, "ramp_step": 2, "max_users": 4, "step_seconds": 2.0,
             "duration_s": 10.0, "think": (0.1, 0.3), "max_requests": 1000},
}


def smoke_config(base_url: str, secret: str | None, scenario: str,
                 out: Path | None = None, **overrides: Any) -> RunConfig:
    if scenario not in SMALL:
        raise ValueError(f"unknown scenario {scenario!r}")
    return RunConfig(scenario=scenario, base_url=base_url, secret=secret, progress=False,
                     out=out, scrape_interval_s=1.0, **{**SMALL[scenario], **overrides})


async def run_smoke_async(base_url: str, secret: str | None, scenario: str,
                          out: Path | None = None, **overrides: Any) -> dict[str, Any]:
    return await run_async(smoke_config(base_url, secret, scenario, out, **overrides))


def run_smoke(base_url: str, secret: str | None, scenario: str, out: Path | str | None = None,
              **overrides: Any) -> dict[str, Any]:
    """Run a few users for a few seconds and return the report dict (also written to `out`,
    a temporary folder by default, see report['files']). Safe to call from inside a running
    event loop (it then runs on a helper thread)."""
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    cfg = smoke_config(base_url, secret, scenario, out_dir, **overrides)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run(cfg)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run, cfg).result()

"""ramp: seed-mix with virtual users rising step by step until the KPIs break.

Starts `--start` users, adds `--step` users every `--step-seconds`, judges each step's own
numbers (`bench.kpi.ramp_verdict`) and stops at the first broken step or at `--max-users`.
The answer is the largest user count whose step held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import Any

from bench.kpi import StepSummary, breaches, next_users, ramp_verdict, summarize_step
from bench.scenarios.seed_mix import ensure_event, spread_s, vu
from bench.stats import Stats


async def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.cfg
    event_id = await ensure_event(ctx)
    ctx.result["event_id"] = event_id
    for w in ctx.workers:
        w.sink.open_window("step")
    rng = random.Random(cfg.seed)
    tasks: list[asyncio.Task[Any]] = []
    steps: list[StepSummary] = []
    users, target = 0, max(1, min(cfg.ramp_start, cfg.max_users))
    verdict = None
    reason = "time or request budget ended before a KPI broke"
    spread = min(spread_s(ctx), cfg.step_seconds / 2)
    ctx.gauges["step"] = 0
    try:
        while ctx.budget.live():
            for i in range(users, target):
                tasks.append(asyncio.create_task(
                    ctx.until_stop(vu(ctx, i, event_id, rng.uniform(0, spread)))))
            users = target
            ctx.gauges["step"] += 1
            for w in ctx.workers:
                w.sink.take_window("step")
            t0 = time.monotonic()
            complete = await ctx.budget.sleep(cfg.step_seconds)
            seconds = time.monotonic() - t0
            window = Stats.merged([w.sink.take_window("step") for w in ctx.workers])
            if not complete and seconds < cfg.step_seconds * 0.5:
                break  # too short a step to judge
            s = summarize_step(window, users, seconds)
            s = dataclasses.replace(s, breaches=tuple(breaches(s, cfg.kpis)))
            steps.append(s)
            verdict = ramp_verdict(steps, cfg.kpis, cfg.max_users)
            ctx.gauges["held"] = verdict.held_users
            if verdict.stop:
                reason = verdict.reason
                break
            if not complete:
                break
            target = next_users(users, cfg.ramp_step, cfg.max_users)
    finally:
        ctx.budget.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    held = verdict.held_users if verdict else 0
    ctx.result.update(steps=[s.to_dict() for s in steps], held_users=held, stop_reason=reason,
                      kpis={"p95_ms": cfg.kpis.p95_s * 1e3, "error_rate": cfg.kpis.error_rate,
                            "position_mean_ms": cfg.kpis.position_mean_s * 1e3,
                            "tickets_mean_ms": cfg.kpis.tickets_mean_s * 1e3})
    return ctx.result

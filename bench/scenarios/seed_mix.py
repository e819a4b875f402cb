"""seed-mix: the earlier product's read mix, one loop per virtual user.

Each VU joins the event once (its own entry), then loops: GET /healthz, availability,
queue position (`/api/queue/position?eventId=&userId=`), event details, its tickets, and
thinks for a random time in `--think LOW-HIGH` seconds.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from bench.http import BudgetExhausted
from bench.scenarios.common import create_event, error_text, join


async def ensure_event(ctx: Any) -> str:
    if ctx.cfg.event_id:
        return str(ctx.cfg.event_id)
    # big enough that the line never sells out during a read-mix run
    return await create_event(ctx, total=1_000_000, max_per_user=max(4, ctx.cfg.quantity),
                              name=f"bench seed-mix {ctx.cfg.run_id}")


async def vu(ctx: Any, i: int, event_id: str, start_delay: float = 0.0) -> None:
    """One virtual user; returns when the run's time or request budget ends."""
    budget = ctx.budget
    if start_delay > 0 and not await budget.sleep(start_delay):
        return
    w = ctx.worker_for(i)
    uid = ctx.user_id(i)
    h = ctx.user_headers(uid)
    lo, hi = ctx.cfg.think
    rng = random.Random(None if ctx.cfg.seed is None else ctx.cfg.seed * 1_000_003 + i)
    paths = (
        ("/healthz", "healthz", None),
        (f"/api/events/{event_id}/availability", "availability", h),
        (ctx.position_path(event_id, uid), "queue_position", h),
        (f"/api/events/{event_id}", "event", h),
        (f"/api/users/{uid}/tickets", "user_tickets", h),
    )
    ctx.gauges["users"] += 1
    try:
        r = await join(w, event_id, h, ctx.cfg.quantity)
        if r.ok:
            w.sink.count("joined")
        else:
            w.sink.count("join_failed")
            if ctx.result.setdefault("first_join_error", None) is None:
                ctx.result["first_join_error"] = error_text(r)
        while budget.live():
            for path, route, hdrs in paths:
                await w.call("GET", path, route, headers=hdrs, want_body=False)
            w.sink.count("loops")
            if not await budget.sleep(rng.uniform(lo, hi)):
                break
    except BudgetExhausted:
        pass
    finally:
        ctx.gauges["users"] -= 1


def spread_s(ctx: Any) -> float:
    """Stagger VU starts so they do not all join in the same millisecond."""
    return min(max(ctx.cfg.think[1], 1.0), 5.0)


async def run(ctx: Any) -> dict[str, Any]:
    event_id = await ensure_event(ctx)
    ctx.result["event_id"] = event_id
    spread = spread_s(ctx)
    n = ctx.cfg.users
    await asyncio.gather(*(ctx.until_stop(vu(ctx, i, event_id, spread * i / max(n, 1)))
                           for i in range(n)))
    ctx.result["users"] = n
    return ctx.result

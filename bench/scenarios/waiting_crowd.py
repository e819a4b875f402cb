"""waiting-crowd: M users wait with SSE streams open; the generator moves the line and
measures how fast each affected stream hears about it.

The event's outflow is paused first so everyone stays waiting. Then, round by round
(`--changes`), the line moves once:
  * `--move leave`: the user at the head leaves (DELETE /api/events/{id}/queue/me);
  * `--move offers`: the organizer lets one more offer out (PATCH paused=false,
    max_live_offers=k), which takes the head of the line out of the waiting set.
Every stream whose position was behind the head at that moment is expected to receive a
`data:` event with a smaller position. Push delay = its arrival - the moment the change
request was sent (so it includes the change request's own latency). Streams that do not
hear within `--push-timeout` count as missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from bench.scenarios.common import (
    admin_queue,
    create_event,
    error_text,
    follow_entry,
    gather_bounded,
    join,
)


@dataclass
class Round:
    t0: float                               # time.monotonic() when the change was sent
    baseline: dict[str, int]                # uid -> position at the change, expected to drop
    arrived: dict[str, float] = field(default_factory=dict)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Crowd:
    positions: dict[str, int | None] = field(default_factory=dict)   # latest per user
    via: dict[str, str] = field(default_factory=dict)
    first_seen: asyncio.Event = field(default_factory=asyncio.Event)
    expected_streams: int = 0
    current: Round | None = None


async def follow(ctx: Any, i: int, event_id: str, crowd: Crowd) -> None:
    w = ctx.worker_for(i)
    uid = ctx.user_id(i)
    g = ctx.gauges

    def opened() -> None:
        g["streams"] += 1
        g["max_streams"] = max(g["max_streams"], g["streams"])

    def closed() -> None:
        g["streams"] -= 1

    def seen(at: float, entry: dict[str, Any], via: str) -> None:
        pos = entry.get("position") if entry.get("status") == "waiting" else None
        new = uid not in crowd.positions
        crowd.positions[uid] = pos if isinstance(pos, int) else None
        crowd.via[uid] = via
        if new and len(crowd.positions) >= crowd.expected_streams:
            crowd.first_seen.set()
        rnd = crowd.current
        if rnd is not None and uid in rnd.baseline and uid not in rnd.arrived:
            if pos is None or pos < rnd.baseline[uid]:
                rnd.arrived[uid] = at
                w.sink.observe("push_delay", at - rnd.t0)
                if len(rnd.arrived) >= len(rnd.baseline):
                    rnd.all_in.set()

    # By callback: 8,000 streams moving at once must not wake 8,000 tasks per change.
    await follow_entry(w, event_id, ctx.user_headers(uid), poll_s=ctx.cfg.poll_s,
                       on_entry=seen, on_open=opened, on_close=closed)


async def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.cfg
    m = cfg.users
    event_id = cfg.event_id or await create_event(
        ctx, total=max(1_000_000, m * 4), max_per_user=max(1, cfg.quantity),
        name=f"bench waiting-crowd {cfg.run_id}")
    ctx.result["event_id"] = event_id
    await admin_queue(ctx, event_id, paused=True)
    ctx.gauges.update(users=m, joined=0, streams=0, max_streams=0, round=0)

    async def join_one(i: int) -> str | None:
        uid = ctx.user_id(i)
        r = await join(ctx.worker_for(i), event_id, ctx.user_headers(uid), cfg.quantity)
        if r.ok:
            ctx.gauges["joined"] += 1
            return uid
        ctx.result.setdefault("first_join_error", error_text(r))
        return None

    joined = [u for u in await ctx.until_stop(
        gather_bounded([join_one(i) for i in range(m)], cfg.concurrency)) or [] if u]
    index = {ctx.user_id(i): i for i in range(m)}
    crowd = Crowd(expected_streams=len(joined))
    followers = [asyncio.create_task(ctx.until_stop(follow(ctx, index[u], event_id, crowd)))
                 for u in joined]
    rounds: list[dict[str, Any]] = []
    offers = 0
    try:
        with contextlib.suppress(TimeoutError):
            # Every stream heard from before the first change (a burst of thousands of
            # opens takes a while); half the remaining budget is left for the rounds.
            await asyncio.wait_for(crowd.first_seen.wait(), ctx.budget.remaining_s() / 2)
        ctx.result["streams_ready"] = len(crowd.positions)
        leavers: set[str] = set()
        for k in range(cfg.changes):
            if not ctx.budget.live():
                break
            waiting = {u: p for u, p in crowd.positions.items()
                       if p is not None and u not in leavers}
            if len(waiting) < 2:
                break
            head = min(waiting, key=lambda u: waiting[u])
            head_pos = waiting[head]
            baseline = {u: p for u, p in waiting.items() if p > head_pos}
            rnd = Round(time.monotonic(), baseline)
            crowd.current = rnd
            ctx.gauges["round"] = k + 1
            if cfg.move == "offers":
                offers += 1
                patch: dict[str, Any] = {"max_live_offers": offers}
                if offers == 1:
                    patch["paused"] = False
                await admin_queue(ctx, event_id, **patch)
            else:
                leavers.add(head)
                r = await ctx.control.call("DELETE", f"/api/events/{event_id}/queue/me",
                                           "leave", headers=ctx.user_headers(head),
                                           budgeted=False)
                if not r.ok:
                    ctx.result.setdefault("first_leave_error", error_text(r))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rnd.all_in.wait(),
                                       min(cfg.push_timeout_s, ctx.budget.remaining_s() + 0.1))
            crowd.current = None
            delays = sorted(t - rnd.t0 for t in rnd.arrived.values())
            rounds.append({
                "round": k + 1, "move": cfg.move, "head_position": head_pos,
                "expected": len(baseline), "received": len(rnd.arrived),
                "missed": len(baseline) - len(rnd.arrived),
                "max_delay_ms": round(delays[-1] * 1e3, 3) if delays else None,
                "p95_delay_ms": round(delays[int(0.95 * (len(delays) - 1))] * 1e3, 3)
                if delays else None,
            })
            ctx.gauges["missed"] = sum(x["missed"] for x in rounds)
            await asyncio.sleep(0.2)  # let stragglers settle before the next change
    finally:
        ctx.budget.stop.set()
        await asyncio.gather(*followers, return_exceptions=True)
    stats = ctx.merged()
    pd = stats.metrics.get("push_delay")
    ctx.result.update(
        users=m, joined=len(joined),
        open_streams_max=ctx.gauges["max_streams"],
        via_polling=sum(1 for v in crowd.via.values() if v == "poll"),
        rounds=rounds,
        expected_pushes=sum(x["expected"] for x in rounds),
        missed_pushes=sum(x["missed"] for x in rounds),
        push_delay_ms=pd.summary_ms() if pd else None,
    )
    return ctx.result

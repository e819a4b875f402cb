"""flash-sale: N users rush an event with C tickets.

Create the event (organizer token), optionally cap live offers, then N users join as fast
as `--concurrency` allows; each waits for its offer on the SSE stream (polling if the
stream is unavailable), buys with `?wait=`, and reads its tickets. At the end: joins/s,
offer-to-ticket latency, sold count from availability, and the oversell check
(sold <= C and tickets held by all users == sold).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from typing import Any

from bench.http import BudgetExhausted, Response, Worker
from bench.scenarios.common import (
    TERMINAL,
    admin_queue,
    availability,
    create_event,
    error_text,
    follow_entry,
    gather_bounded,
    join,
    refused_sold_out,
)

DONE = frozenset({"completed", "complete", "confirmed", "succeeded", "success", "done",
                  "committed", "paid", "purchased"})
FAILED = frozenset({"failed", "declined", "rejected", "expired", "cancelled", "canceled",
                    "refunded", "error"})


def count_tickets(tickets: Any, event_id: str) -> int:
    """Seats in a tickets answer for `event_id` (a ticket has `quantity` or is one seat)."""
    if isinstance(tickets, dict):  # tolerate {"tickets": [...]} / {"items": [...]}
        tickets = tickets.get("tickets", tickets.get("items", []))
    n = 0
    for t in tickets or []:
        if not isinstance(t, dict):
            continue
        if str(t.get("event_id", event_id)) != event_id:
            continue
        if str(t.get("status", "")).lower() in FAILED:
            continue
        q = t.get("quantity", 1)
        n += q if isinstance(q, int) and q > 0 else 1
    return n


async def buy(w: Worker, event_id: str, headers: dict[str, str], quantity: int,
              wait_s: float) -> tuple[bool, Response]:
    """Purchase with one Idempotency-Key (reused on retries); poll if answered 202."""
    key = str(uuid.uuid4())
    hdrs = {**headers, "Idempotency-Key": key}
    body = {"quantity": quantity, "payment_reference": f"test_ok_{key}"}
    path = f"/api/events/{event_id}/purchases?wait={wait_s:g}"
    r = Response("conn")
    for attempt in range(4):
        r = await w.call("POST", path, "purchase", headers=hdrs, json=body, budgeted=False)
        if r.status in (503, 429, "conn", "timeout") and attempt < 3:
            await asyncio.sleep(min(r.retry_after(0.5), 5.0))
            continue
        break
    if r.status == 201:
        return True, r
    if r.status == 202 and isinstance(r.body, dict) and r.body.get("purchase_id"):
        pid = r.body["purchase_id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            p = await w.call("GET", f"/api/purchases/{pid}", "purchase_status", headers=headers,
                             budgeted=False)
            if p.ok and isinstance(p.body, dict):
                st = str(p.body.get("status", "")).lower()
                if st in DONE or p.body.get("tickets"):
                    return True, p
                if st in FAILED:
                    return False, p
            await asyncio.sleep(0.25)
    return False, r


class Door:
    """Where the users wait for the sale to open: a semaphore that starts with no
    permits (its waiters queue in order), opened with `concurrency` permits once every
    user's task is parked at it. So the join span times the server's answers, not the
    generator's own start (tens of thousands of tasks and tokens take seconds here)."""

    def __init__(self, users: int, concurrency: int) -> None:
        self.sem = asyncio.Semaphore(0)
        self.users, self.concurrency = users, max(1, concurrency)
        self.arrived = 0
        self.all_in = asyncio.Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.users:
            self.all_in.set()

    async def open_when_all_in(self) -> None:
        await self.all_in.wait()
        # The users' tasks live until the sale ends: left to the collector, each of its
        # full passes walks all of them (0.66 s, once mid-sale, with 50,000 users: a
        # second the generator answered nothing). Frozen, they are out of its way.
        gc.freeze()
        for _ in range(self.concurrency):
            self.sem.release()


async def user(ctx: Any, i: int, event_id: str, door: Door,
               joins: dict[str, Any], sold_out: asyncio.Event) -> None:
    cfg = ctx.cfg
    w = ctx.worker_for(i)
    uid = ctx.user_id(i)
    h = ctx.user_headers(uid)
    g = ctx.gauges
    door.arrive()
    try:
        async with door.sem:
            t = time.monotonic()
            joins.setdefault("first", t)
            r = await join(w, event_id, h, cfg.quantity, expected=refused_sold_out)
            joins["last"] = time.monotonic()
        if refused_sold_out(r.status, r.body):
            w.sink.count("join_refused_sold_out")  # the line's honest answer, not a failure
            return
        if not r.ok:
            w.sink.count("join_failed")
            ctx.result.setdefault("first_join_error", error_text(r))
            return
        joined_at = time.monotonic()
        g["joined"] += 1
        w.sink.count("joined")
        offered_at = None

        def opened() -> None:
            g["streams"] += 1

        def closed() -> None:
            g["streams"] -= 1

        # The entry is read by callback (every change in the line moves every waiting
        # user's position: thousands of events a second that must not wake a task each).
        waiter: asyncio.Future[tuple[float, dict[str, Any], str] | None] = \
            asyncio.get_running_loop().create_future()
        follower = asyncio.ensure_future(follow_entry(
            w, event_id, h, poll_s=cfg.poll_s, on_entry=_offer_catcher(waiter),
            on_open=opened, on_close=closed))
        follower.add_done_callback(lambda _: waiter.done() or waiter.set_result(None))
        stopper = asyncio.ensure_future(sold_out.wait())
        try:
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            follower.cancel()  # one offer is all this user waits for: close the stream
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        if waiter not in done:
            w.sink.count("not_offered_sold_out")
            return
        got = waiter.result()
        if got is None:
            w.sink.count("not_offered")
            return
        offered_at, entry, via = got
        w.sink.count(f"offer_via_{via}")
        g["offered"] += 1
        w.sink.observe("join_to_offer", offered_at - joined_at)
        qty = (entry.get("offer") or {}).get("quantity") or cfg.quantity
        ok, pr = await buy(w, event_id, h, int(qty), cfg.purchase_wait_s)
        if not ok:
            w.sink.count("purchase_failed")
            ctx.result.setdefault("first_purchase_error", error_text(pr))
            return
        w.sink.observe("offer_to_ticket", time.monotonic() - offered_at)
        g["purchased"] += 1
        w.sink.count("purchased")
        tr = await w.call("GET", f"/api/users/{uid}/tickets?eventId={event_id}", "user_tickets",
                          headers=h, budgeted=False)
        if not tr.ok:  # refused or timed out: says nothing about the purchase's visibility
            w.sink.count("read_your_writes_unread")
            return
        seen = count_tickets(tr.body, event_id)
        w.sink.count("read_your_writes_ok" if seen >= 1 else "read_your_writes_miss")
    except BudgetExhausted:
        pass


def _offer_catcher(waiter: asyncio.Future) -> Any:
    """An `on_entry` callback that resolves `waiter` with the first offer (arrival, entry,
    via), or None once the entry is final without one."""
    def seen(at: float, entry: dict[str, Any], via: str) -> None:
        if waiter.done():
            return
        if entry.get("offer") or entry.get("status") == "offered":
            waiter.set_result((at, entry, via))
        elif entry.get("status") in TERMINAL:
            waiter.set_result(None)
    return seen


async def watch_sold_out(ctx: Any, event_id: str, sold_out: asyncio.Event,
                         interval_s: float = 0.5) -> None:
    """Set `sold_out` once nothing is left to offer (sold out and nothing held)."""
    while not ctx.budget.stop.is_set():
        a = await availability(ctx, event_id, route="availability_watch")
        if a is not None:
            ctx.gauges["sold"] = a.get("sold")
            if a.get("sold_out") and not a.get("held"):
                sold_out.set()
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.budget.stop.wait(), interval_s)


async def final_check(ctx: Any, event_id: str, n: int) -> dict[str, Any]:
    # let in-flight offers/purchases settle (held -> 0) for up to ~10 s
    a = None
    for _ in range(20):
        a = await availability(ctx, event_id, route="availability_final")
        if a is not None and not a.get("held"):
            break
        await asyncio.sleep(0.5)

    async def tickets_of(i: int) -> int | None:
        uid = ctx.user_id(i)
        r = await ctx.control.call("GET", f"/api/users/{uid}/tickets?eventId={event_id}",
                                   "user_tickets_check", headers=ctx.user_headers(uid),
                                   budgeted=False)
        return count_tickets(r.body, event_id) if r.ok else None

    per_user = await gather_bounded([tickets_of(i) for i in range(n)], 16)
    unread = sum(1 for x in per_user if x is None)
    held_by_users = sum(x for x in per_user if x)
    cap = ctx.cfg.tickets
    sold = a.get("sold") if a else None
    check = {
        "capacity": cap,
        "availability": a,
        "sold": sold,
        "tickets_held_by_users": held_by_users,
        "users_with_tickets": sum(1 for x in per_user if x),
        "users_unreadable": unread,
        "max_per_user_seen": max((x or 0 for x in per_user), default=0),
        "sold_le_capacity": sold is not None and sold <= cap,
        "tickets_match_sold": sold is not None and unread == 0 and held_by_users == sold,
    }
    check["ok"] = bool(check["sold_le_capacity"] and check["tickets_match_sold"]
                       and held_by_users <= cap)
    return check


async def run(ctx: Any) -> dict[str, Any]:
    cfg = ctx.cfg
    n = cfg.users
    event_id = cfg.event_id or await create_event(
        ctx, total=cfg.tickets, max_per_user=max(1, cfg.quantity),
        name=f"bench flash-sale {cfg.run_id}")
    ctx.result["event_id"] = event_id
    patch: dict[str, Any] = {}
    if cfg.max_live_offers is not None:
        patch["max_live_offers"] = cfg.max_live_offers
    if cfg.offers_per_minute is not None:
        patch["offers_per_minute"] = cfg.offers_per_minute
    if patch:
        await admin_queue(ctx, event_id, **patch)
    ctx.gauges.update(users=n, joined=0, streams=0, offered=0, purchased=0, sold=0)
    for i in range(n):  # users sign in before the on-sale: tokens are not the sale's work
        ctx.user_headers(ctx.user_id(i))
    door = Door(n, cfg.concurrency)
    opener = asyncio.create_task(door.open_when_all_in())
    joins: dict[str, Any] = {}
    sold_out = asyncio.Event()
    watcher = asyncio.create_task(watch_sold_out(ctx, event_id, sold_out))
    t0 = time.monotonic()
    try:
        await asyncio.gather(*(ctx.until_stop(user(ctx, i, event_id, door, joins, sold_out))
                               for i in range(n)))
    finally:
        gc.unfreeze()
        for task in (watcher, opener):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    sale_s = time.monotonic() - t0
    stats = ctx.merged()
    joined = stats.counters.get("joined", 0)
    join_span = (joins.get("last", t0) - joins.get("first", t0)) or 1e-9
    o2t = stats.metrics.get("offer_to_ticket")
    ctx.result.update(
        users=n,
        joined=joined,
        joins_per_s=round(joined / join_span, 2) if joined else 0.0,
        # Every join answered (accepted or refused sold out) over the same span: the rate
        # the line took joins at. joins_per_s above counts only the accepted ones.
        join_answers_per_s=round(stats.routes["join"].count / join_span, 2)
        if "join" in stats.routes else 0.0,
        sale_seconds=round(sale_s, 3),
        purchased=stats.counters.get("purchased", 0),
        offer_to_ticket_ms=o2t.summary_ms() if o2t else None,
        oversell=await final_check(ctx, event_id, n),
    )
    return ctx.result

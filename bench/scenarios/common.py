"""Steps shared by scenarios: create an event, join, watch my entry, admin queue changes."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from bench.http import BudgetExhausted, Response, Worker

# entry statuses after which nothing more happens to a waiting user
TERMINAL = frozenset({"purchased", "expired", "left", "abandoned", "cancelled", "canceled",
                      "closed", "sold_out", "removed", "released"})


def error_text(r: Response) -> str:
    if isinstance(r.body, dict) and isinstance(r.body.get("error"), dict):
        e = r.body["error"]
        return f"{r.status} {e.get('code')}: {e.get('message')}"
    return f"{r.status} {r.body!r}"[:300]


async def create_event(ctx: Any, *, total: int, max_per_user: int, name: str,
                       offer_minutes: int | None = None) -> str:
    from bench.runner import SetupError
    when = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    body: dict[str, Any] = {
        "name": name, "description": f"load test {ctx.cfg.run_id}", "location": "loopback",
        "event_date": when.isoformat(), "price": 10.0, "total_tickets": total,
        "max_per_user": max_per_user,
    }
    if offer_minutes is not None:
        body["offer_minutes"] = offer_minutes
    r = await ctx.control.call("POST", "/api/events", "create_event",
                               headers=ctx.organizer_headers(), json=body, budgeted=False)
    if not r.ok or not isinstance(r.body, dict) or "id" not in r.body:
        raise SetupError(f"creating the event failed: {error_text(r)}")
    return str(r.body["id"])


async def admin_queue(ctx: Any, event_id: str, **patch: Any) -> Response:
    from bench.runner import SetupError
    r = await ctx.control.call("PATCH", f"/api/admin/events/{event_id}/queue", "admin_queue",
                               headers=ctx.organizer_headers(), json=patch, budgeted=False)
    if not r.ok:
        raise SetupError(f"PATCH admin queue {patch} failed: {error_text(r)}")
    return r


async def availability(ctx: Any, event_id: str, *, route: str = "availability") -> dict | None:
    """The event's availability as of now: the checks need it fresh, so past the ingress's
    one-second edge cache (`Cache-Control: no-cache`)."""
    r = await ctx.control.call("GET", f"/api/events/{event_id}/availability", route,
                               headers={**ctx.organizer_headers(), "Cache-Control": "no-cache"},
                               budgeted=False)
    return r.body if r.ok and isinstance(r.body, dict) else None


def refused_sold_out(status: int | str, body: Any) -> bool:
    """A join refused because nothing is left to sell: the line's honest answer."""
    return status == 409 and isinstance(body, dict) and isinstance(
        body.get("error"), dict) and body["error"].get("code") == "sold_out"


async def join(w: Worker, event_id: str, headers: dict[str, str], quantity: int,
               *, retries: int = 3, expected: Any = None) -> Response:
    """Join the line; retry on 503 (Retry-After) a few times while the run lives."""
    r = Response("conn")
    for attempt in range(retries + 1):
        r = await w.call("POST", f"/api/events/{event_id}/queue", "join", headers=headers,
                         json={"quantity": quantity}, expected=expected)
        if r.status not in (503, "conn", "timeout") or attempt == retries:
            return r
        if not await w.budget.sleep(min(r.retry_after(0.5), 5.0)):
            return r
    return r


async def follow_entry(w: Worker, event_id: str, headers: dict[str, str], *, poll_s: float,
                       on_entry: Callable[[float, dict[str, Any], str], None],
                       on_open: Callable[[], None] | None = None,
                       on_close: Callable[[], None] | None = None) -> None:
    """Follow my entry: `on_entry(arrival time.monotonic(), entry, 'sse'|'poll')` for each
    update, called as each event is read (`Worker.follow`, no task woken per event: a
    crowd of streams all move at once). If the stream cannot be opened or ends, polls
    `/queue/me` every `poll_s` seconds until the run's budget ends."""
    path = f"/api/events/{event_id}/queue/me"

    def event(payload: Any) -> None:
        if isinstance(payload, dict):
            on_entry(time.monotonic(), payload, "sse")

    opened = False
    try:
        opened = await w.follow(path + "/stream", "stream_open", headers=headers,
                                on_event=event, on_open=on_open)
    finally:
        if opened and on_close is not None:
            on_close()
    async for at, entry, via in poll_entry(w, path, headers, poll_s):
        on_entry(at, entry, via)


async def poll_entry(w: Worker, path: str, headers: dict[str, str], poll_s: float
                     ) -> AsyncIterator[tuple[float, dict[str, Any], str]]:
    """Poll `path` (the user's entry) every `poll_s` s until the run's budget ends."""
    while w.budget.live():
        try:
            r = await w.call("GET", path, "queue_me", headers=headers)
        except BudgetExhausted:
            return
        if r.ok and isinstance(r.body, dict):
            yield time.monotonic(), r.body, "poll"
        elif r.status == 404:
            return
        if not await w.budget.sleep(poll_s):
            return


async def gather_bounded(coros: list[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(max(1, limit))

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))

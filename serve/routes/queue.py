"""The waiting line: join, my entry (polled or pushed), leave, release.

Each request makes at most one (coalesced) actor call. Redis round trips: join 1 (rate
limit; none to refuse a join of a sold-out event) + details on an L1 miss; the others 0 on
an L1 hit.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from actors.line import MAX_USER_LEN
from eventpulse.auth import Principal
from eventpulse.errors import (
    AlreadyPurchased,
    EntryNotFound,
    InvalidInput,
    QueueClosed,
    SoldOut,
)
from serve import ratelimit
from serve.hotroutes import EVENT_ID_MAX, USER_ID_MAX
from serve.auth import principal, require_self
from serve.batching import direct
from serve.errors import ErrorEnvelope_responses as ERRORS
from serve.responses import json
from serve.runtime import get_runtime
from serve.schemas import Entry, JoinIn
from serve.sse import EntryEvents, EntryStream

router = APIRouter(tags=["queue"], responses=ERRORS)
User = Annotated[Principal, Depends(principal)]


def shaped(event_id: str, view: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": event_id, **view}


async def my_entry(event_id: str, user_id: str) -> dict[str, Any]:
    rt = get_runtime()
    await rt.catalog.event(event_id)
    view = await rt.entries.read(event_id, user_id)
    if view is None:
        raise EntryNotFound(f"user {user_id} has not joined the line of event {event_id}")
    return shaped(event_id, view)


@router.post("/api/events/{event_id}/queue", response_model=Entry)
async def join(event_id: str, body: JoinIn, p: User):
    """Join the line (idempotent: joining again returns the live entry)."""
    rt = get_runtime()
    event = await rt.catalog.event(event_id)
    if event["state"] == "cancelled":
        raise QueueClosed(f"event {event_id} was cancelled")
    if body.quantity > event["max_per_user"]:
        raise InvalidInput(f"quantity must be between 1 and {event['max_per_user']}")
    if event_id in rt.catalog.sold_out:  # a refusal: no place is given, so none is counted
        await sold_out_refusal(event_id, event, p.user_id, body.ticket_type)
    s = rt.settings
    await ratelimit.hit(rt.redis, p.user_id, "join", s.join_rate_limit, s.join_rate_window_s,
                        rt.rate_batcher)
    try:
        view = await rt.coalescer.call(event_id, "many", (
            "join_many", (p.user_id, body.quantity, body.ticket_type, None)))
    except SoldOut:
        rt.catalog.learn_sold_out(event_id)
        raise
    rt.catalog.availability.invalidate(event_id)
    return json(shaped(event_id, view))


async def sold_out_refusal(event_id: str, event: dict[str, Any], user_id: str,
                           ticket_type: str | None) -> None:
    """The line's answer to a join once it has sold every ticket, without asking it.

    In a flash sale nine in ten joins come after the last ticket sold, and each cost the
    line actor a call. Once the line's `sold` reaches its capacity it stays there (the
    capacity is fixed, a sale is never undone), nobody waits and no offer is held, so a
    join can only be refused, as `WaitingLine._join` refuses it, in its order: a bad user
    or ticket type, then a buyer's `already_purchased` (the ledger's buyers: the line's
    sold counts only purchases the ledger committed first), then `sold_out`.

    It does not count against the user's join rate limit, which bounds how often one user
    takes a place in a line; a refusal gives none. Counting it would make a fan who
    retries a sold-out sale wait out the window before joining another event's line, and
    it would make every refusal wait for a Redis call, when the answer itself needs none.
    """
    rt = get_runtime()
    rt.catalog.sold_out_refusals += 1
    if not 0 < len(user_id) <= MAX_USER_LEN:
        raise InvalidInput(f"user must be a string of 1..{MAX_USER_LEN} characters")
    types = [t["name"] for t in event["ticket_types"]]
    name = types[0] if ticket_type is None else ticket_type
    if name not in types:
        raise InvalidInput(f"unknown ticket type {name!r}")
    if await rt.catalog.has_bought(event_id, user_id, event["total_tickets"]):
        raise AlreadyPurchased("you already bought tickets for this event")
    raise SoldOut(f"{name!r} is sold out")


@router.get("/api/events/{event_id}/queue/me", response_model=Entry)
async def me(event_id: str, p: User):
    """My entry: status, exact position, ETA, offer and its expiry."""
    return json(await my_entry(event_id, p.user_id))


@router.get("/api/queue/position", response_model=Entry)
async def legacy_position(p: User, eventId: Annotated[str, Query(min_length=1,
                                                                 max_length=EVENT_ID_MAX)],
                          userId: Annotated[str, Query(min_length=1, max_length=USER_ID_MAX)]):
    """The earlier product's position route; the same answer as `/queue/me`."""
    require_self(p, userId)
    return json(await my_entry(eventId, userId))


@router.get("/api/events/{event_id}/queue/me/stream",
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-Sent Events; each `data:` is my entry"}})
async def stream(event_id: str, p: User):
    """My entry pushed as Server-Sent Events on every change, with heartbeats.

    A reconnecting client gets the current state first, so no change is missed.
    """
    first = await my_entry(event_id, p.user_id)
    events = EntryEvents(first, lambda v: shaped(event_id, v))
    return EntryStream(get_runtime().hub, event_id, p.user_id, events)


@router.delete("/api/events/{event_id}/queue/me", response_model=Entry)
async def leave(event_id: str, p: User):
    """Leave the line (an offer held is passed on at once)."""
    return await _change_mine(event_id, p.user_id, "leave")


@router.post("/api/events/{event_id}/queue/me/release", response_model=Entry)
async def release(event_id: str, p: User):
    """Decline my offer; its seats go to the next person at once."""
    return await _change_mine(event_id, p.user_id, "release")


async def _change_mine(event_id: str, user_id: str, method: str):
    """One actor call that changes the caller's entry; availability changes with it."""
    rt = get_runtime()
    await rt.catalog.event(event_id)
    view = await direct(event_id, method, user_id)
    rt.catalog.availability.invalidate(event_id)
    return json(shaped(event_id, view))

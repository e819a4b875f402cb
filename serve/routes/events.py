"""Events: create (organizer), list, details, availability.

Redis round trips: create 2; list 2; details 0 on an L1 hit, else 1; availability 0 on
an L1 hit, else 1 (details) + one actor call.
"""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request

from eventpulse import keys, ledger
from eventpulse.auth import Principal
from eventpulse.errors import EventNotFound
from serve import idempotency
from serve.auth import principal, require_organizer
from serve.errors import ErrorEnvelope_responses as ERRORS
from serve.responses import cached_json, etag_of, json
from serve.runtime import get_runtime
from serve.schemas import Availability, EventIn, EventOut, EventPage

router = APIRouter(prefix="/api/events", tags=["events"], responses=ERRORS)
User = Annotated[Principal, Depends(principal)]


def event_doc(body: EventIn, organizer_id: str) -> dict:
    types = body.ticket_types or []
    ticket_types = [t.model_dump() for t in types] or [
        {"name": "general", "price": body.price, "quantity": body.total_tickets}]
    doc = body.model_dump(mode="json", exclude={"ticket_types"})
    doc["ticket_types"] = ticket_types
    doc["organizer_id"] = organizer_id
    doc["sale_opens_at_ts"] = body.sale_opens_at.timestamp() if body.sale_opens_at else None
    return doc


# What a stored event answers with when a field was never written (events seeded
# straight into Redis by tools), so every answer has the documented shape.
_DEFAULTS = {"description": "", "location": "", "max_per_user": 4, "offer_minutes": 30,
             "sale_opens_at": None, "organizer_id": None, "state": "on_sale", "created_at": 0.0}


def public(doc: dict) -> dict:
    return {**_DEFAULTS, **{k: v for k, v in doc.items() if k not in ("sale_opens_at_ts", "queue")}}


@router.post("", status_code=201, response_model=EventOut)
async def create_event(body: EventIn, p: User,
                       idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key",
                                                                     pattern=idempotency.KEY_PATTERN)] = None):
    """Create an event. With an Idempotency-Key, a repeated request creates it once."""
    require_organizer(p)
    r = get_runtime().redis
    doc = event_doc(body, p.user_id)
    if idempotency_key is not None:
        doc["id"], fresh = await idempotency.claim(
            r, keys.event_creation(p.user_id, idempotency_key), body, ledger.new_id())
        if not fresh:  # the first request created it, unless it died before that
            try:
                doc = await ledger.get_event(r, doc["id"])
            except EventNotFound:
                pass
            else:
                return json(public(doc), status=201, headers={"Location": f"/api/events/{doc['id']}"})
    doc = await ledger.create_event(r, doc)
    return json(public(doc), status=201, headers={"Location": f"/api/events/{doc['id']}"})


@router.get("", response_model=EventPage)
async def list_events(p: User, offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20):
    items, total = await ledger.list_events(get_runtime().redis, offset, limit)
    return json({"items": [public(d) for d in items], "total": total, "offset": offset,
                 "limit": limit})


@router.get("/{event_id}", response_model=EventOut)
async def get_event(event_id: str, request: Request, p: User):
    return await event_response(event_id, request.headers.get("if-none-match"))


async def event_response(event_id: str, inm: str | None):
    """Details with an ETag (304 when unchanged); 0 round trips on an L1 hit."""
    doc = await get_runtime().catalog.event(event_id)
    body = orjson.dumps(public(doc))
    return cached_json(inm, body, etag_of(body), "public, max-age=2")


@router.get("/{event_id}/availability", response_model=Availability)
async def availability(event_id: str, p: User):
    avail = await get_runtime().catalog.availability_of(event_id)
    return json(avail, headers={"Cache-Control": "public, max-age=1"})

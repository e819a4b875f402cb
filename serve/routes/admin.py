"""Organizer and admin routes: line stats and steering, cancel, deployment stats."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends

from eventpulse import ledger
from eventpulse.auth import Principal
from eventpulse.errors import Forbidden
from serve.auth import principal, require_organizer
from serve.batching import direct
from serve.errors import ErrorEnvelope_responses as ERRORS
from serve.responses import json
from serve.runtime import get_runtime
from serve.schemas import CancelOut, QueueSettingsIn

router = APIRouter(prefix="/api/admin", tags=["admin"], responses=ERRORS)
User = Annotated[Principal, Depends(principal)]
_replicas: dict = {"at": 0.0, "value": None}


@router.get("/events/{event_id}/queue")
async def queue_stats(event_id: str, p: User) -> dict:
    """Line stats: waiting, live offers, sold, held, outflow, pause state."""
    require_organizer(p, await get_runtime().catalog.event(event_id))
    return json({"event_id": event_id, **await direct(event_id, "stats")})


@router.patch("/events/{event_id}/queue")
async def steer_queue(event_id: str, body: QueueSettingsIn, p: User) -> dict:
    """Pause/resume, offers per minute, max live offers (`unlimited_outflow` clears both)."""
    require_organizer(p, await get_runtime().catalog.event(event_id))
    changes = body.model_dump(exclude_none=True)
    if changes.pop("unlimited_outflow", False):
        changes["offers_per_minute"] = None
        changes["max_live_offers"] = None
    stats = await direct(event_id, "configure", changes)
    await get_runtime().catalog.announce_change(event_id)
    return json({"event_id": event_id, **stats})


@router.post("/events/{event_id}/cancel", response_model=CancelOut)
async def cancel(event_id: str, p: User):
    """Close the line and refund every ticket; idempotent."""
    rt = get_runtime()
    require_organizer(p, await rt.catalog.event(event_id))
    await direct(event_id, "close")
    refunded = await ledger.Ledger(rt.redis).refund_event(event_id)
    await rt.catalog.announce_change(event_id)
    return json({"event_id": event_id, "state": "cancelled", "refunded_tickets": refunded})


@router.get("/stats")
async def deployment_stats(p: User) -> dict:
    """This replica's counters plus the deployment's replica count (for capacity planning)."""
    if not p.is_organizer:
        raise Forbidden("this route needs the organizer or admin role")
    rt = get_runtime()
    if time.monotonic() - _replicas["at"] > 5:
        _replicas["at"] = time.monotonic()
        _replicas["value"] = await asyncio.to_thread(_replica_count)
    return json({**rt.stats(), "replicas": _replicas["value"],
                 "cache_hit_rate": _hit_rate(rt)})


def _hit_rate(rt) -> float | None:
    hits = sum(c.hits for c in (rt.catalog.events, rt.catalog.availability, rt.tickets))
    total = hits + sum(c.misses for c in (rt.catalog.events, rt.catalog.availability, rt.tickets))
    return round(hits / total, 4) if total else None


def _replica_count() -> int | None:
    """Replicas of the deployment (a blocking controller call: run it off the loop)."""
    try:
        from ray import serve
        status = serve.status()
        app = status.applications.get("eventpulse")
        if app is None:
            return None
        return sum(sum(d.replica_states.values()) for d in app.deployments.values())
    except Exception:  # noqa: BLE001 — stats must not fail because the controller is busy
        return None

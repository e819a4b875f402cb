"""Purchases: accepted here, committed by the purchase job (`cluster/purchase_job.py`).

Accepting costs one coalesced actor read (the live offer) and, on one Redis, one script
that claims the Idempotency-Key and records the purchase for the job (a Redis Cluster:
the claim, then the record + stream append in one pipeline). With `?wait=` the answer is
built from the outcome the job publishes, without reading the purchase back.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Annotated, Any

import msgpack
from fastapi import APIRouter, Depends, Header, Query, Request

from eventpulse import keys, ledger, metrics
from eventpulse.auth import Principal
from eventpulse.errors import (AlreadyPurchased, Busy, Forbidden, InvalidInput, NoOffer,
                               NotFound, OfferExpired, PaymentDeclined, SoldOut, Conflict)
from eventpulse.payments import verify_webhook
from eventpulse.redis import RedisClient, script
from serve import idempotency
from serve.auth import principal
from serve.errors import ErrorEnvelope_responses as ERRORS
from serve.errors import error_response
from serve.hotroutes import WAIT_MAX_S
from serve.responses import json
from serve.runtime import get_runtime, valid_id
from serve.schemas import Purchase, PurchaseIn

router = APIRouter(tags=["purchases"], responses=ERRORS)
User = Annotated[Principal, Depends(principal)]

_REASONS = {"already_purchased": AlreadyPurchased, "sold_out": SoldOut, "payment_declined": PaymentDeclined,
            "offer_expired": OfferExpired, "no_offer": NoOffer}


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


async def purchase_view(event_id: str, pid: str, rec: dict[str, str]) -> dict[str, Any]:
    blobs: list[bytes | None] = []
    if rec.get("status") == "committed" and rec.get("tickets"):
        ids = rec["tickets"].split(",")
        blobs = await get_runtime().redis.hmget(keys.event_tickets(event_id), ids)
    return _view(event_id, pid, rec.get("status", "accepted"), int(rec.get("quantity", 0)),
                 rec.get("reason"), blobs)


def _view(event_id: str, pid: str, status: str, quantity: int, reason: str | None,
          blobs: list[bytes | None]) -> dict[str, Any]:
    """A purchase as the API shows it; `blobs` are its tickets' stored records."""
    return {"purchase_id": pid, "event_id": event_id, "status": status, "quantity": quantity,
            "reason": reason or None,
            "tickets": [ledger.unpack_ticket(b, event_id) for b in blobs if b],
            "status_url": f"/api/purchases/{pid}"}


def _outcome_response(view: dict[str, Any]):
    status = view["status"]
    if status == "committed":
        return json(view, status=201)
    if status == "accepted":
        return json(view, status=202, headers={"Location": view["status_url"]})
    err = _REASONS.get(view.get("reason") or "", Conflict)
    return error_response(409, err.code, f"purchase {view['purchase_id']} {status}: "
                                         f"{view.get('reason')}")


@router.post("/api/events/{event_id}/purchases", status_code=202,
             responses={201: {"model": Purchase, "description": "committed (with ?wait=)"},
                        202: {"model": Purchase, "description": "accepted"}})
async def purchase(event_id: str, body: PurchaseIn, p: User,
                   idempotency_key: Annotated[str, Header(alias="Idempotency-Key",
                                                          pattern=idempotency.KEY_PATTERN)],
                   wait: Annotated[float, Query(ge=0, le=WAIT_MAX_S)] = 0):
    """Buy with a live offer. Same key + same body returns the same purchase.

    The idempotency claim carries the whole request for the purchase job, so a claim
    is never a dead end: when the replica that wrote it died before recording the
    purchase, the retry records it (the same purchase id; every write is first-wins
    and the job settles a purchase id once, however often it is delivered).
    """
    rt = get_runtime()
    r = rt.redis
    at = time.perf_counter()
    event = await rt.event(event_id)
    idem_key = keys.idempotency(event_id, f"{p.user_id}:{idempotency_key}")
    view = await rt.entry(event_id, p.user_id, mirrored=False)  # a buyer's offer just changed
    at = _stage("offer", at)
    fut = None  # resolved by the job's published outcome (`?wait=`)
    if view is None or view["status"] != "offered" or view["offer"] is None:
        # a retry after the offer was taken, or no offer at all
        request, fresh = await idempotency.prior(r, idem_key, body), False
        if request is None:
            raise NoOffer("you hold no live offer for this event")
    else:
        if body.quantity > view["offer"]["quantity"]:
            raise InvalidInput(f"your offer holds {view['offer']['quantity']} tickets")
        ttype = view.get("ticket_type") or event["ticket_types"][0]["name"]
        price = next((t["price"] for t in event["ticket_types"] if t["name"] == ttype),
                     event["price"])
        ours = {"pid": ledger.new_id(), "event_id": event_id, "user_id": p.user_id,
                "quantity": body.quantity, "ticket_type": ttype, "unit_price": price,
                "payment_reference": body.payment_reference}
        # listen before the purchase reaches the job, which may settle it at once
        fut = rt.expect_purchase(ours["pid"]) if wait else None
        if rt.settings.redis_cluster:  # the claim and the record live in different slots
            request, fresh = await idempotency.claim(r, idem_key, body, ours)
        else:  # one script claims and, when the claim is ours, records
            request, fresh = await _claim_and_record(r, idem_key, body, ours,
                                                     rt.settings.purchase_partitions)
        if not fresh and fut is not None:  # an earlier request's purchase is in force
            rt.forget_purchase(ours["pid"], fut)
            fut = None
    at = _stage("claim", at)
    if not fresh and await r.exists(keys.purchase(event_id, request["pid"])):
        return await _await_outcome(event_id, request["pid"], wait)
    pid = request["pid"]
    if not fresh:  # a claim whose replica died before recording it: record it now
        fut = rt.expect_purchase(pid) if wait else None
    if not fresh or rt.settings.redis_cluster:  # else the claim's script recorded it
        await _record(r, request, rt.settings.purchase_partitions)
    at = _stage("record", at)
    view = None
    if fut is not None:
        try:
            view = _published_view(await asyncio.wait_for(fut, wait), request)
        except asyncio.TimeoutError:
            pass
        finally:
            rt.forget_purchase(pid, fut)
        at = _stage("job", at)
    answer = _outcome_response(view) if view is not None else await _await_outcome(event_id, pid, 0)
    _stage("answer", at)
    return answer


def _published_view(outcome: dict[str, Any], request: dict[str, Any]) -> dict[str, Any] | None:
    """The purchase's view from the outcome the job published (`purchase_view`'s answer,
    without reading the record back), or None when it does not carry all of it."""
    status = outcome.get("status")
    if status == "committed":
        if not outcome.get("tickets"):
            return None  # settled by an earlier delivery: the record has its tickets
    elif status not in ("rejected", "declined", "failed"):
        return None
    return _view(request["event_id"], request["pid"], status,
                 int(outcome.get("quantity") or request["quantity"]), outcome.get("reason"),
                 outcome.get("tickets") or [])


def _stage(name: str, started: float) -> float:
    """Time one step of accepting a purchase (`eventpulse_purchase_request_stage_seconds`:
    where a buyer waits, beside the job's own `eventpulse_purchase_stage_duration_seconds`)."""
    now = time.perf_counter()
    metrics.aggregate.observe("eventpulse_purchase_request_stage_seconds",
                              (("stage", name),), now - started)
    return now


# Claim the Idempotency-Key and, when ours, hand the purchase to the job and record it, in
# one call (one Redis: the keys live in different slots of a cluster). Under a flash sale
# each round trip cost a buyer 70-120 ms of waiting (`eventpulse_purchase_request_stage_
# seconds`); the writes are `_record`'s, first-wins, the stream entry first.
_CLAIM_AND_RECORD = """
local prior = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'GET', 'EX', ARGV[2])
if prior then return prior end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
redis.call('HSETNX', KEYS[4], 'status', 'accepted')
redis.call('HSETNX', KEYS[4], 'user_id', ARGV[5])
redis.call('HSETNX', KEYS[4], 'quantity', ARGV[6])
return false
"""

async def _claim_and_record(r: RedisClient, key: str, body: PurchaseIn, request: dict[str, Any],
                            partitions: int) -> tuple[dict[str, Any], bool]:
    """`idempotency.claim` of `request`, which when ours is also recorded (`_record`)."""
    event_id, pid, user = request["event_id"], request["pid"], request["user_id"]
    prior = await script(r, _CLAIM_AND_RECORD)(
        keys=[key, _stream_of(user, partitions), keys.purchase_owner(pid),
              keys.purchase(event_id, pid)],
        args=[idempotency.packed(body, request), idempotency.TTL_S, msgpack.packb(request),
              event_id, user, request["quantity"]])
    return (request, True) if prior is None else (idempotency.claimed(prior, body), False)


def _stream_of(user: str, partitions: int) -> str:
    """A user's purchase stream: their requests are settled in order, by one consumer."""
    return keys.purchase_stream(zlib.crc32(user.encode()) % partitions)


async def _record(r: RedisClient, request: dict[str, Any], partitions: int) -> None:
    """Hand an accepted purchase to the job and record it, in one pipeline.

    The stream entry goes first, so a record that exists was handed over. First-wins
    writes: a record the job already settled is never set back to accepted.
    """
    event_id, pid, user = request["event_id"], request["pid"], request["user_id"]
    rec = keys.purchase(event_id, pid)
    pipe = r.pipeline(transaction=False)
    pipe.xadd(_stream_of(user, partitions), {"m": msgpack.packb(request)})
    pipe.set(keys.purchase_owner(pid), event_id)
    pipe.hsetnx(rec, "status", "accepted")
    pipe.hsetnx(rec, "user_id", user)
    pipe.hsetnx(rec, "quantity", request["quantity"])
    await pipe.execute()


async def _await_outcome(event_id: str, pid: str, wait: float):
    rt = get_runtime()
    rec = _decode(await rt.redis.hgetall(keys.purchase(event_id, pid)))
    if wait and rec.get("status", "accepted") == "accepted":
        fut = rt.expect_purchase(pid)
        try:
            rec = _decode(await rt.redis.hgetall(keys.purchase(event_id, pid)))
            if rec.get("status", "accepted") == "accepted":
                await asyncio.wait_for(fut, wait)
                rec = _decode(await rt.redis.hgetall(keys.purchase(event_id, pid)))
        except asyncio.TimeoutError:
            pass
        finally:
            rt.forget_purchase(pid, fut)
    return _outcome_response(await purchase_view(event_id, pid, rec))


@router.get("/api/purchases/{purchase_id}", response_model=Purchase)
async def purchase_status(purchase_id: str, p: User):
    r = get_runtime().redis
    event_id = await r.get(keys.purchase_owner(purchase_id)) if valid_id(purchase_id) else None
    if event_id is None:
        raise NotFound(f"purchase {purchase_id} does not exist")
    event_id = event_id.decode()
    rec = _decode(await r.hgetall(keys.purchase(event_id, purchase_id)))
    if rec.get("user_id") != p.user_id and not p.is_admin:
        raise Forbidden("this purchase is not yours")
    return json(await purchase_view(event_id, purchase_id, rec))


@router.post("/api/payments/webhook", status_code=204, include_in_schema=False)
async def payment_webhook(request: Request,
                          signature: Annotated[str, Header(alias="X-Signature")] = ""):
    """How a real provider plugs in: an HMAC-SHA256-signed notification of a payment."""
    secret = get_runtime().settings.webhook_secret
    if secret is None:
        raise Busy("no payment provider is configured")
    body = await request.body()
    if not signature or not verify_webhook(secret.get_secret_value(), body, signature):
        from eventpulse.errors import Unauthorized
        raise Unauthorized("bad webhook signature")
    from starlette.responses import Response
    return Response(status_code=204)

"""Purchase intake: a buyer's purchase accepted for the purchase job, exactly once.

Accepting costs one coalesced actor read (the live offer) and, on one Redis, one script
that claims the Idempotency-Key and records the purchase for the job (a Redis Cluster:
the claim, then the record and stream append in one pipeline). The claim carries the
whole request, so a claim is never a dead end: when the replica that wrote it died before
recording the purchase, the retry records it (the same purchase id; every write is
first-wins and the job settles a purchase id once, however often it is delivered). With
`wait`, the outcome comes from what the job publishes (`serve/pubsub.py`), without reading
the purchase back.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

import msgpack

from eventpulse import keys, ledger, metrics
from eventpulse.errors import InvalidInput, NoOffer
from eventpulse.redis import RedisClient, script
from serve import idempotency
from serve.runtime import Runtime
from serve.schemas import PurchaseIn


async def purchase(rt: Runtime, event_id: str, user_id: str, body: PurchaseIn, key: str,
                   wait: float) -> dict[str, Any]:
    """Accept `body` as the purchase of `user_id` (the one already accepted under the same
    Idempotency-Key `key` and body, if any), and its view once settled or `wait` is over."""
    r = rt.redis
    at = time.perf_counter()
    event = await rt.catalog.event(event_id)
    idem_key = keys.idempotency(event_id, f"{user_id}:{key}")
    entry = await rt.entries.read(event_id, user_id, mirrored=False)  # a buyer's offer just changed
    at = _stage("offer", at)
    fut = None  # resolved by the job's published outcome (`wait`)
    if entry is None or entry["status"] != "offered" or entry["offer"] is None:
        # a retry after the offer was taken, or no offer at all
        request, fresh = await idempotency.prior(r, idem_key, body), False
        if request is None:
            raise NoOffer("you hold no live offer for this event")
    else:
        ours = _request(event, event_id, user_id, entry, body)
        # listen before the purchase reaches the job, which may settle it at once
        fut = rt.purchases.expect(ours["pid"]) if wait else None
        if rt.settings.redis_cluster:  # the claim and the record live in different slots
            request, fresh = await idempotency.claim(r, idem_key, body, ours)
        else:  # one script claims and, when the claim is ours, records
            request, fresh = await _claim_and_record(r, idem_key, body, ours,
                                                     rt.settings.purchase_partitions)
        if not fresh and fut is not None:  # an earlier request's purchase is in force
            rt.purchases.forget(ours["pid"], fut)
            fut = None
    at = _stage("claim", at)
    pid = request["pid"]
    if not fresh and await r.exists(keys.purchase(event_id, pid)):
        return await outcome(rt, event_id, pid, wait)
    if not fresh:  # a claim whose replica died before recording it: record it now
        fut = rt.purchases.expect(pid) if wait else None
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
            rt.purchases.forget(pid, fut)
        at = _stage("job", at)
    if view is None:
        view = await outcome(rt, event_id, pid, 0)
    _stage("answer", at)
    return view


def _request(event: dict[str, Any], event_id: str, user_id: str, entry: dict[str, Any],
             body: PurchaseIn) -> dict[str, Any]:
    """The purchase the job settles, for the buyer's live offer `entry`."""
    if body.quantity > entry["offer"]["quantity"]:
        raise InvalidInput(f"your offer holds {entry['offer']['quantity']} tickets")
    ttype = entry.get("ticket_type") or event["ticket_types"][0]["name"]
    price = next((t["price"] for t in event["ticket_types"] if t["name"] == ttype),
                 event["price"])
    return {"pid": ledger.new_id(), "event_id": event_id, "user_id": user_id,
            "quantity": body.quantity, "ticket_type": ttype, "unit_price": price,
            "payment_reference": body.payment_reference}


async def outcome(rt: Runtime, event_id: str, pid: str, wait: float) -> dict[str, Any]:
    """The purchase's view as recorded, after waiting up to `wait` for it to settle."""
    rec = _decode(await rt.redis.hgetall(keys.purchase(event_id, pid)))
    if wait and rec.get("status", "accepted") == "accepted":
        fut = rt.purchases.expect(pid)
        try:
            rec = _decode(await rt.redis.hgetall(keys.purchase(event_id, pid)))
            if rec.get("status", "accepted") == "accepted":
                await asyncio.wait_for(fut, wait)
                rec = _decode(await rt.redis.hgetall(keys.purchase(event_id, pid)))
        except asyncio.TimeoutError:
            pass
        finally:
            rt.purchases.forget(pid, fut)
    return await purchase_view(rt, event_id, pid, rec)


async def purchase_view(rt: Runtime, event_id: str, pid: str, rec: dict[str, str]
                        ) -> dict[str, Any]:
    """A recorded purchase as the API shows it, with its tickets once committed."""
    blobs: list[bytes | None] = []
    if rec.get("status") == "committed" and rec.get("tickets"):
        ids = rec["tickets"].split(",")
        blobs = await rt.redis.hmget(keys.event_tickets(event_id), ids)
    return _view(event_id, pid, rec.get("status", "accepted"), int(rec.get("quantity", 0)),
                 rec.get("reason"), blobs)


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _view(event_id: str, pid: str, status: str, quantity: int, reason: str | None,
          blobs: list[bytes | None]) -> dict[str, Any]:
    """A purchase as the API shows it; `blobs` are its tickets' stored records."""
    return {"purchase_id": pid, "event_id": event_id, "status": status, "quantity": quantity,
            "reason": reason or None,
            "tickets": [ledger.unpack_ticket(b, event_id) for b in blobs if b],
            "status_url": f"/api/purchases/{pid}"}


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
# one call (one Redis: the keys live in different slots of a cluster). Each round trip
# saved is one a buyer no longer waits for under a flash sale; the writes are `_record`'s,
# first-wins, the stream entry first.
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


async def status(rt: Runtime, purchase_id: str) -> tuple[str, dict[str, str]] | None:
    """(event, record) of a purchase by its id alone, or None when there is none."""
    event_id = await rt.redis.get(keys.purchase_owner(purchase_id))
    if event_id is None:
        return None
    event = event_id.decode()
    return event, _decode(await rt.redis.hgetall(keys.purchase(event, purchase_id)))

"""The ticket ledger in Redis: events, sold counters, tickets, purchase records.

Every function takes its Redis client (or pipeline) as an argument. The commit is one
Lua script per event batch holding the hard guard `sold + quantity <= capacity`; the
user-side index is a second, idempotent step rebuildable from the event side.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack
import orjson

from eventpulse import keys
from eventpulse.errors import DecodeError, EventNotFound
from eventpulse.redis import RedisClient, RedisCluster

TICKET_FORMAT = 1
TOTAL = "_total"

# Lua's `unpack` is bounded by its stack (~8,000 values): a hash of many fields is written
# 500 field/value pairs per HSET.
_HSET_ALL = """
local function hset_all(key, flat)
  for i = 1, #flat, 1000 do
    redis.call('HSET', key, unpack(flat, i, math.min(i + 999, #flat)))
  end
end
"""

# KEYS: event, sold, capacity, tickets, buyers, purchase records...   ARGV[1]: the items,
# one msgpack array (see `pack_args`) of [user, purchase id, quantity, ticket_type,
# [ticket id, record, ticket id, record…]] per record key.
# Returns per item: {status, reason-or-ticket-ids}. A record already 'committed' is
# returned as it is (exactly-once); a record already settled otherwise keeps its outcome;
# nothing is written for a refused item. `buyers` (user -> purchase id) is the hard guard
# that one user's offer buys once, even when two requests with different keys race.
_COMMIT_LUA = _HSET_ALL + """
local event, sold, capacity, tickets, buyers = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if redis.call('HGET', event, 'state') == 'cancelled' then
  local out = {}
  for i = 6, #KEYS do out[#out + 1] = {'rejected', 'event_cancelled'} end
  return out
end
-- Counters are read once and written once per call, and the event's new tickets and
-- buyers in one HSET each: per purchase the script writes only its own record.
local caps, solds, added, new_buyers, new_tickets = {}, {}, {}, {}, {}
local function num(key, cache, field, default)
  local v = cache[field]
  if v == nil then
    v = tonumber(redis.call('HGET', key, field) or default)
    cache[field] = v
  end
  return v
end
local out = {}
local items = cmsgpack.unpack(ARGV[1])
for i = 1, #items do
  local rec = KEYS[5 + i]
  local user, pid, qty, ttype, tix = unpack(items[i])
  local status = redis.call('HGET', rec, 'status')
  local buyer = new_buyers[user] or redis.call('HGET', buyers, user)
  if status == 'committed' then
    out[#out + 1] = {'duplicate', redis.call('HGET', rec, 'tickets')}
  elseif status == 'rejected' or status == 'declined' or status == 'failed' then
    out[#out + 1] = {'rejected', redis.call('HGET', rec, 'reason') or status}
  elseif buyer and buyer ~= pid then
    redis.call('HSET', rec, 'status', 'rejected', 'reason', 'already_purchased')
    out[#out + 1] = {'rejected', 'already_purchased'}
  else
    local cap_t = num(capacity, caps, ttype, '-1')
    local cap = num(capacity, caps, '_total', '0')
    local sold_t = num(sold, solds, ttype, '0')
    local sold_all = num(sold, solds, '_total', '0')
    if cap_t < 0 or ttype == '_total' then
      out[#out + 1] = {'rejected', 'unknown_ticket_type'}
    elseif sold_t + qty > cap_t or sold_all + qty > cap then
      redis.call('HSET', rec, 'status', 'rejected', 'reason', 'sold_out')
      out[#out + 1] = {'rejected', 'sold_out'}
    else
      solds[ttype] = sold_t + qty
      solds['_total'] = sold_all + qty
      added[ttype] = (added[ttype] or 0) + qty
      added['_total'] = (added['_total'] or 0) + qty
      local ids = {}
      for t = 1, #tix, 2 do
        new_tickets[#new_tickets + 1] = tix[t]
        new_tickets[#new_tickets + 1] = tix[t + 1]
        ids[#ids + 1] = tix[t]
      end
      local joined = table.concat(ids, ',')
      redis.call('HSET', rec, 'status', 'committed', 'tickets', joined)
      new_buyers[user] = pid
      out[#out + 1] = {'committed', joined}
    end
  end
end
for field, qty in pairs(added) do
  redis.call('HINCRBY', sold, field, qty)
end
hset_all(tickets, new_tickets)
local flat = {}
for user, pid in pairs(new_buyers) do
  flat[#flat + 1] = user
  flat[#flat + 1] = pid
end
hset_all(buyers, flat)
return out
"""


# KEYS: purchase records of one event. ARGV: status, reason per record. Records an
# outcome other than a commit, unless the record has committed meanwhile (a duplicate
# delivery racing its twin, or a dead-lettered request that had committed): a committed
# record is never overwritten. Returns per record the status now stored.
_SETTLE_LUA = """
local out = {}
for i = 1, #KEYS do
  local status = redis.call('HGET', KEYS[i], 'status')
  if status == 'committed' then
    out[i] = status
  else
    redis.call('HSET', KEYS[i], 'status', ARGV[2 * i - 1], 'reason', ARGV[2 * i])
    out[i] = ARGV[2 * i - 1]
  end
end
return out
"""


# KEYS: purchase records of one event. Returns per record {status or '', tickets or ''}:
# one command for a whole batch instead of one HMGET per request.
_STATUSES_LUA = """
local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'status', 'tickets')
  out[i] = {v[1] or '', v[2] or ''}
end
return out
"""

# KEYS: per user, their ticket index and its version stamp.  ARGV[1]: one msgpack array
# of [ticket id, record, ticket id, record…] per user. One call writes a whole batch's
# user side (single node only: in a cluster each user is a slot of their own, so there a
# pipeline does the same).
_INDEX_LUA = _HSET_ALL + """
local per_user = cmsgpack.unpack(ARGV[1])
for i = 1, #per_user do
  hset_all(KEYS[2 * i - 1], per_user[i])
  redis.call('INCR', KEYS[2 * i])
end
return #per_user
"""


def pack_args(value: Any) -> bytes:
    """One script argument for many values: Redis's Lua `cmsgpack` reads only the old
    msgpack format (strings and bytes both as raw). One argument instead of thousands
    spares redis-py encoding each, which was half the purchase job's CPU."""
    return msgpack.packb(value, use_bin_type=False)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def pack_ticket(ticket: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": TICKET_FORMAT, **ticket}, use_bin_type=True)


def unpack_ticket(blob: bytes, event_id: str = "?") -> dict[str, Any]:
    try:
        data = msgpack.unpackb(blob, raw=False)
    except Exception as e:
        raise DecodeError(f"ticket record of event {event_id} is not msgpack") from e
    if not isinstance(data, dict) or data.pop("v", None) != TICKET_FORMAT:
        raise DecodeError(f"ticket record of event {event_id} has an unknown format")
    return data


# events -----------------------------------------------------------------------------
async def create_event(r: RedisClient, doc: dict[str, Any]) -> dict[str, Any]:
    """Store a new event (doc must carry ticket_types with quantities); returns it with id."""
    event_id = doc.get("id") or new_id()
    doc = {**doc, "id": event_id, "state": "on_sale", "created_at": time.time()}
    caps = {t["name"]: int(t["quantity"]) for t in doc["ticket_types"]}
    caps[TOTAL] = int(doc["total_tickets"])
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.event(event_id), mapping={"doc": orjson.dumps(doc), "state": "on_sale"})
    pipe.hset(keys.capacity(event_id), mapping=caps)
    await pipe.execute()
    await r.zadd(keys.EVENTS_INDEX, {event_id: doc["created_at"]})
    return doc


async def get_event(r: RedisClient, event_id: str) -> dict[str, Any]:
    """The event document with its current state; EventNotFound if absent."""
    doc, state = await r.hmget(keys.event(event_id), "doc", "state")
    if doc is None:
        raise EventNotFound(f"event {event_id} does not exist")
    data = orjson.loads(doc)
    data["state"] = state.decode() if state else data.get("state", "on_sale")
    return data


async def get_events(r: RedisClient, event_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Several events in one round trip per slot, missing ones left out."""
    pipe = r.pipeline(transaction=False)
    for eid in event_ids:
        pipe.hmget(keys.event(eid), "doc", "state")
    found: dict[str, dict[str, Any]] = {}
    for eid, (doc, state) in zip(event_ids, await pipe.execute()):
        if doc is not None:
            data = orjson.loads(doc)
            data["state"] = state.decode() if state else "on_sale"
            found[eid] = data
    return found


async def list_events(r: RedisClient, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
    total = await r.zcard(keys.EVENTS_INDEX)
    ids = [i.decode() for i in await r.zrevrange(keys.EVENTS_INDEX, offset, offset + limit - 1)]
    found = await get_events(r, ids)
    return [found[i] for i in ids if i in found], total


async def sold_counts(r: RedisClient, event_id: str) -> dict[str, int]:
    raw = await r.hgetall(keys.sold(event_id))
    return {k.decode(): int(v) for k, v in raw.items()}


# purchases --------------------------------------------------------------------------
class Ledger:
    """Thin async wrapper over the Lua commit, bound to one client."""

    def __init__(self, r: RedisClient) -> None:
        self.r = r
        self._commit = r.register_script(_COMMIT_LUA)
        self._settle = r.register_script(_SETTLE_LUA)
        self._statuses = r.register_script(_STATUSES_LUA)
        self._index = r.register_script(_INDEX_LUA)

    async def commit(self, event_id: str, items: list[dict[str, Any]], now: float | None = None,
                     blobs_out: dict[str, tuple[str, bytes]] | None = None
                     ) -> list[tuple[str, list[str] | str]]:
        """Commit purchases of one event in one Lua call.

        Each item: purchase_id, user_id, quantity, ticket_type, unit_price, payment_reference.
        Returns per item ('committed'|'duplicate', ticket ids) or ('rejected', reason).
        The user-side index is written afterwards by `index_tickets`; `blobs_out` collects
        ticket id -> (owner, record) of the tickets offered to the script, so that step
        need not read back what was just written (valid for items that 'committed').
        """
        now = time.time() if now is None else now
        keys_ = [keys.event(event_id), keys.sold(event_id), keys.capacity(event_id),
                 keys.event_tickets(event_id), keys.event_buyers(event_id)]
        batch: list[list[Any]] = []
        for it in items:
            keys_.append(keys.purchase(event_id, it["purchase_id"]))
            qty = int(it["quantity"])
            tix: list[Any] = []
            batch.append([it["user_id"], it["purchase_id"], qty, it["ticket_type"], tix])
            for seat in range(qty):
                tid = f"{it['purchase_id']}-{seat + 1}"
                blob = pack_ticket({
                    "id": tid, "event_id": event_id, "ticket_type": it["ticket_type"],
                    "user_id": it["user_id"], "status": "valid", "amount": it["unit_price"],
                    "payment_reference": it["payment_reference"], "purchase_id": it["purchase_id"],
                    "purchased_at": now})
                tix += [tid, blob]
                if blobs_out is not None:
                    blobs_out[tid] = (it["user_id"], blob)
        raw = await self._commit(keys=keys_, args=[pack_args(batch)])
        out: list[tuple[str, list[str] | str]] = []
        for status, detail in raw:
            status, detail = status.decode(), detail.decode()
            out.append((status, detail.split(",") if status in ("committed", "duplicate") else detail))
        return out

    async def statuses(self, event_id: str, purchase_ids: list[str]
                       ) -> list[tuple[str | None, list[str]]]:
        """(status or None, ticket ids) of many purchase records of one event, one call."""
        if not purchase_ids:
            return []
        raw = await self._statuses(keys=[keys.purchase(event_id, p) for p in purchase_ids])
        return [(s.decode() or None, t.decode().split(",") if t else []) for s, t in raw]

    async def settle(self, event_id: str, outcomes: list[tuple[str, str, str]]) -> list[str]:
        """Record (purchase_id, status, reason) outcomes other than commits, in one call.

        A record that committed is left as it is; returns the status each record now has.
        """
        if not outcomes:
            return []
        args: list[str] = []
        for _, status, reason in outcomes:
            args += [status, reason]
        raw = await self._settle(keys=[keys.purchase(event_id, pid) for pid, _, _ in outcomes],
                                 args=args)
        return [s.decode() for s in raw]

    async def index_tickets(self, event_id: str, ticket_ids: list[str],
                            known: dict[str, tuple[str, bytes]] | None = None) -> set[str]:
        """Copy committed tickets to their owners' index and bump their cache stamps.

        Idempotent (HSET of the same record), so a crash between the commit and this step
        is mended by running it again. Returns the users touched.
        """
        if not ticket_ids:
            return set()
        by_user: dict[str, dict[str, bytes]] = {}
        known = known or {}
        # Tickets this process just committed are known (owner, blob); others are read.
        unknown = [tid for tid in ticket_ids if tid not in known]
        for tid in ticket_ids:
            if tid in known:
                user, blob = known[tid]
                by_user.setdefault(user, {})[tid] = blob
        if unknown:
            blobs = await self.r.hmget(keys.event_tickets(event_id), unknown)
            for tid, blob in zip(unknown, blobs):
                if blob is not None:
                    by_user.setdefault(unpack_ticket(blob, event_id)["user_id"], {})[tid] = blob
        if isinstance(self.r, RedisCluster):
            pipe = self.r.pipeline(transaction=False)
            for user, mapping in by_user.items():
                pipe.hset(keys.user_tickets(user), mapping=mapping)
                pipe.incr(keys.user_tickets_version(user))
            await pipe.execute()
            return set(by_user)
        keys_: list[str] = []
        per_user: list[list[Any]] = []
        for user, mapping in by_user.items():
            keys_ += [keys.user_tickets(user), keys.user_tickets_version(user)]
            per_user.append([x for pair in mapping.items() for x in pair])
        await self._index(keys=keys_, args=[pack_args(per_user)])
        return set(by_user)

    async def refund_event(self, event_id: str) -> int:
        """Mark the event cancelled and every ticket refunded, on both sides. Idempotent."""
        await self.r.hset(keys.event(event_id), "state", "cancelled")
        raw = await self.r.hgetall(keys.event_tickets(event_id))
        changed: dict[str, bytes] = {}
        for tid, blob in raw.items():
            t = unpack_ticket(blob, event_id)
            if t["status"] != "refunded":
                t["status"] = "refunded"
                changed[tid.decode()] = pack_ticket(t)
        if changed:
            await self.r.hset(keys.event_tickets(event_id), mapping=changed)
        await self.index_tickets(event_id, [t.decode() for t in raw])
        return len(changed)


async def user_tickets(r: RedisClient, user_id: str) -> list[dict[str, Any]]:
    raw = await r.hgetall(keys.user_tickets(user_id))
    tickets = [unpack_ticket(b) for b in raw.values()]
    tickets.sort(key=lambda t: (t["purchased_at"], t["id"]))
    return tickets


async def rebuild_user_index(r: RedisClient, event_id: str) -> set[str]:
    """Rewrite the user-side index of one event from its event-side records."""
    raw = await r.hkeys(keys.event_tickets(event_id))
    return await Ledger(r).index_tickets(event_id, [t.decode() for t in raw])

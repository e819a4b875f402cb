"""Per-replica state: the Redis pool, caches, the actor-call coalescer, pub/sub.

Replicas are stateless apart from this; everything here can be rebuilt from Redis and
the actors. One background task listens on Redis pub/sub for event changes (cache
invalidation) and purchase outcomes (to answer `?wait=` requests at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import socket
import time
from collections import OrderedDict
from typing import Any

import msgpack

from eventpulse import keys, ledger, metrics
from eventpulse.errors import EventNotFound
from eventpulse.redis import RedisClient, get_client, pool_stats
from eventpulse.settings import Settings, get_settings
from serve import ratelimit
from serve.hotroutes import EVENT_ID_CHARS, EVENT_ID_MAX
from serve.batching import Coalescer, direct
from serve.cache import TTLCache
from serve.mirror import BEHIND, IDLE_S, MISS, POLL_S, QUIET_S, LineMirror

log = logging.getLogger(__name__)

# A full (generation 2) collection walks every live object. With 4,000 SSE streams a
# replica holds about half a million, and one pass stops its event loop for 0.4–0.9 s;
# there were twelve in a `waiting-crowd` run at 8,000 streams. Ten times fewer full passes
# (the third threshold; Python's default is 10) took a replica's collection time in the
# same run from 2.3–2.9 s to 0.5–0.6 s, the remaining passes falling while the streams
# open (timed against the rounds: none during them). The push delays did not measurably
# move with it: the load generator was what made rounds slow (docs/benchmarks.md).
# Reference counting still frees almost everything at once; only cyclic garbage waits.
GC_THRESHOLDS = (700, 10, 100)
KEPT_BUYER_EVENTS = 8       # sold-out events whose buyers a replica keeps (`has_bought`)
KEPT_BUYERS_MAX = 200_000   # ...each of at most this many tickets (~20 MB of user ids)

_EVENT_ID = re.compile(f"[{EVENT_ID_CHARS}]{{1,{EVENT_ID_MAX}}}")


def valid_id(value: str) -> bool:
    """Whether `value` can be an event's id (`serve.hotroutes`); any other is a 404."""
    return _EVENT_ID.fullmatch(value) is not None


class Runtime:
    def __init__(self, settings: Settings | None = None) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self.settings = settings or get_settings()
        self.events = TTLCache("event", self.settings.event_cache_ttl_s)
        self.missing = TTLCache("event_missing", 1.0)
        self.availability = TTLCache("availability", self.settings.availability_cache_ttl_s)
        self.tickets = TTLCache("tickets", 300.0, max_items=50_000)
        self.coalescer = Coalescer(self.settings.actor_batch_window_ms / 1000)
        # rate-limit counts batched on one Redis; a cluster keeps one call per user slot
        self.rate_batcher = None if self.settings.redis_cluster else Coalescer(
            self.settings.actor_batch_window_ms / 1000, run=ratelimit.batch_runner(lambda: self.redis))
        # single-key reads made together share one MGET (on one Redis, as the counts)
        self.key_reads = None if self.settings.redis_cluster else Coalescer(
            self.settings.actor_batch_window_ms / 1000, run=self._mget)
        # "did these users buy?" for a sold-out event: its buyers, final, read once and
        # kept (`has_bought`); one HMGET a window for an event too large to keep
        self.buyer_reads = Coalescer(self.settings.actor_batch_window_ms / 1000,
                                     run=self._buyers)
        self.buyers: OrderedDict[str, asyncio.Future[frozenset[str]]] = OrderedDict()
        self.purchase_waiters: dict[str, list[asyncio.Future]] = {}
        # Events whose line has sold every ticket (`sold_out_refusal`): for good, as the
        # capacity is fixed and a sale is never undone; learned from the line's availability
        self.sold_out: set[str] = set()
        self._learning: set[str] = set()
        self.sold_out_refusals = 0
        self.mirrors: dict[str, LineMirror] = {}  # per event, while its entries are read
        self.mirror_reads = {"mirror": 0, "actor": 0}
        self._listener: asyncio.Task | None = None
        self.started = time.time()
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # whose counters `stats` are
        self.requests = 0
        self.in_flight = 0
        self.lane_requests = 0  # of `requests`, those the lane served: Serve does not count them
        self.lane_in_flight = 0
        self.sse_open = 0
        metrics.aggregate.on_flush(self._pool_gauges)

    def _pool_gauges(self) -> None:
        stats = pool_stats(get_client(self.settings))
        metrics.get("pool").set(stats["in_use"], tags={"state": "in_use"})
        metrics.get("pool").set(stats["idle"], tags={"state": "idle"})

    @property
    def redis(self) -> RedisClient:
        client = get_client(self.settings)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        return client

    async def _mget(self, _: tuple[str, str], names: list[str]) -> list[bytes | None]:
        return await self.redis.mget(names)

    async def _buyers(self, key: tuple[str, str], users: list[str]) -> list[bool]:
        found = await self.redis.hmget(keys.event_buyers(key[0]), users)
        return [pid is not None for pid in found]

    async def has_bought(self, event_id: str, user_id: str, tickets: int) -> bool:
        """Whether the ledger holds a purchase of `user_id` for the event (its buyers), which
        has sold all its `tickets`: then its buyers are final (a sale is never undone), so
        they are read once (`HSCAN`, not to hold Redis up) and kept for the next refusals,
        for the last `KEPT_BUYER_EVENTS` such events of at most `KEPT_BUYERS_MAX` tickets."""
        if tickets > KEPT_BUYERS_MAX:
            return await self.buyer_reads.call(event_id, "buyers", user_id)
        kept = self.buyers.get(event_id)
        if kept is None:
            kept = self.buyers[event_id] = asyncio.ensure_future(self._all_buyers(event_id))
            while len(self.buyers) > KEPT_BUYER_EVENTS:
                self.buyers.popitem(last=False)
        self.buyers.move_to_end(event_id)
        try:
            buyers = await asyncio.shield(kept)
        except Exception:
            if self.buyers.get(event_id) is kept:  # the next refusal reads them again
                del self.buyers[event_id]
            raise
        return user_id in buyers

    async def _all_buyers(self, event_id: str) -> frozenset[str]:
        return frozenset([user.decode() async for user, _ in self.redis.hscan_iter(
            keys.event_buyers(event_id), count=5000)])

    async def read_key(self, name: str) -> bytes | None:
        """GET `name`: on one Redis a share of one MGET with the reads made meanwhile (a
        user's tickets are read this way on every call, to check they did not change)."""
        if self.key_reads is None:
            return await self.redis.get(name)
        return await self.key_reads.call("mget", "", name)

    # events --------------------------------------------------------------------------
    async def event(self, event_id: str) -> dict[str, Any]:
        """The event document (L1-cached); EventNotFound for unknown or malformed ids."""
        doc = self.events.get(event_id)
        if doc is not None:
            return doc
        if not valid_id(event_id) or self.missing.get(event_id) is not None:
            raise EventNotFound(f"event {event_id} does not exist")
        try:
            doc = await ledger.get_event(self.redis, event_id)
        except EventNotFound:
            self.missing.put(event_id, True)
            raise
        self.events.put(event_id, doc)
        return doc

    async def availability_of(self, event_id: str) -> dict[str, Any]:
        avail = self.availability.get(event_id)
        if avail is None:
            event = await self.event(event_id)
            if event["state"] == "cancelled":
                sold = await ledger.sold_counts(self.redis, event_id)
                total = event["total_tickets"]
                avail = {"total": total, "sold": sold.get("_total", 0), "held": 0,
                         "remaining": 0, "sold_out": False}
            else:
                avail = await direct(event_id, "availability")
                if avail.get("sold_out") and avail["sold"] >= avail["total"]:
                    self.sold_out.add(event_id)
            avail = {"event_id": event_id, **avail}
            self.availability.put(event_id, avail)
        return avail

    def learn_sold_out(self, event_id: str) -> None:
        """After the line refused a join as sold out: read its availability in the
        background (one read at a time per event) to learn whether it sold every ticket."""
        if event_id in self.sold_out or event_id in self._learning:
            return
        self._learning.add(event_id)

        def done(task: asyncio.Task) -> None:
            self._learning.discard(event_id)
            if not task.cancelled() and task.exception() is not None:
                log.debug("availability of %s: %s", event_id, task.exception())

        asyncio.ensure_future(self.availability_of(event_id)).add_done_callback(done)

    async def announce_event_change(self, event_id: str) -> None:
        self.events.invalidate(event_id)
        self.availability.invalidate(event_id)
        await self.redis.publish(keys.EVENT_CHANNEL, event_id)

    # the line ------------------------------------------------------------------------
    async def entry(self, event_id: str, user_id: str, mirrored: bool = True
                    ) -> dict[str, Any] | None:
        """The user's entry in the event's line (None: not in it); reading counts as being seen.

        From this replica's mirror of the line while it holds the entry and has seen every
        journaled fact (`serve.mirror`), else (or not `mirrored`) from the event's actor."""
        if not (mirrored and self.settings.line_mirror):
            return await self.coalescer.call(event_id, "many", ("view_many", user_id))
        mirror = self.mirrors.get(event_id)
        if mirror is None:
            mirror = self.mirrors[event_id] = LineMirror()
            asyncio.get_running_loop().create_task(self._follow(event_id, mirror))
        mirror.read_at = time.monotonic()
        if mirror.fresh() and mirror.holds(user_id):
            durable = int(await self.read_key(keys.line_durable(event_id)) or 0)
            view = mirror.read(user_id, durable)
            if view is BEHIND and await mirror.next_answer():
                view = mirror.read(user_id, durable)
            if view is not MISS and view is not BEHIND:
                mirror.touched.add(user_id)
                self.mirror_reads["mirror"] += 1
                return view
        self.mirror_reads["actor"] += 1
        feed, count, view, lane, slot = await self.coalescer.call(
            event_id, "many", ("read_many", user_id))
        mirror.keep(user_id, feed, count, view, lane, slot)
        return view

    async def _follow(self, event_id: str, mirror: LineMirror) -> None:
        """Keep the event's mirror up to date while its entries are read here."""
        try:
            while mirror.touched or time.monotonic() - mirror.read_at < IDLE_S:
                touched, mirror.touched = list(mirror.touched), set()
                waiting, mirror.waiting = mirror.waiting, []  # this call is after their reads
                try:
                    mirror.update(*await direct(event_id, "changes", mirror.count, touched))
                    ok = True
                except Exception as e:  # noqa: BLE001 — reads go to the actor meanwhile
                    log.debug("event %s: following the line failed: %s", event_id, e)
                    ok = False
                LineMirror.wake(waiting, ok)
                await asyncio.sleep(POLL_S if ok else 0.5)
                if not mirror.waiting:  # nobody waits: ask again when one does, or in a while
                    mirror.wanted.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(mirror.wanted.wait(), QUIET_S - POLL_S)
        finally:
            LineMirror.wake(mirror.waiting, False)
            if self.mirrors.get(event_id) is mirror:
                del self.mirrors[event_id]

    # purchases -----------------------------------------------------------------------
    def expect_purchase(self, purchase_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.purchase_waiters.setdefault(purchase_id, []).append(fut)
        return fut

    def forget_purchase(self, purchase_id: str, fut: asyncio.Future) -> None:
        waiters = self.purchase_waiters.get(purchase_id, [])
        if fut in waiters:
            waiters.remove(fut)
        if not waiters:
            self.purchase_waiters.pop(purchase_id, None)

    async def _listen(self) -> None:
        """Follow pub/sub forever, reconnecting with backoff when Redis goes away."""
        delay = 0.1
        while True:
            try:
                pubsub = get_client(self.settings).pubsub()
                await pubsub.subscribe(keys.EVENT_CHANNEL, keys.PURCHASE_CHANNEL)
                delay = 0.1
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    channel = msg["channel"].decode()
                    if channel == keys.EVENT_CHANNEL:
                        event_id = msg["data"].decode()
                        self.events.invalidate(event_id)
                        self.availability.invalidate(event_id)
                    else:
                        data = msgpack.unpackb(msg["data"], raw=False)
                        # The purchase job publishes one list per event batch.
                        for outcome in data if isinstance(data, list) else [data]:
                            self._purchase_outcome(outcome)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — keep listening after Redis trouble
                log.warning("pub/sub listener: %s; reconnecting", e)
                self.events.clear()
                self.availability.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _purchase_outcome(self, outcome: dict[str, Any]) -> None:
        self.availability.invalidate(outcome.get("event_id"))
        for fut in self.purchase_waiters.pop(outcome.get("purchase_id", ""), []):
            if not fut.done():
                fut.set_result(outcome)

    # operations ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        stats = pool_stats(get_client(self.settings))
        return {
            "replica": self.replica,
            "uptime_s": round(time.time() - self.started, 1),
            "requests": self.requests,
            "in_flight": self.in_flight,
            "lane": {"requests": self.lane_requests, "in_flight": self.lane_in_flight},
            "sold_out": {"refusals": self.sold_out_refusals, "events": sorted(self.sold_out)[:100],
                         "buyers_kept": {e: len(f.result()) for e, f in self.buyers.items()
                                         if f.done() and not f.cancelled()
                                         and f.exception() is None}},
            "sse_open": self.sse_open,
            "redis_pool": stats,
            "actor_calls": {"calls": self.coalescer.calls, "items": self.coalescer.items},
            "entry_reads": dict(self.mirror_reads),
            "cache": {c.kind: c.stats() for c in (self.events, self.availability, self.tickets)},
            "gc": {"thresholds": gc.get_threshold(),
                   "collections": [g["collections"] for g in gc.get_stats()]},
        }


runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global runtime
    if runtime is None:
        runtime = Runtime()
    return runtime

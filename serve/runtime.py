"""Per-replica state: the Redis pool, the actor-call coalescers, the caches, counters.

Replicas are stateless apart from this; everything here can be rebuilt from Redis and
the actors. Its parts: the events' view (`serve/catalog.py`), line entries and their
followers (`serve/entries.py`), the open streams (`serve/sse.py`), and the pub/sub
listener with the purchases waiting on it (`serve/pubsub.py`), which `start` runs.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from typing import Any

from eventpulse import metrics
from eventpulse.redis import RedisClient, get_client, pool_stats
from eventpulse.settings import Settings, get_settings
from serve import ratelimit
from serve.batching import Coalescer
from serve.cache import TTLCache
from serve.catalog import Catalog
from serve.entries import Entries
from serve.pubsub import PurchaseWaiters, listen
from serve.sse import Hub

# A full (generation 2) collection walks every live object: with 4,000 SSE streams a
# replica holds about half a million, and one pass stops its event loop for 0.4-0.9 s.
# Python's default third threshold is 10; 100 makes full passes ten times rarer
# (measured: docs/architecture.md, "Server-Sent Events"). Reference counting still
# frees almost everything at once; only cyclic garbage waits.
GC_THRESHOLDS = (700, 10, 100)


class Runtime:
    def __init__(self, settings: Settings | None = None) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self.settings = s = settings or get_settings()
        window = s.actor_batch_window_ms / 1000
        self.coalescer = Coalescer(window)  # actor calls made together share one call
        # rate-limit counts batched on one Redis; a cluster keeps one call per user slot
        self.rate_batcher = None if s.redis_cluster else Coalescer(
            window, run=ratelimit.batch_runner(lambda: self.redis))
        # single-key reads made together share one MGET (on one Redis, as the counts)
        self.key_reads = None if s.redis_cluster else Coalescer(window, run=self._mget)
        self.tickets = TTLCache("tickets", 300.0, max_items=50_000)
        self.catalog = Catalog(s, lambda: self.redis)
        self.entries = Entries(self.coalescer, self.read_key, s.line_mirror)
        self.hub = Hub(self.entries)  # the replica's open streams
        self.purchases = PurchaseWaiters()
        self._listener: asyncio.Task | None = None
        self.started = time.time()
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # whose counters `stats` are
        self.requests = 0
        self.in_flight = 0
        self.side_requests = 0  # of `requests`, the side server's: Serve does not count them
        self.side_in_flight = 0
        self.sse_open = 0
        metrics.aggregate.on_flush(self._pool_gauges)

    def start(self) -> None:
        """Start following pub/sub (in the replica's event loop)."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                listen(self.settings, self.catalog, self.purchases))

    @property
    def redis(self) -> RedisClient:
        return get_client(self.settings)

    def _pool_gauges(self) -> None:
        stats = pool_stats(get_client(self.settings))
        metrics.get("pool").set(stats["in_use"], tags={"state": "in_use"})
        metrics.get("pool").set(stats["idle"], tags={"state": "idle"})

    async def _mget(self, _: tuple[str, str], names: list[str]) -> list[bytes | None]:
        return await self.redis.mget(names)

    async def read_key(self, name: str) -> bytes | None:
        """GET `name`: on one Redis a share of one MGET with the reads made meanwhile (a
        user's tickets are read this way on every call, to check they did not change)."""
        if self.key_reads is None:
            return await self.redis.get(name)
        return await self.key_reads.call("mget", "", name)

    def stats(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "uptime_s": round(time.time() - self.started, 1),
            "requests": self.requests,
            "in_flight": self.in_flight,
            "side": {"requests": self.side_requests, "in_flight": self.side_in_flight},
            "sold_out": self.catalog.stats(),
            "sse_open": self.sse_open,
            "redis_pool": pool_stats(get_client(self.settings)),
            "actor_calls": {"calls": self.coalescer.calls, "items": self.coalescer.items},
            "entry_reads": dict(self.entries.reads),
            "cache": {c.kind: c.stats() for c in (self.catalog.events,
                                                  self.catalog.availability, self.tickets)},
            "gc": {"thresholds": gc.get_threshold(),
                   "collections": [g["collections"] for g in gc.get_stats()]},
        }


runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global runtime
    if runtime is None:
        runtime = Runtime()
    return runtime

"""A replica's view of the events: their documents, their availability, and which sold out.

Everything here is a cache of Redis and the line actors, rebuilt from them at any time;
the pub/sub listener (`serve/pubsub.py`) invalidates an event's entries when it changes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from eventpulse import keys, ledger
from eventpulse.errors import EventNotFound
from eventpulse.redis import RedisClient
from eventpulse.settings import Settings
from serve.batching import Coalescer, direct
from serve.cache import TTLCache
from serve.hotroutes import EVENT_ID_CHARS, EVENT_ID_MAX

log = logging.getLogger(__name__)

KEPT_BUYER_EVENTS = 8       # sold-out events whose buyers a replica keeps (`has_bought`)
KEPT_BUYERS_MAX = 200_000   # ...each of at most this many tickets (~20 MB of user ids)

_EVENT_ID = re.compile(f"[{EVENT_ID_CHARS}]{{1,{EVENT_ID_MAX}}}")


def valid_id(value: str) -> bool:
    """Whether `value` can be an event's id (`serve.hotroutes`); any other is a 404."""
    return _EVENT_ID.fullmatch(value) is not None


class Catalog:
    def __init__(self, settings: Settings, redis: Callable[[], RedisClient]) -> None:
        self._redis = redis
        self.events = TTLCache("event", settings.event_cache_ttl_s)
        self.missing = TTLCache("event_missing", 1.0)
        self.availability = TTLCache("availability", settings.availability_cache_ttl_s)
        # Events whose line has sold every ticket (`serve.routes.queue.sold_out_refusal`):
        # for good, as the capacity is fixed and a sale is never undone; learned from the
        # line's availability
        self.sold_out: set[str] = set()
        self._learning: set[str] = set()
        self.sold_out_refusals = 0
        # "did these users buy?" for a sold-out event: its buyers, final, read once and
        # kept (`has_bought`); one HMGET a window for an event too large to keep
        self.buyer_reads = Coalescer(settings.actor_batch_window_ms / 1000, run=self._buyers)
        self.buyers: OrderedDict[str, asyncio.Future[frozenset[str]]] = OrderedDict()

    async def event(self, event_id: str) -> dict[str, Any]:
        """The event document (L1-cached); EventNotFound for unknown or malformed ids."""
        doc = self.events.get(event_id)
        if doc is not None:
            return doc
        if not valid_id(event_id) or self.missing.get(event_id) is not None:
            raise EventNotFound(f"event {event_id} does not exist")
        try:
            doc = await ledger.get_event(self._redis(), event_id)
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
                sold = await ledger.sold_counts(self._redis(), event_id)
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

    def changed(self, event_id: str) -> None:
        """Forget what is kept of the event (it changed, here or on another replica)."""
        self.events.invalidate(event_id)
        self.availability.invalidate(event_id)

    async def announce_change(self, event_id: str) -> None:
        """After changing the event: forget it here, and tell every replica to."""
        self.changed(event_id)
        await self._redis().publish(keys.EVENT_CHANNEL, event_id)

    def clear(self) -> None:
        """Forget every event (changes may have been missed while pub/sub was down)."""
        self.events.clear()
        self.availability.clear()

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

    async def _buyers(self, key: tuple[str, str], users: list[str]) -> list[bool]:
        found = await self._redis().hmget(keys.event_buyers(key[0]), users)
        return [pid is not None for pid in found]

    async def _all_buyers(self, event_id: str) -> frozenset[str]:
        return frozenset([user.decode() async for user, _ in self._redis().hscan_iter(
            keys.event_buyers(event_id), count=5000)])

    def stats(self) -> dict[str, Any]:
        return {"refusals": self.sold_out_refusals, "events": sorted(self.sold_out)[:100],
                "buyers_kept": {e: len(f.result()) for e, f in self.buyers.items()
                                if f.done() and not f.cancelled() and f.exception() is None}}

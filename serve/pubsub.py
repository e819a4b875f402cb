"""A replica's one Redis pub/sub subscription: event changes (to forget what it keeps of
them) and purchase outcomes (to answer `?wait=` purchases the moment the job settles them,
without polling)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack

from eventpulse import keys
from eventpulse.redis import get_client
from eventpulse.settings import Settings
from serve.catalog import Catalog

log = logging.getLogger(__name__)


class PurchaseWaiters:
    """Requests waiting for the outcome of a purchase, by purchase id."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future]] = {}

    def expect(self, purchase_id: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(purchase_id, []).append(fut)
        return fut

    def forget(self, purchase_id: str, fut: asyncio.Future) -> None:
        waiters = self._waiting.get(purchase_id, [])
        if fut in waiters:
            waiters.remove(fut)
        if not waiters:
            self._waiting.pop(purchase_id, None)

    def settled(self, outcome: dict[str, Any]) -> None:
        for fut in self._waiting.pop(outcome.get("purchase_id", ""), []):
            if not fut.done():
                fut.set_result(outcome)


async def listen(settings: Settings, catalog: Catalog, waiters: PurchaseWaiters) -> None:
    """Follow pub/sub forever, reconnecting with backoff when Redis goes away."""
    delay = 0.1
    while True:
        try:
            pubsub = get_client(settings).pubsub()
            await pubsub.subscribe(keys.EVENT_CHANNEL, keys.PURCHASE_CHANNEL)
            delay = 0.1
            async for msg in pubsub.listen():
                if msg.get("type") != "message":
                    continue
                if msg["channel"].decode() == keys.EVENT_CHANNEL:
                    catalog.changed(msg["data"].decode())
                    continue
                data = msgpack.unpackb(msg["data"], raw=False)
                # The purchase job publishes one list per event batch.
                for outcome in data if isinstance(data, list) else [data]:
                    catalog.availability.invalidate(outcome.get("event_id"))
                    waiters.settled(outcome)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — keep listening after Redis trouble
            log.warning("pub/sub listener: %s; reconnecting", e)
            catalog.clear()  # changes may have been missed meanwhile
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

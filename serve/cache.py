"""Per-replica caches: L1 in-process with short TTLs, invalidated over Redis pub/sub.

Event details and availability live in L1. User tickets are keyed by the user's
version stamp (bumped on every purchase/refund), so a stale entry can never be served:
a buyer sees a new ticket on the next read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from eventpulse import metrics


class TTLCache:
    """A bounded LRU whose entries expire; counts hits and misses per kind."""

    def __init__(self, kind: str, ttl_s: float, max_items: int = 10_000,
                 layer: str = "l1") -> None:
        self.kind, self.ttl_s, self.max_items, self.layer = kind, ttl_s, max_items, layer
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self.hits = self.misses = 0
        base = (("layer", layer), ("kind", kind))
        self._hit_tags, self._miss_tags = base + (("result", "hit"),), base + (("result", "miss"),)

    def get(self, key: Any) -> Any | None:
        item = self._data.get(key)
        if item is not None and item[0] > time.monotonic():
            self.hits += 1
            metrics.aggregate.count("cache", self._hit_tags)
            return item[1]
        self.misses += 1
        metrics.aggregate.count("cache", self._miss_tags)
        return None

    def put(self, key: Any, value: Any, ttl_s: float | None = None) -> None:
        self._data[key] = (time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s), value)
        self._data.move_to_end(key)
        if len(self._data) > self.max_items:
            self._data.popitem(last=False)

    def invalidate(self, key: Any) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._data)}

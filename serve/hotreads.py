"""Position reads of a busy event, answered from one bulk read every `period_s`.

In the earlier product's load mix every user reads their position every few seconds. Each
read was its own share of a coalesced actor call (`serve/batching.py`), but the calls
still multiplied with the readers: at 1,600 users, ~340 calls a second per replica, and
the event's actor spent nearly all of its CPU in Ray's per-call work (deserializing,
scheduling the call onto its loop, futures across threads: `py-spy`,
`docs/benchmarks.md`) while the reads queued behind one another. `ramp` broke on the
position read's mean there.

So a replica that sees at least `min_readers` distinct readers of one event within
`keep_s` reads all of their entries in one call every `period_s` (reading counts as being
seen, as a single read does) and answers their reads from the latest result while it is
at most `max_age_s` old: under that load a position is exact as of at most `max_age_s`
ago, as an SSE push is (`serve/sse.py`). Below the threshold, or for a reader not in the
latest result, a read goes to the actor as before. A buyer's own check of their offer
(`purchases`) always reads the actor, and a reader's own change through this replica
(leave, release, join) drops their cached entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

MISS = object()  # `get` has no answer: read the actor


class HotReads:
    def __init__(self, fetch: Callable[[str, list[str]], Awaitable[list[Any]]], *,
                 min_readers: int, period_s: float = 0.1, keep_s: float = 3.0,
                 max_age_s: float = 0.25) -> None:
        self.fetch = fetch  # (event, users) -> their entries, each read counting as seen
        self.min_readers, self.period_s = min_readers, period_s
        self.keep_s, self.max_age_s = keep_s, max_age_s
        self._readers: dict[str, dict[str, float]] = {}  # event -> user -> last read
        self._views: dict[str, tuple[float, dict[str, Any]]] = {}  # event -> (read at, views)
        self._tasks: dict[str, asyncio.Task] = {}
        self.hits = 0

    def get(self, event_id: str, user_id: str) -> Any:
        """The user's entry from the latest bulk read, or MISS; notes the reader."""
        now = time.monotonic()
        readers = self._readers.setdefault(event_id, {})
        readers[user_id] = now
        if self.min_readers <= 0:
            return MISS
        if len(readers) >= self.min_readers and event_id not in self._tasks:
            self._tasks[event_id] = asyncio.get_running_loop().create_task(self._refresh(event_id))
        got = self._views.get(event_id)
        if got is None or now - got[0] > self.max_age_s or user_id not in got[1]:
            return MISS
        self.hits += 1
        return got[1][user_id]

    def forget(self, event_id: str, user_id: str) -> None:
        """The user changed their own entry here: their next read goes to the actor."""
        got = self._views.get(event_id)
        if got is not None:
            got[1].pop(user_id, None)

    async def _refresh(self, event_id: str) -> None:
        try:
            while True:
                now = time.monotonic()
                readers = self._readers.get(event_id, {})
                for user in [u for u, at in readers.items() if now - at > self.keep_s]:
                    del readers[user]
                if len(readers) < self.min_readers // 2:  # quiet again: reads go direct
                    return
                users = list(readers)
                try:
                    views = await self.fetch(event_id, users)
                except Exception as e:  # noqa: BLE001 — reads go direct meanwhile
                    log.info("bulk read of %s failed: %s", event_id, e)
                    self._views.pop(event_id, None)
                    await asyncio.sleep(1.0)
                    continue
                self._views[event_id] = (now, dict(zip(users, views)))
                await asyncio.sleep(max(0.0, self.period_s - (time.monotonic() - now)))
        finally:
            self._views.pop(event_id, None)
            self._tasks.pop(event_id, None)

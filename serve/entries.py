"""A replica's reads of line entries: from its mirror of the line when it can, else from
the event's actor (`serve/mirror.py` says when the mirror's answer is exact)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eventpulse import keys
from serve.batching import Coalescer, direct
from serve.mirror import BEHIND, IDLE_S, MISS, POLL_S, QUIET_S, LineMirror

log = logging.getLogger(__name__)


class Entries:
    def __init__(self, coalescer: Coalescer, read_key: Callable[[str], Awaitable[bytes | None]],
                 mirrored: bool) -> None:
        self.coalescer, self._read_key, self.mirrored = coalescer, read_key, mirrored
        self.mirrors: dict[str, LineMirror] = {}  # per event, while its entries are read
        self.reads = {"mirror": 0, "actor": 0}

    async def read(self, event_id: str, user_id: str, mirrored: bool = True
                   ) -> dict[str, Any] | None:
        """The user's entry in the event's line (None: not in it); reading counts as being seen.

        From this replica's mirror of the line while it holds the entry and has seen every
        journaled fact, else (or not `mirrored`) from the event's actor."""
        if not (mirrored and self.mirrored):
            return await self.coalescer.call(event_id, "many", ("view_many", user_id))
        mirror = self.mirrors.get(event_id)
        if mirror is None:
            mirror = self.mirrors[event_id] = LineMirror()
            asyncio.get_running_loop().create_task(self._follow(event_id, mirror))
        mirror.read_at = time.monotonic()
        if mirror.fresh() and mirror.holds(user_id):
            durable = int(await self._read_key(keys.line_durable(event_id)) or 0)
            view = mirror.read(user_id, durable)
            if view is BEHIND and await mirror.next_answer():
                view = mirror.read(user_id, durable)
            if view is not MISS and view is not BEHIND:
                mirror.touched.add(user_id)
                self.reads["mirror"] += 1
                return view
        self.reads["actor"] += 1
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

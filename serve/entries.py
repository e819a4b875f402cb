"""A replica's reads of line entries, and its one follower per line.

Each line read here has one follower in this replica: a task that asks the event's actor
what changed since the fact count it has seen (`EventQueue.changes`) and keeps the
line's mirror (`serve/mirror.py`) up to date. Position reads answer from the mirror
when it is exact, and the SSE hub (`serve/sse.py`) pushes streams' entries after the
follower's answers: both learn from the same small call, and nothing else polls the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from eventpulse import keys
from serve.batching import Coalescer, direct
from serve.mirror import BEHIND, IDLE_S, MISS, POLL_S, QUIET_S, LineMirror

log = logging.getLogger(__name__)

LISTENED_S = 0.15  # the follower asks this often while streams listen: they see a change within it


class Entries:
    def __init__(self, coalescer: Coalescer, read_key: Callable[[str], Awaitable[bytes | None]],
                 mirrored: bool) -> None:
        self.coalescer, self._read_key, self.mirrored = coalescer, read_key, mirrored
        self.mirrors: dict[str, LineMirror] = {}  # per event, while it is read or listened to
        self.reads = {"mirror": 0, "actor": 0}

    def follow(self, event_id: str) -> LineMirror:
        """The event's mirror, with its follower started if it is not running."""
        mirror = self.mirrors.get(event_id)
        if mirror is None:
            mirror = self.mirrors[event_id] = LineMirror()
        if mirror.task is None or mirror.task.done():
            mirror.task = asyncio.get_running_loop().create_task(self._follow(event_id, mirror))
        return mirror

    async def read(self, event_id: str, user_id: str, mirrored: bool = True
                   ) -> dict[str, Any] | None:
        """The user's entry in the event's line (None: not in it); reading counts as being seen.

        From this replica's mirror of the line while it holds the entry and has seen every
        journaled fact, else (or not `mirrored`) from the event's actor."""
        mirror = None
        if self.mirrored:
            mirror = self.follow(event_id)
            mirror.read_at = time.monotonic()
        if mirrored and mirror is not None and mirror.fresh() and mirror.holds(user_id):
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
        if mirror is not None:
            mirror.keep(user_id, feed, count, view, lane, slot)
        return view

    async def read_many(self, event_id: str, users: Sequence[str]
                        ) -> list[dict[str, Any] | None]:
        """Many users' entries in one actor call (the SSE hub's listeners), kept in the
        mirror."""
        read = await direct(event_id, "read_many", list(users))
        mirror = self.mirrors.get(event_id) if self.mirrored else None
        if mirror is not None:
            for user, entry in zip(users, read):
                mirror.keep(user, *entry)
        return [entry[2] for entry in read]

    async def _follow(self, event_id: str, mirror: LineMirror) -> None:
        """Keep the event's mirror up to date while its entries are read or listened to here."""
        try:
            while (mirror.touched or mirror.listeners
                   or time.monotonic() - mirror.read_at < IDLE_S):
                touched, mirror.touched = list(mirror.touched), set()
                waiting, mirror.waiting = mirror.waiting, []  # this call is after their reads
                try:
                    mirror.update(*await direct(event_id, "changes", mirror.count, touched))
                    ok = True
                except Exception as e:  # noqa: BLE001 — reads go to the actor meanwhile
                    log.debug("event %s: following the line failed: %s", event_id, e)
                    ok = False
                # the hub waits for any call's end, this one's too (`next_update`)
                watching, mirror.watching = mirror.watching, []
                LineMirror.wake(waiting + watching, ok)
                await asyncio.sleep(POLL_S if ok else 0.5)
                if not mirror.waiting:  # nobody waits: ask again when one does, or in a while
                    mirror.wanted.clear()
                    pause = (LISTENED_S if mirror.listeners else QUIET_S) - POLL_S
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(mirror.wanted.wait(), pause)
        finally:
            LineMirror.wake(mirror.waiting + mirror.watching, False)
            if self.mirrors.get(event_id) is mirror:
                del self.mirrors[event_id]

"""Server-Sent Events of users' entries, pushed when they change.

One hub per replica (`Runtime.hub`). For each event with open streams, a single task
waits for each answer of the line's follower (`serve/entries.py`, every `LISTENED_S` while
anyone listens) and, when the line moved, new listeners came or `FULL_S` passed, takes
every listener's entry from the line's mirror (`LineMirror.views`: one pass over the
moves for all of them), and from the actor, in one call, only those the mirror cannot
give (a new listener, an entry its own user changed). It pushes only the entries that
changed in a way a waiting person cares about (status, position or offer, or an ETA that
moved by more than `ETA_STEP`), writing them to the connections itself (`Writer`), on
Serve's path (`EntryStream`) and on the side server's alike. So 8,000 open streams cost
the follower's few small calls a second and a read of the entries that changed
themselves, not tens of thousands of reads, and a line that moves all the time does not
send everyone a new ETA at every round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import orjson
from starlette.responses import Response

from eventpulse import metrics
from serve.entries import LISTENED_S, Entries
from serve.mirror import MISS, LineMirror

log = logging.getLogger(__name__)

FULL_S = 2.0  # every entry anew at least this often, even when the line did not move:
#               an ETA follows the line's recent outflow, which moves with the clock
HEARTBEAT_S = 15.0  # keeps proxies from closing idle streams
ETA_STEP = 0.1  # an ETA that moved by less than 10 % is not news
HEARTBEAT = object()  # delivered to each stream about every HEARTBEAT_S: no timer per stream


def worth_pushing(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Whether `new` tells the listener more than `old`, the entry last pushed."""
    if old is None or new is None:
        return old is not new
    for key, value in new.items():
        if key != "eta_seconds" and old.get(key) != value:
            return True
    a, b = old.get("eta_seconds"), new.get("eta_seconds")
    if a is None or b is None:
        return (a is None) != (b is None)
    return abs(b - a) > ETA_STEP * max(a, 1.0)


class Hub:
    """A replica's open streams, by event and user, pushed after the lines' followers."""

    def __init__(self, entries: Entries) -> None:
        self.entries = entries
        self._listeners: dict[str, dict[str, set[Any]]] = {}  # event -> user -> sinks
        self._tasks: dict[str, asyncio.Task] = {}
        self._last: dict[str, dict[str, Any]] = {}  # per event: user -> entry last pushed
        self._fresh: dict[str, set[str]] = {}  # per event: listeners added since the last round
        self.open = 0

    def subscribe(self, event_id: str, user_id: str, sink: Any,
                  first: dict[str, Any] | None = None) -> None:
        """Deliver `user_id`'s entry changes to `sink.deliver(item)` (an entry, None, or
        HEARTBEAT); `first` is the entry the listener was last given."""
        self._listeners.setdefault(event_id, {}).setdefault(user_id, set()).add(sink)
        self._last.setdefault(event_id, {}).setdefault(user_id, first)
        self._fresh.setdefault(event_id, set()).add(user_id)
        self.open += 1
        metrics.get("sse_connections").set(self.open)
        if event_id not in self._tasks or self._tasks[event_id].done():
            self._tasks[event_id] = asyncio.get_running_loop().create_task(self._push(event_id))

    def unsubscribe(self, event_id: str, user_id: str, sink: Any) -> None:
        users = self._listeners.get(event_id, {})
        users.get(user_id, set()).discard(sink)
        if not users.get(user_id):
            users.pop(user_id, None)
        self.open -= 1
        metrics.get("sse_connections").set(self.open)

    async def _push(self, event_id: str) -> None:
        """After each answer of the line's follower that moved the line (or brought new
        listeners, or `FULL_S` after the last round: an ETA follows the clock), every
        listener's entry from the mirror, the ones it cannot give from the actor in one
        call; push what is news. Heartbeats and the listeners' being seen go on while the
        actor does not answer."""
        handled, seen, full_at, touched_at, beat = -1, None, 0.0, 0.0, 1
        mirror = None
        try:
            while self._listeners.get(event_id):
                listeners, last = self._listeners[event_id], self._last.setdefault(event_id, {})
                mirror = self.entries.follow(event_id)  # anew if the follower stopped
                mirror.listeners = len(listeners)
                if mirror.answers == handled or not mirror.fresh():
                    await mirror.next_update(FULL_S)  # the follower's next call, whatever it took
                users = list(listeners)
                now = time.monotonic()
                if now - touched_at >= FULL_S:
                    mirror.touched.update(users)  # a listener is seen, as a reader is
                    touched_at = now
                if mirror.answers != handled and mirror.fresh():
                    handled = mirror.answers
                    fresh = [u for u in self._fresh.pop(event_id, ()) if u in listeners]
                    if (mirror.feed, mirror.count) != seen or fresh or now - full_at >= FULL_S:
                        seen, full_at = (mirror.feed, mirror.count), now
                        try:
                            await self._round(event_id, mirror, users, listeners, last)
                        except Exception as e:  # noqa: BLE001 — the actor restarts: again
                            log.info("sse round of %s failed: %s", event_id, e)
                            seen = None
                # Heartbeats go to one slice of the listeners each round, so every stream
                # gets one about every HEARTBEAT_S and thousands never all come at once.
                slices = max(1, round(HEARTBEAT_S / LISTENED_S))
                for user in users[beat % slices::slices]:
                    for sink in list(listeners.get(user, ())):
                        sink.deliver(HEARTBEAT)
                beat += 1
        finally:
            if self._tasks.get(event_id) is asyncio.current_task():
                del self._tasks[event_id]
            if not self._listeners.get(event_id):  # else the next subscribe starts anew
                if mirror is not None:
                    mirror.listeners = 0
                self._listeners.pop(event_id, None)
                self._last.pop(event_id, None)

    async def _round(self, event_id: str, mirror: LineMirror, users: list[str],
                     listeners: dict[str, set[Any]], last: dict[str, Any]) -> None:
        views = await self._views(event_id, mirror, users)
        for user, view in zip(users, views):
            if worth_pushing(last.get(user), view):
                last[user] = view
                for sink in list(listeners.get(user, ())):
                    sink.deliver(view)
        for gone in set(last) - set(users):
            last.pop(gone, None)

    async def _views(self, event_id: str, mirror: LineMirror, users: list[str]) -> list[Any]:
        """The users' entries now: from the mirror, and those it cannot give (new listeners,
        entries whose own user changed them) from the actor in one call, kept for next time."""
        views = mirror.views(users)
        missed = [i for i, v in enumerate(views) if v is MISS]
        if missed:
            read = await self.entries.read_many(event_id, [users[i] for i in missed])
            if len(read) != len(missed):
                raise RuntimeError(f"read {len(read)} entries of {len(missed)}")
            for i, view in zip(missed, read):
                views[i] = view
        return views

    async def follow(self, event_id: str, user_id: str, events: "EntryEvents", send,
                     gone: Awaitable[Any]) -> None:
        """Write the opening event through `send` (an ASGI send), then push the listener's
        changes through it (`Writer`) until `gone` (the client left) completes."""
        await send({"type": "http.response.body", "body": events.opening(), "more_body": True})
        writer = Writer(events, send)
        self.subscribe(event_id, user_id, writer, events.first)
        try:
            await gone
        finally:
            self.unsubscribe(event_id, user_id, writer)
            await writer.close()


class EntryEvents:
    """One listener's SSE events of its entry: numbered, with repeats of the last entry
    dropped."""

    def __init__(self, first: dict[str, Any] | None, shape) -> None:
        self.first, self.shape, self.seq = first, shape, 0

    def opening(self) -> bytes:
        out = b"retry: 2000\n\n"
        if self.first is not None:
            self.seq += 1
            out += b"id: %d\nevent: entry\ndata: %s\n\n" % (self.seq, orjson.dumps(self.shape(self.first)))
        return out

    def event(self, item: Any) -> bytes | None:
        if item is HEARTBEAT:
            return b": heartbeat\n\n"
        if item is None or item == self.first:
            return None
        self.first = item
        self.seq += 1
        return b"id: %d\nevent: entry\ndata: %s\n\n" % (self.seq, orjson.dumps(self.shape(item)))


class Writer:
    """Writes a listener's events from the hub's own task straight to the connection.

    A write to a client that keeps up completes without suspending, so it is done in
    place: no task per stream to wake, which is what 8,000 streams moving at once spent
    their time on. A write that must wait for a slow client finishes in a task of its
    own; events arriving meanwhile queue behind it (the newest `BACKLOG` of them).
    """

    BACKLOG = 8

    def __init__(self, events: EntryEvents, send) -> None:
        self.events, self.send = events, send
        self._task: asyncio.Task | None = None
        self._backlog: list[bytes] = []
        self.closed = False

    def deliver(self, item: Any) -> None:
        chunk = self.events.event(item)
        if chunk is None or self.closed:
            return
        if self._task is not None:
            self._backlog = (self._backlog + [chunk])[-self.BACKLOG:]
            return
        coro = self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 — the connection is gone; the stream ends
            log.info("sse write failed: %s", e)
            self.closed = True
            return
        self._task = asyncio.ensure_future(self._finish(coro, waiting))

    async def _finish(self, coro, waiting) -> None:
        """Drive a suspended write to its end (as asyncio's Task would), then the backlog."""
        try:
            while True:
                try:
                    await (waiting if waiting is not None else asyncio.sleep(0))
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 — the write itself sees it on resuming
                    pass
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    break
            while self._backlog and not self.closed:
                chunk = self._backlog.pop(0)
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            coro.close()
            raise
        except Exception as e:  # noqa: BLE001 — the connection is gone; the stream ends
            log.info("sse write failed: %s", e)
            self.closed = True
        finally:
            self._task = None

    async def close(self) -> None:
        self.closed = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class EntryStream(Response):
    """A FastAPI route's answer that streams a listener's entry: the hub writes each change
    to the connection itself (`Hub.follow`), until the client goes."""

    def __init__(self, hub: Hub, event_id: str, user_id: str, events: EntryEvents) -> None:
        self.hub, self.event_id, self.user_id, self.events = hub, event_id, user_id, events
        self.status_code, self.background = 200, None
        self.raw_headers = list(SSE_HEADERS)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def until_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        await self.hub.follow(self.event_id, self.user_id, self.events, send, until_gone())

"""Coalescing actor calls: many HTTP requests, one batched actor call per event.

Requests for the same event and method within `actor_batch_window_ms` share one call,
and while one is in flight the next requests wait and go together in the next: under
load batches grow instead of calls multiplying. Why (a call costs ~0.4–1 ms, an item in
a batch ~1.4 µs): `docs/architecture.md`, "Coalesced actor calls".
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import RayError

from actors.directory import call
from actors.event_queue import by_kind
from eventpulse.errors import Busy, EventPulseError

MAX_BATCH = 2000  # a bigger batch starts at once: waiting longer buys nothing


class Coalescer:
    """Batches items per key: `call(a, b, item)` returns the item's own result of one
    `run((a, b), items)` call shared with the other items of that key (by default the
    event `a`'s actor method `b` over the list of items)."""

    def __init__(self, window_s: float, run: Any = None) -> None:
        self.window_s = window_s
        self.run = run or _actor_call
        self._pending: dict[tuple[str, str], list[tuple[Any, asyncio.Future]]] = {}
        self._busy: set[tuple[str, str]] = set()  # a call in flight for (event, method)
        self.calls = 0
        self.items = 0

    async def call(self, event_id: str, method: str, item: Any) -> Any:
        """Queue `item` for `method` on the event's actor; the item's own result or error."""
        key = (event_id, method)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = []
            if key not in self._busy:  # else the call in flight fires it when it returns
                loop.call_later(self.window_s, self._fire, key)
        batch.append((item, fut))
        if len(batch) >= MAX_BATCH and key not in self._busy:
            self._fire(key)
        result = await fut
        if isinstance(result, BaseException):  # the item's own error, or the call's
            raise result
        return result

    def _fire(self, key: tuple[str, str]) -> None:
        if key in self._busy:
            return  # the window ended while a call was in flight: it fires on return
        batch = self._pending.pop(key, None)
        if batch:
            self._busy.add(key)
            asyncio.get_running_loop().create_task(self._run(key, batch))

    async def _run(self, key: tuple[str, str], batch: list[tuple[Any, asyncio.Future]]) -> None:
        self.calls += 1
        self.items += len(batch)
        try:
            results = await self.run(key, [i for i, _ in batch])
        except Exception as e:  # noqa: BLE001 — every item gets the mapped error
            results = [_mapped(e)] * len(batch)
        finally:
            self._busy.discard(key)
            self._fire(key)  # what queued up meanwhile goes at once, in one call
        for (_, fut), res in zip(batch, results):
            if not fut.done():
                fut.set_result(res)


async def _actor_call(key: tuple[str, str], items: list[Any]) -> list[Any]:
    event_id, method = key
    try:
        return await call(event_id, method, items)
    except AttributeError:  # the actor's handle has no such method
        if method != "many":
            raise
    # A line started by an earlier release has no `many`: a detached actor lives on through
    # a deploy, until it leaves idle. Its items go as they went then, a call for each kind.
    async def run(kind: str, arguments: list[Any]) -> list[Any]:
        try:
            return await call(event_id, kind, arguments)
        except Exception as e:  # noqa: BLE001 — the kind's items get the mapped error
            return [_mapped(e)] * len(arguments)

    return await by_kind(items, run)


async def direct(event_id: str, method: str, *args: Any) -> Any:
    """A single (non-coalesced) actor call with the same error mapping."""
    try:
        return await call(event_id, method, *args)
    except Exception as e:  # noqa: BLE001
        raise _mapped(e) from None


def _mapped(e: Exception) -> Exception:
    """The domain error an actor raised, or Busy for Ray trouble (restarts, lost nodes)."""
    if isinstance(e, RayError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, EventPulseError):
            return cause
        return Busy("the event's line is restarting; retry shortly", retry_after=1)
    if isinstance(e, EventPulseError):
        return e
    return e

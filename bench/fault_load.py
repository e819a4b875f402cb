"""Background load for fault tests, and the invariants checked after it.

Workers join the line as fresh users, read their position (`/queue/me`) and buy when
offered, over real HTTP, retrying 503s the way a client would (same Idempotency-Key).
Every answer is counted by kind and status with its time, so a test can report what
users saw during a fault window; `check_invariants` then proves nothing was lost.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from actors.directory import get_queue
from eventpulse import keys, ledger

FINAL = ("committed", "declined", "rejected", "failed")


@dataclass
class Load:
    http: aiohttp.ClientSession
    auth_headers: Any
    event_id: str
    workers: int = 6
    prefix: str = field(default_factory=lambda: "ld-" + uuid.uuid4().hex[:6])
    samples: list[tuple[float, str, int, float]] = field(default_factory=list)  # t, kind, status, s
    failures: list[tuple[float, str, int, str]] = field(default_factory=list)  # t, kind, status, why
    joined: set[str] = field(default_factory=set)  # users whose join got 200
    accepted: dict[str, str] = field(default_factory=dict)  # purchase id -> user (202/201)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _n: int = 0

    async def _call(self, kind: str, method: str, path: str, user: str, **kw) -> tuple[int, Any]:
        started = time.monotonic()
        try:
            async with self.http.request(method, path, headers={**self.auth_headers(user),
                                                                **kw.pop("headers", {})},
                                         timeout=aiohttp.ClientTimeout(total=20), **kw) as r:
                status, raw = r.status, await r.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:  # a proxy's own error page
                body = None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            status, body, raw = 599, None, repr(e).encode()  # refused/reset or timed out
        self.samples.append((started, kind, status, time.monotonic() - started))
        if status >= 500:
            why = body["error"].get("code", "") if isinstance(body, dict) and "error" in body else raw
            self.failures.append((started, kind, status, str(why)[:120]))
        return status, body

    async def _user(self) -> None:
        self._n += 1
        user = f"{self.prefix}-{self._n:05d}"
        base = f"/api/events/{self.event_id}"
        while not self._stop.is_set():
            status, _ = await self._call("join", "POST", base + "/queue", user, json={"quantity": 1})
            if status == 200:
                self.joined.add(user)
                break
            await asyncio.sleep(0.2)
        key = uuid.uuid4().hex
        for _ in range(4):
            if self._stop.is_set():
                return
            status, view = await self._call("me", "GET", base + "/queue/me", user)
            if status == 200 and view["status"] == "offered":
                while not self._stop.is_set():
                    status, body = await self._call(
                        "purchase", "POST", base + "/purchases", user,
                        headers={"Idempotency-Key": key},
                        json={"quantity": 1, "payment_reference": "test_ok_load"})
                    if status in (201, 202):
                        self.accepted[body["purchase_id"]] = user
                    if status < 500:
                        return
                    await asyncio.sleep(0.2)
            await asyncio.sleep(0.05)

    async def _worker(self) -> None:
        while not self._stop.is_set():
            await self._user()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until_ok(self, count: int, since: float = 0.0, timeout: float = 90) -> None:
        """Wait until `count` requests started after `since` succeeded (a slow, shared
        machine makes fixed sleeps unreliable)."""
        deadline = time.monotonic() + timeout
        while sum(1 for s in self.samples if s[0] >= since and s[2] < 500) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"load made no progress: {self.statuses(self.samples)}")
            await asyncio.sleep(0.1)

    # reporting -----------------------------------------------------------------------
    def window(self, start: float, end: float | None = None) -> list[tuple[float, str, int, float]]:
        """Requests in flight at any time in [start, end)."""
        return [s for s in self.samples
                if s[0] + s[3] >= start and (end is None or s[0] < end)]

    @staticmethod
    def max_ms(samples) -> float | None:
        return round(max(s[3] for s in samples) * 1000, 1) if samples else None

    @staticmethod
    def statuses(samples) -> dict[str, int]:
        return dict(sorted(Counter(str(s[2]) for s in samples).items()))

    @staticmethod
    def errors(samples) -> int:
        return sum(1 for s in samples if s[2] >= 500)

    @staticmethod
    def p95_ms(samples) -> float | None:
        lat = sorted(s[3] for s in samples)
        return round(lat[int(0.95 * (len(lat) - 1))] * 1000, 1) if lat else None


async def wait_for_purchases(redis, event_id: str, pids: list[str], timeout: float = 60) -> dict[str, str]:
    """Final status per accepted purchase, waiting for the job; 'missing' or 'accepted' if not."""
    deadline = time.monotonic() + timeout
    while True:
        pipe = redis.pipeline(transaction=False)
        for pid in pids:
            pipe.hget(keys.purchase(event_id, pid), "status")
        found = {pid: (s.decode() if s else "missing") for pid, s in zip(pids, await pipe.execute())}
        if all(s in FINAL for s in found.values()) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def check_invariants(redis, load: Load, capacity: int) -> dict[str, Any]:
    """Nothing acknowledged lost, nothing duplicated, nothing oversold, positions exact."""
    eid = load.event_id
    users = sorted(load.joined)
    # Purchases accepted before the load stopped settle afterwards (the job gathers a
    # batch for `purchase_linger_ms`), and a declined one hands its seats to the next in
    # line: wait for them, then read the entries and the line's counts while it is still.
    outcomes = await wait_for_purchases(redis, eid, list(load.accepted))
    queue = get_queue(eid)
    for _ in range(100):  # until no fact was applied meanwhile (`changes` says the count)
        count = (await queue.changes.remote(-1, []))[1]
        views = [r[2] for r in await queue.read_many.remote(users)]
        stats = await queue.stats.remote()
        if (await queue.changes.remote(-1, []))[1] == count:
            break
        await asyncio.sleep(0.1)
    lost_joins = [u for u, v in zip(users, views) if v is None]
    positions = sorted(v["position"] for v in views if v and v["status"] == "waiting")
    lost_purchases = [pid for pid, s in outcomes.items() if s not in FINAL]
    sold = (await ledger.sold_counts(redis, eid)).get("_total", 0)
    tickets = [ledger.unpack_ticket(b, eid)
               for b in (await redis.hgetall(keys.event_tickets(eid))).values()]
    per_user = Counter(t["user_id"] for t in tickets)
    buyers = {t["purchase_id"]: t["user_id"] for t in tickets}
    committed = {pid for pid, s in outcomes.items() if s == "committed"}
    facts = {
        "joined": len(users), "purchases_accepted": len(load.accepted),
        "committed": len(committed), "sold": sold, "capacity": capacity,
        "lost_joins": lost_joins, "lost_purchases": lost_purchases,
        "duplicated_tickets": [u for u, n in per_user.items() if n > 1],
        "committed_without_tickets": sorted(committed - set(buyers)),
        "positions_exact": positions == list(range(1, len(positions) + 1))
        and len(positions) == stats["waiting"],
    }
    assert not lost_joins, f"acknowledged joins lost: {lost_joins[:5]}"
    if lost_purchases:  # say where they are stuck
        pending = {}
        for part in range(8):
            try:
                pending[part] = await redis.xpending(keys.purchase_stream(part), keys.PURCHASE_GROUP)
            except Exception as e:  # noqa: BLE001
                pending[part] = repr(e)
        dead = {part: await redis.xlen(keys.dead_letter_stream(part)) for part in range(8)}
        raise AssertionError(f"accepted purchases lost: {[(p, outcomes[p]) for p in lost_purchases[:5]]}; "
                             f"pending {pending}; dead letters {dead}")
    assert not facts["duplicated_tickets"], facts["duplicated_tickets"][:5]
    assert not facts["committed_without_tickets"]
    assert sold <= capacity and sold == len(tickets), (sold, capacity, len(tickets))
    assert facts["positions_exact"], (positions[:10], stats["waiting"])
    return facts

"""The line over real HTTP: join, exact positions, offers passing on, SSE pushes."""

from __future__ import annotations

import asyncio
import time

import orjson

from tests.conftest import unique


async def join(http, auth_headers, event_id, user, quantity=1):
    async with http.post(f"/api/events/{event_id}/queue", json={"quantity": quantity},
                         headers=auth_headers(user)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def me(http, auth_headers, event_id, user):
    async with http.get(f"/api/events/{event_id}/queue/me", headers=auth_headers(user)) as r:
        return r.status, await r.json()


async def test_join_is_idempotent_and_positions_are_exact(http, auth_headers, make_event):
    event = await make_event(total_tickets=1)
    users = [unique() for _ in range(4)]
    first = await join(http, auth_headers, event["id"], users[0])
    assert first["status"] == "offered" and first["offer"]["quantity"] == 1
    for u in users[1:]:
        await join(http, auth_headers, event["id"], u)
    again = await join(http, auth_headers, event["id"], users[1])
    assert again["position"] == 1  # joining again returns the live entry, not a new place
    positions = [(await me(http, auth_headers, event["id"], u))[1]["position"] for u in users[1:]]
    assert positions == [1, 2, 3]


async def test_leaving_moves_everyone_behind_up(http, auth_headers, make_event):
    event = await make_event(total_tickets=1)
    holder, a, b, c = (unique() for _ in range(4))
    for u in (holder, a, b, c):
        await join(http, auth_headers, event["id"], u)
    async with http.delete(f"/api/events/{event['id']}/queue/me", headers=auth_headers(a)) as r:
        assert r.status == 200 and (await r.json())["status"] == "left"
    assert (await me(http, auth_headers, event["id"], b))[1]["position"] == 1
    assert (await me(http, auth_headers, event["id"], c))[1]["position"] == 2


async def test_position_reads_see_every_acknowledged_write(http, auth_headers, make_event):
    """Replicas answer reads of entries they read before from their mirror of the line
    (`serve.mirror`); a read after any acknowledged write, on whichever replica, sees it."""
    event = await make_event(total_tickets=1)
    holder, *waiting = (unique() for _ in range(9))
    for u in (holder, *waiting):
        await join(http, auth_headers, event["id"], u)
    for _ in range(3):  # every replica reads (and keeps) the entries; its follower catches up
        for u in waiting:
            await me(http, auth_headers, event["id"], u)
        await asyncio.sleep(0.3)
    for i, leaver in enumerate(waiting[:-1]):
        async with http.delete(f"/api/events/{event['id']}/queue/me",
                               headers=auth_headers(leaver)) as r:
            assert r.status == 200
        for pos, u in enumerate(waiting[i + 1:], start=1):
            status, view = await me(http, auth_headers, event["id"], u)
            assert (status, view["status"], view["position"]) == (200, "waiting", pos)
        await asyncio.sleep(0.1 * (i % 3))  # sometimes right after the write, sometimes later
    seen: dict[str, dict] = {}
    for _ in range(12):
        async with http.get("/api/admin/stats", headers=auth_headers(unique(), "organizer")) as r:
            stats = await r.json()
        seen[stats["replica"]] = stats["entry_reads"]
    assert sum(reads["mirror"] for reads in seen.values()) > 0, seen


async def test_released_offer_passes_to_the_next_at_once(http, auth_headers, make_event):
    event = await make_event(total_tickets=2, max_per_user=2)
    a, b = unique(), unique()
    assert (await join(http, auth_headers, event["id"], a, 2))["status"] == "offered"
    assert (await join(http, auth_headers, event["id"], b, 1))["status"] == "waiting"
    async with http.get(f"/api/events/{event['id']}/availability", headers=auth_headers(a)) as r:
        avail = await r.json()
        assert avail["held"] == 2 and avail["remaining"] == 0
    async with http.post(f"/api/events/{event['id']}/queue/me/release", headers=auth_headers(a)) as r:
        assert r.status == 200 and (await r.json())["status"] == "released"
    status, entry = await me(http, auth_headers, event["id"], b)
    assert entry["status"] == "offered" and entry["offer"]["expires_at"] > time.time()


async def test_quantity_above_the_limit_and_unknown_entries(http, auth_headers, make_event):
    event = await make_event(max_per_user=2)
    u = unique()
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 3},
                         headers=auth_headers(u)) as r:
        assert r.status == 422
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": -1},
                         headers=auth_headers(u)) as r:
        assert r.status == 422
    status, body = await me(http, auth_headers, event["id"], u)
    assert status == 404 and body["error"]["code"] == "entry_not_found"
    async with http.post(f"/api/events/{event['id']}/queue/me/release", headers=auth_headers(u)) as r:
        assert r.status in (404, 409)


async def test_legacy_position_route_answers_like_queue_me(http, auth_headers, make_event):
    event = await make_event(total_tickets=1)
    holder, u = unique(), unique()
    await join(http, auth_headers, event["id"], holder)
    await join(http, auth_headers, event["id"], u)
    _, mine = await me(http, auth_headers, event["id"], u)
    async with http.get(f"/api/queue/position?eventId={event['id']}&userId={u}",
                        headers=auth_headers(u)) as r:
        legacy = await r.json()
    assert legacy["position"] == mine["position"] == 1 and legacy["status"] == mine["status"]
    async with http.get(f"/api/queue/position?eventId={event['id']}&userId={u}",
                        headers=auth_headers(holder)) as r:
        assert r.status == 403


async def test_join_rate_limit_is_429_with_retry_after(http, auth_headers, make_event, redis):
    from eventpulse.settings import get_settings

    event = await make_event()
    u = unique()
    limit = get_settings().join_rate_limit
    # Fill the user's window directly, then the next join is refused.
    from eventpulse import keys
    window = int(time.time() // get_settings().join_rate_window_s)
    await redis.set(keys.rate(u, "join", window), limit, ex=60)
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                         headers=auth_headers(u)) as r:
        assert r.status == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["code"] == "rate_limited"


async def test_concurrent_joins_share_rate_limit_calls_and_each_is_counted(redis, app_env):
    """On one Redis a replica counts the joins of the same moments in one script call
    (`serve/ratelimit.py`); each user still gets their own count, and the one over the
    limit is refused. A Redis Cluster keeps one call per user's slot."""
    from eventpulse import keys
    from eventpulse.errors import RateLimited
    from eventpulse.settings import Settings
    from serve import ratelimit
    from serve.batching import Coalescer
    from serve.runtime import Runtime
    from tests.conftest import CLUSTER

    if CLUSTER:
        assert Runtime(Settings(redis_cluster=True)).rate_batcher is None
        return
    batcher = Coalescer(0.002, run=ratelimit.batch_runner(lambda: redis))
    users = [unique() for _ in range(20)]
    window = int(time.time() // 3600)  # an hour's window: the test never straddles two
    await redis.set(keys.rate(users[0], "test", window), 3, ex=60)  # at its limit already
    results = await asyncio.gather(*(ratelimit.hit(redis, u, "test", 3, 3600, batcher)
                                     for u in users), return_exceptions=True)
    assert isinstance(results[0], RateLimited) and results[0].retry_after >= 1
    assert results[1:] == [None] * 19
    assert batcher.items == 20 and batcher.calls <= 3
    counts = [int(await redis.get(keys.rate(u, "test", window))) for u in users]
    assert counts == [4] + [1] * 19
    assert await redis.ttl(keys.rate(users[1], "test", window)) > 3600  # the window + 5 s


async def read_sse(resp, out: list, stop: asyncio.Event) -> None:
    async for line in resp.content:
        if line.startswith(b"data:"):
            out.append((time.monotonic(), orjson.loads(line[5:])))
        if stop.is_set():
            return


async def test_sse_pushes_a_position_change_within_one_second(http, auth_headers, make_event):
    event = await make_event(total_tickets=1)
    holder, a, b = unique(), unique(), unique()
    for u in (holder, a, b):
        await join(http, auth_headers, event["id"], u)
    received: list = []
    stop = asyncio.Event()
    async with http.get(f"/api/events/{event['id']}/queue/me/stream", headers=auth_headers(b)) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        reader = asyncio.create_task(read_sse(r, received, stop))
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert received and received[0][1]["position"] == 2
        async with http.delete(f"/api/events/{event['id']}/queue/me", headers=auth_headers(a)) as d:
            assert d.status == 200
        changed_at = time.monotonic()
        while time.monotonic() < changed_at + 3 and not any(
                v["position"] == 1 for _, v in received):
            await asyncio.sleep(0.02)
        stop.set()
        reader.cancel()
    pushes = [t for t, v in received if v["position"] == 1]
    assert pushes, f"no push of the new position: {received}"
    assert pushes[0] - changed_at <= 1.0


async def test_sse_stream_needs_a_token_and_accepts_it_as_query_parameter(http, token_for, make_event):
    event = await make_event()
    u = unique()
    async with http.get(f"/api/events/{event['id']}/queue/me/stream") as r:
        assert r.status == 401
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                         headers={"Authorization": f"Bearer {token_for(u)}"}) as r:
        assert r.status == 200
    async with http.get(f"/api/events/{event['id']}/queue/me/stream?access_token={token_for(u)}") as r:
        assert r.status == 200
        line = b""
        async for raw in r.content:
            if raw.startswith(b"data:"):
                line = raw
                break
        assert orjson.loads(line[5:])["user_id"] == u


async def test_coalescer_gives_each_caller_its_own_answer_in_fewer_calls(http, auth_headers,
                                                                        make_event, ray_session):
    """Reads arriving in a steady stream share batched actor calls, and every caller gets
    its own entry back, in its own order."""
    from serve.batching import Coalescer

    event = await make_event(total_tickets=1)
    users = [unique() for _ in range(20)]
    for u in users:
        await join(http, auth_headers, event["id"], u)
    c = Coalescer(0.002)

    async def read(i: int):
        await asyncio.sleep(i * 0.0005)  # a steady stream, not one burst
        return (await c.call(event["id"], "read_many", users[i % len(users)]))[2]

    views = await asyncio.gather(*(read(i) for i in range(400)))
    assert [v["user_id"] for v in views] == [users[i % len(users)] for i in range(400)]
    assert [v["position"] for v in views[1:20]] == list(range(1, 20))
    assert c.items == 400 and c.calls < 200, c.calls


def test_only_news_is_pushed_to_a_stream():
    from serve.sse import worth_pushing

    base = {"status": "waiting", "position": 10, "eta_seconds": 100.0, "offer": None}
    assert not worth_pushing(base, dict(base))
    assert not worth_pushing(base, {**base, "eta_seconds": 105.0})  # ETA moved 5 %
    assert worth_pushing(base, {**base, "eta_seconds": 115.0})
    assert worth_pushing(base, {**base, "eta_seconds": None})
    assert worth_pushing({**base, "eta_seconds": None}, base)
    assert worth_pushing(base, {**base, "position": 9})
    assert worth_pushing(base, {**base, "status": "offered", "offer": {"quantity": 1}})
    assert worth_pushing(None, base) and worth_pushing(base, None)
    assert not worth_pushing(None, None)


def new_hub():
    """A hub of its own, over entries read from the actors (`Runtime.hub` in a replica)."""
    from serve import sse
    from serve.batching import Coalescer
    from serve.entries import Entries

    async def no_key(name: str) -> None:
        return None  # the journal's durable count: none here

    return sse.Hub(Entries(Coalescer(0.002), no_key, True))


async def entry_of(event_id: str, user: str):
    """The user's entry as the actor reads it."""
    from serve.batching import direct

    return (await direct(event_id, "read_many", [user]))[0][2]


async def listen(hub, event_id: str, user: str, first, sink) -> None:
    """Follow `user`'s entry on `hub` as a stream does, each written chunk to `sink`,
    until cancelled (the client going)."""
    from serve import sse

    async def send(message: dict) -> None:
        sink(message["body"])

    await hub.follow(event_id, user, sse.EntryEvents(first, lambda v: v), send,
                     asyncio.get_running_loop().create_future())


async def test_hub_beats_every_stream_and_pushes_a_change(http, auth_headers, make_event,
                                                          ray_session, monkeypatch):
    """One hub task serves every stream of an event: heartbeats without a timer per
    stream, and a change in the line reaches the stream; an unchanged line sends none."""
    from serve import sse

    monkeypatch.setattr(sse, "HEARTBEAT_S", 0.3)
    event = await make_event(total_tickets=1)
    holder, a, b = unique(), unique(), unique()
    for u in (holder, a, b):
        await join(http, auth_headers, event["id"], u)
    hub = new_hub()
    first = await entry_of(event["id"], b)
    chunks: list[tuple[float, bytes]] = []

    def read(chunk: bytes) -> None:
        # one element per SSE event (the opening chunk holds two)
        chunks.extend((time.monotonic(), e + b"\n\n") for e in chunk.split(b"\n\n") if e)

    reader = asyncio.create_task(listen(hub, event["id"], b, first, read))
    try:
        await asyncio.sleep(1.2)
        assert [c for _, c in chunks if c.startswith(b"id:")] and chunks[0][1].startswith(b"retry")
        assert len([c for _, c in chunks if c.startswith(b"id:")]) == 1, chunks  # no news
        assert any(c == b": heartbeat\n\n" for _, c in chunks)
        async with http.delete(f"/api/events/{event['id']}/queue/me", headers=auth_headers(a)) as d:
            assert d.status == 200
        changed_at = time.monotonic()
        while time.monotonic() < changed_at + 2 and len(
                [c for _, c in chunks if c.startswith(b"id:")]) < 2:
            await asyncio.sleep(0.02)
        pushed = [(t, c) for t, c in chunks if c.startswith(b"id: 2")]
        assert pushed and b'"position":1' in pushed[0][1]
        assert pushed[0][0] - changed_at <= 1.0
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert hub.open == 0


async def test_a_join_answers_the_same_on_the_fast_path_and_through_fastapi(http, auth_headers,
                                                                            make_event):
    """Joins take the fast path; a query string sends the same request through FastAPI's
    route (which ignores it), so both answers can be compared, errors included."""
    event = await make_event(total_tickets=1)
    base = f"/api/events/{event['id']}/queue"
    answers = {}
    for via, suffix in (("fast", ""), ("fastapi", "?via=fastapi")):
        seen = []
        for body, headers in (
                ({"quantity": 1}, auth_headers(unique())),          # joins
                ({"quantity": 1}, {}),                               # 401
                ({"quantity": 0}, auth_headers(unique())),          # 422, FastAPI's words
                ({"quantity": 1, "seats": 2}, auth_headers(unique())),  # 422: unknown field
                ({"quantity": 1, "ticket_type": "nope"}, auth_headers(unique()))):  # 4xx
            async with http.post(base + suffix, json=body, headers=headers) as r:
                seen.append((r.status, sorted((await r.json()).get("error", {"ok": 1}))))
        async with http.post(f"/api/events/missing/queue{suffix}", json={"quantity": 1},
                             headers=auth_headers(unique())) as r:
            seen.append((r.status, (await r.json())["error"]["code"]))
        answers[via] = seen
    assert answers["fast"] == answers["fastapi"], answers
    assert [s for s, _ in answers["fast"]][:4] == [200, 401, 422, 422]
    async with http.post(base, json={"quantity": 1}, headers=auth_headers(unique())) as r:
        entry = await r.json()
    assert entry["event_id"] == event["id"] and entry["status"] == "waiting"
    assert entry["position"] >= 1


async def test_a_stream_opened_on_a_stale_read_is_corrected_at_once(http, auth_headers,
                                                                    make_event, ray_session,
                                                                    monkeypatch):
    """A listener whose first entry was read before a change the hub has already seen
    still gets the change: the hub reads new listeners' entries on its next poll (not
    only at its periodic full read, put out of reach here)."""
    from serve import sse

    monkeypatch.setattr(sse, "FULL_S", 60.0)
    event = await make_event(total_tickets=1)
    holder, a, b = unique(), unique(), unique()
    for u in (holder, a, b):
        await join(http, auth_headers, event["id"], u)
    stale = await entry_of(event["id"], b)
    assert stale["position"] == 2
    hub = new_hub()
    got: dict[str, list[bytes]] = {a: [], b: []}

    def read(user, first):
        return listen(hub, event["id"], user, first, got[user].append)

    readers = [asyncio.create_task(read(a, await entry_of(event["id"], a)))]
    try:
        await asyncio.sleep(0.6)  # the hub has read the line
        async with http.delete(f"/api/events/{event['id']}/queue/me", headers=auth_headers(a)) as d:
            assert d.status == 200
        await asyncio.sleep(1.0)  # ... and has seen the change
        readers.append(asyncio.create_task(read(b, stale)))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and not any(b'"position":1' in c for c in got[b]):
            await asyncio.sleep(0.02)
        assert any(b'"position":1' in c for c in got[b]), got[b]
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_the_writer_writes_in_place_and_finishes_a_write_that_must_wait():
    """The streams' writer: a client that keeps up is written to from the hub's own task;
    a write that must wait (a slow client) finishes in a task of its own and later events
    follow it in order."""
    from serve.sse import HEARTBEAT, EntryEvents, Writer

    sent: list[bytes] = []
    gate: asyncio.Future | None = None

    async def send(message):
        if gate is not None and not gate.done():
            await gate
        sent.append(message["body"])

    writer = Writer(EntryEvents(None, lambda v: v), send)
    writer.deliver({"position": 3})
    assert len(sent) == 1 and b'"position":3' in sent[0]  # done in place, no task
    gate = asyncio.get_running_loop().create_future()
    writer.deliver({"position": 2})
    writer.deliver({"position": 2})  # a repeat is dropped
    writer.deliver({"position": 1})
    writer.deliver(HEARTBEAT)
    assert len(sent) == 1
    gate.set_result(None)
    for _ in range(100):
        if len(sent) == 4:
            break
        await asyncio.sleep(0.01)
    assert [orjson.loads(c.split(b"data: ")[1])["position"] for c in sent[:3]] == [3, 2, 1]
    assert [c.split(b"\n")[0] for c in sent[:3]] == [b"id: 1", b"id: 2", b"id: 3"]
    assert sent[3] == b": heartbeat\n\n"
    await writer.close()
    writer.deliver({"position": 0})
    assert len(sent) == 4  # closed: nothing more

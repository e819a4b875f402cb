"""The purchase job's invariants under concurrency, against real Redis and real Ray.

Requests are put on the streams exactly as `POST /api/events/{id}/purchases` puts them
(record 'accepted' + owner + XADD of the same msgpack message). Each test uses its own
partitions (90+), above the session's `purchase_partitions`, so the session consumers
never read them and each test controls its own consumers.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter

import msgpack
import psutil
import pytest
import ray

from actors.directory import get_queue
from cluster.purchase_job import ConsumerActor, PartitionConsumer
from eventpulse import keys, ledger
from eventpulse.settings import get_settings
from tests.conftest import unique

pytestmark = pytest.mark.usefixtures("ray_session")


# helpers ------------------------------------------------------------------------------
async def make_event(r, types: dict[str, int], offer_minutes: float = 30, max_per_user: int = 1
                     ) -> str:
    doc = {"name": "Job Night", "description": "d", "location": "Hall",
           "event_date": "2027-01-01T20:00:00Z", "price": 10.0, "max_per_user": max_per_user,
           "total_tickets": sum(types.values()), "offer_minutes": offer_minutes,
           "ticket_types": [{"name": n, "quantity": q, "price": 10.0} for n, q in types.items()]}
    return (await ledger.create_event(r, doc))["id"]


async def join(event_id: str, users: list[tuple[str, int, str]]) -> list:
    return await get_queue(event_id).join_many.remote([(u, q, t, None) for u, q, t in users])


async def statuses(event_id: str, users: list[str]) -> dict[str, str | None]:
    views = [r[2] for r in await get_queue(event_id).read_many.remote(users)]
    return {u: v and v["status"] for u, v in zip(users, views)}


def request(event_id: str, user: str, quantity: int = 1, ttype: str = "A",
            ref: str = "test_ok_1", pid: str | None = None) -> dict:
    return {"pid": pid or ledger.new_id(), "event_id": event_id, "user_id": user,
            "quantity": quantity, "ticket_type": ttype, "unit_price": 10.0,
            "payment_reference": ref}


async def inject(r, partition: int, reqs: list[dict], raw: list[bytes] = ()) -> None:
    """Append requests as the API does; `raw` entries go on the stream as they are."""
    pipe = r.pipeline(transaction=False)
    for q in reqs:
        pipe.hset(keys.purchase(q["event_id"], q["pid"]), mapping={
            "status": "accepted", "user_id": q["user_id"], "quantity": q["quantity"]})
        pipe.set(keys.purchase_owner(q["pid"]), q["event_id"])
        pipe.xadd(keys.purchase_stream(partition), {"m": msgpack.packb(q)})
    for blob in raw:
        pipe.xadd(keys.purchase_stream(partition), {"m": blob})
    await pipe.execute()


async def records(r, reqs: list[dict]) -> list[dict[str, str]]:
    pipe = r.pipeline(transaction=False)
    for q in reqs:
        pipe.hgetall(keys.purchase(q["event_id"], q["pid"]))
    return [{k.decode(): v.decode() for k, v in rec.items()} for rec in await pipe.execute()]


async def wait_settled(r, reqs: list[dict], timeout: float) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = await records(r, reqs)
        open_ = sum(rec.get("status") == "accepted" for rec in recs)
        if not open_:
            return recs
        assert time.monotonic() < deadline, f"{open_} of {len(reqs)} requests never settled"
        await asyncio.sleep(0.1)


def consumer(partition: int, **overrides) -> PartitionConsumer:
    return PartitionConsumer(partition, get_settings().model_copy(update=overrides))


async def fresh_partition(r, partition: int) -> None:
    await r.delete(keys.purchase_stream(partition), keys.dead_letter_stream(partition),
                   keys.purchase_errors(partition))
    # The group exists before any consumer starts, as it does for a running job; a
    # consumer that starts late then finds it (BUSYGROUP) and reads from the start.
    await r.xgroup_create(keys.purchase_stream(partition), keys.PURCHASE_GROUP, id="0",
                          mkstream=True)


async def check_ledger(r, event_id: str, caps: dict[str, int]) -> dict[str, int]:
    """Sold never exceeds capacity, per type and in total; tickets match the counters."""
    sold = await ledger.sold_counts(r, event_id)
    for t, cap in caps.items():
        assert sold.get(t, 0) <= cap, (t, sold, caps)
    assert sold.get("_total", 0) <= sum(caps.values())
    tickets = [ledger.unpack_ticket(b) for b in (await r.hgetall(keys.event_tickets(event_id))).values()]
    assert len(tickets) == sold.get("_total", 0)
    assert Counter(t["ticket_type"] for t in tickets) == Counter(
        {t: n for t, n in sold.items() if t != "_total" and n})
    return sold


# (a) never more tickets than capacity -------------------------------------------------
async def test_1000_attempts_on_the_last_seats_with_offers_expiring(redis):
    """1,000 waiting users, 5 seats of two types, short offers, declines; 8 consumers."""
    caps = {"A": 3, "B": 2}
    event_id = await make_event(redis, caps, offer_minutes=1.0 / 60)  # 1-second offers
    users = [(f"u{i}-{uuid.uuid4().hex[:6]}", "A" if i % 2 else "B") for i in range(1000)]
    await join(event_id, [(u, 1, t) for u, t in users])
    parts = [90, 91, 92, 93]
    for p in parts:
        await fresh_partition(redis, p)
    consumers = [consumer(p, purchase_batch_size=64) for p in parts for _ in range(2)]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    rng = random.Random(5)
    sent: list[dict] = []
    late_pids: set[str] = set()

    def attempt(u: str, t: str) -> dict:
        ref = "test_decline_card" if rng.random() < 0.3 else "test_ok_1"
        return request(event_id, u, 1, t, ref)

    try:
        # Everyone tries at once, offered or not, spread over the partitions.
        first = [attempt(u, t) for u, t in users]
        await asyncio.gather(*(inject(redis, p, first[i::len(parts)]) for i, p in enumerate(parts)))
        sent += first
        for _ in range(200):  # then whoever holds an offer tries again; some too late
            await wait_settled(redis, sent, 60)
            sold = await check_ledger(redis, event_id, caps)
            if sold.get("_total", 0) == 5:
                break
            now_offered = await statuses(event_id, [u for u, _ in users])
            offered = [(u, t) for u, t in users if now_offered[u] == "offered"]
            late = [x for x in offered if rng.random() < 0.3]
            batch = [attempt(u, t) for u, t in offered if (u, t) not in late]
            await inject(redis, rng.choice(parts), batch)
            if late:  # offers expire while these wait on the stream
                await asyncio.sleep(1.1)
                late_reqs = [attempt(u, t) for u, t in late]
                late_pids.update(q["pid"] for q in late_reqs)
                await inject(redis, rng.choice(parts), late_reqs)
                batch += late_reqs
            sent += batch
            if not batch:
                await asyncio.sleep(0.2)
        recs = await wait_settled(redis, sent, 60)
    finally:
        for c in consumers:
            c.stop()
        await asyncio.gather(*tasks)
    sold = await check_ledger(redis, event_id, caps)
    assert sold == {"A": 3, "B": 2, "_total": 5}
    outcomes = Counter(rec["status"] for rec in recs)
    assert outcomes["committed"] == 5 and outcomes["declined"] > 0
    assert Counter(rec.get("reason") for rec in recs)["no_offer"] > 0
    # Requests arriving after their offer expired never buy (expired by the line's timer,
    # or found expired by the lock: then 'offer_expired').
    late = [rec for q, rec in zip(sent, recs) if q["pid"] in late_pids]
    assert late and all(rec["status"] == "rejected" and rec["reason"] in (
        "no_offer", "offer_expired") for rec in late), late
    buyers = {rec["user_id"] for rec in recs if rec["status"] == "committed"}
    assert len(buyers) == 5
    final = await statuses(event_id, [u for u, _ in users])
    assert sorted(u for u, s in final.items() if s == "purchased") == sorted(buyers)
    assert "purchasing" not in final.values()  # no lock left behind


async def test_the_ledger_guard_holds_1000_concurrent_commits(redis):
    """Even if a line offered too much, the Lua commit never sells past capacity."""
    caps = {"A": 3, "B": 2}
    event_id = await make_event(redis, caps)
    book = ledger.Ledger(redis)
    items = [{"purchase_id": ledger.new_id(), "user_id": unique(), "quantity": 1,
              "ticket_type": "A" if i % 2 else "B", "unit_price": 10.0,
              "payment_reference": "test_ok_1"} for i in range(1000)]
    results = await asyncio.gather(*(book.commit(event_id, [it]) for it in items))
    statuses_ = Counter(res[0][0] for res in results)
    assert statuses_ == {"committed": 5, "rejected": 995}
    assert await check_ledger(redis, event_id, caps) == {"A": 3, "B": 2, "_total": 5}


async def test_one_commit_call_sells_a_batch_exactly_to_capacity(redis):
    """The script counts within a call: a batch larger than what is left sells what is
    left, per type and in total; a user twice in one call buys once; a record already
    committed comes back as a duplicate; the user side is indexed in one call."""
    caps = {"A": 5, "B": 3}
    event_id = await make_event(redis, caps, max_per_user=4)
    book = ledger.Ledger(redis)

    def item(user: str, ttype: str, qty: int = 1) -> dict:
        return {"purchase_id": ledger.new_id(), "user_id": user, "quantity": qty,
                "ticket_type": ttype, "unit_price": 10.0, "payment_reference": "test_ok_1"}

    twice = unique()
    items = [item(unique(), "A", 2), item(twice, "B"), item(twice, "B")]
    items += [item(unique(), "A") for _ in range(6)] + [item(unique(), "B", 2) for _ in range(3)]
    blobs: dict = {}
    results = await book.commit(event_id, items, blobs_out=blobs)
    by_status = Counter(status for status, _ in results)
    assert results[1][0] == "committed"
    assert results[2] == ("rejected", "already_purchased")
    sold = await check_ledger(redis, event_id, caps)
    assert sold == {"A": 5, "B": 3, "_total": 8}
    assert by_status["committed"] == 1 + 1 + 3 + 1  # A×2, B×1, three A×1, one B×2
    assert (await redis.hget(keys.event_buyers(event_id), twice)).decode() == items[1]["purchase_id"]
    again = await book.commit(event_id, [items[0]])
    assert again == [("duplicate", results[0][1])]
    assert await check_ledger(redis, event_id, caps) == sold

    committed = [it for it, (status, _) in zip(items, results) if status == "committed"]
    tids = [t for (status, ids) in results if status == "committed" for t in ids]
    users = await book.index_tickets(event_id, tids, blobs)
    assert users == {it["user_id"] for it in committed}
    for it in committed:
        mine = await ledger.user_tickets(redis, it["user_id"])
        assert [t["purchase_id"] for t in mine] == [it["purchase_id"]] * it["quantity"]
        assert int(await redis.get(keys.user_tickets_version(it["user_id"]))) == 1
    # Again without the known records (a replay after a crash): read back, same result.
    await book.index_tickets(event_id, tids)
    assert int(await redis.get(keys.user_tickets_version(twice))) == 2
    assert len(await ledger.user_tickets(redis, twice)) == 1

# (b) an offer buys at most once; a replay never makes a second ticket -------------------
async def test_an_offer_buys_at_most_once(redis):
    event_id = await make_event(redis, {"A": 10}, max_per_user=2)
    same_batch, across, replayed = unique(), unique(), unique()
    await join(event_id, [(same_batch, 2, "A"), (across, 2, "A"), (replayed, 1, "A")])
    for p in (94, 95):
        await fresh_partition(redis, p)
    # Two keys for one offer in one batch; two keys on two partitions (two consumers
    # racing); one request delivered twice (same purchase id: a retried request).
    twin = [request(event_id, same_batch, 2), request(event_id, same_batch, 2)]
    race = [request(event_id, across, 2), request(event_id, across, 2)]
    again = request(event_id, replayed, 1)
    await inject(redis, 94, twin + [race[0], again, again])
    await inject(redis, 95, [race[1], again])
    consumers = [consumer(94), consumer(94), consumer(95)]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    try:
        recs = await wait_settled(redis, twin + race + [again], 30)
    finally:
        for c in consumers:
            c.stop()
        await asyncio.gather(*tasks)
    assert sorted(rec["status"] for rec in recs[:2]) == ["committed", "rejected"]
    assert sorted(rec["status"] for rec in recs[2:4]) == ["committed", "rejected"]
    assert {rec.get("reason") for rec in recs[:4] if rec["status"] == "rejected"} == {
        "already_purchased"}
    assert recs[4]["status"] == "committed"
    sold = await check_ledger(redis, event_id, {"A": 10})
    assert sold["_total"] == 5  # 2 + 2 + 1: nobody bought twice
    for user, n in ((same_batch, 2), (across, 2), (replayed, 1)):
        assert len(await ledger.user_tickets(redis, user)) == n
    assert set((await statuses(event_id, [same_batch, across, replayed])).values()) == {"purchased"}


# (c) killing the job mid-batch loses nothing and duplicates nothing ---------------------
async def test_killing_the_job_mid_batch_loses_and_duplicates_nothing(redis):
    parts = [96, 97]
    for p in parts:
        await fresh_partition(redis, p)
    events = [await make_event(redis, {"A": 1200}, max_per_user=2) for _ in range(3)]
    reqs = []
    for event_id in events:
        users = [(unique(), 1 + i % 2, "A") for i in range(600)]
        await join(event_id, users)
        reqs += [request(event_id, u, q) for u, q, _ in users]
    random.Random(7).shuffle(reqs)
    for i, p in enumerate(parts):
        await inject(redis, p, reqs[i::len(parts)])
    overrides = {"purchase_batch_size": 100, "purchase_reclaim_idle_ms": 1000}
    first = [ConsumerActor.remote(p, overrides) for p in parts]
    runs = [a.run.remote() for a in first]
    deadline = time.monotonic() + 60
    while True:  # let them get going, then kill them while they work
        done = sum(rec["status"] == "committed" for rec in await records(redis, reqs))
        if done >= len(reqs) // 5:
            break
        assert time.monotonic() < deadline, "the first consumers did not get going"
        await asyncio.sleep(0.02)
    pids = [s["pid"] for s in await asyncio.gather(*(a.stats.remote() for a in first))]
    for a in first:
        ray.kill(a, no_restart=True)
    del runs
    for a, pid in zip(first, pids):  # ray.kill returns at once: a dying consumer may still
        await gone(a, pid)           # acknowledge a batch, until its process has exited
    pending_at_kill = 0
    for p in parts:
        pending_at_kill += (await redis.xpending(keys.purchase_stream(p),
                                                 keys.PURCHASE_GROUP))["pending"]
    assert done < len(reqs), "killed too late to be mid-run"
    second = [ConsumerActor.remote(p, overrides) for p in parts]
    runs = [a.run.remote() for a in second]
    try:
        recs = await wait_settled(redis, reqs, 90)
        # Records can all be committed (by the killed consumers) while their messages
        # still wait to be reclaimed and acknowledged: wait for that too.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(
                [(await redis.xpending(keys.purchase_stream(p), keys.PURCHASE_GROUP))["pending"]
                 for p in parts]):
            await asyncio.sleep(0.2)
        stats = await asyncio.gather(*(a.stats.remote() for a in second))
    finally:
        for a in second:
            ray.kill(a, no_restart=True)
    assert Counter(rec["status"] for rec in recs) == {"committed": len(reqs)}
    assert sum(s["reclaimed"] for s in stats) >= pending_at_kill
    for p in parts:
        assert (await redis.xpending(keys.purchase_stream(p), keys.PURCHASE_GROUP))["pending"] == 0
    for event_id in events:
        mine = [q for q in reqs if q["event_id"] == event_id]
        sold = await check_ledger(redis, event_id, {"A": 1200})
        assert sold["_total"] == sum(q["quantity"] for q in mine)
        assert await redis.hlen(keys.event_buyers(event_id)) == len(mine)
    ticket_ids = [t for rec in recs for t in rec["tickets"].split(",")]
    assert len(ticket_ids) == len(set(ticket_ids)) == sum(q["quantity"] for q in reqs)
    for q in reqs[::25]:  # the user side agrees with the event side
        assert len(await ledger.user_tickets(redis, q["user_id"])) == q["quantity"]


async def gone(actor, pid: int, timeout: float = 30) -> None:
    """Wait until a killed actor's process is really gone, not only its calls failing.

    Ray fails the calls of a killed actor as soon as it is marked dead, which can be before
    its process exits: until then the process may still send Redis an XACK.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            await actor.stats.remote()
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed consumer still answers"
        await asyncio.sleep(0.05)
    while _alive(pid):
        assert time.monotonic() < deadline, "the killed consumer's process is still running"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # what it wrote before it died reaches Redis's loop


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# (d) poison goes to the dead-letter stream; the partition goes on -------------------------
async def test_poison_is_dead_lettered_and_the_partition_goes_on(redis):
    p = 98
    await fresh_partition(redis, p)
    event_id = await make_event(redis, {"A": 10})
    users = [unique() for _ in range(4)]
    await join(event_id, [(u, 1, "A") for u in users])
    good = [request(event_id, users[0]), request(event_id, users[1])]
    # Decodable, but charging it raises every time (no payment reference at all).
    raising = {**request(event_id, users[2]), "payment_reference": None}
    await inject(redis, p, good[:1], raw=[b"\xc1 not msgpack"])
    await inject(redis, p, [raising, good[1]])
    c = consumer(p, purchase_max_attempts=2, purchase_reclaim_idle_ms=200)
    task = asyncio.create_task(c.run())
    try:
        deadline = time.monotonic() + 30
        while await redis.xlen(keys.dead_letter_stream(p)) < 2:
            assert time.monotonic() < deadline, "poison was never dead-lettered"
            await asyncio.sleep(0.1)
        later = request(event_id, users[3])
        await inject(redis, p, [later])  # the partition still moves after the poison
        recs = await wait_settled(redis, good + [later, raising], 15)
    finally:
        c.stop()
        await task
    assert [rec["status"] for rec in recs] == ["committed"] * 3 + ["failed"]
    dead = await redis.xrange(keys.dead_letter_stream(p))
    errors = [fields[b"error"].decode() for _, fields in dead]
    assert errors[0].startswith("undecodable request")
    assert errors[1].startswith("2 attempts failed: AttributeError"), errors
    assert dead[1][1][b"m"] and msgpack.unpackb(dead[1][1][b"m"])["pid"] == raising["pid"]
    assert "AttributeError" in recs[3]["reason"]
    assert (await redis.xpending(keys.purchase_stream(p), keys.PURCHASE_GROUP))["pending"] == 0
    assert not await redis.exists(keys.purchase_errors(p))
    # The poisoned request's offer lock was released, not left purchasing forever.
    assert (await statuses(event_id, [users[2]]))[users[2]] == "offered"
    assert c.stats()["dead_lettered"] == 2


async def test_a_consumer_that_cannot_reach_redis_at_start_keeps_trying(redis):
    """A Redis error while the consumer starts (Redis restarting; a connection lost while
    the client set itself up, seen once on the Redis Cluster) is retried like any other,
    instead of ending the consumer's run."""
    from tests.conftest import free_port

    c = consumer(96, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    assert await c.run(max_seconds=1.5) == 0
    assert time.monotonic() - started >= 1.4  # it kept trying until told to stop


# (e) a trickle of purchases gathers into batches; an idle consumer waits for nothing --------
async def test_a_trickle_gathers_into_one_batch_and_the_first_request_is_not_held(redis):
    """`purchase_linger_ms`: after a batch that was not full the consumer waits before its
    next read, so requests arriving one by one share a batch; an idle consumer still reads
    a request the moment it arrives (XREADGROUP BLOCK)."""
    p = 99
    event_id = await make_event(redis, {"A": 50})
    users = [unique() for _ in range(42)]
    await join(event_id, [(u, 1, "A") for u in users])

    async def trickle(linger_ms: float, reqs: list[dict]) -> tuple[PartitionConsumer, float]:
        await fresh_partition(redis, p)
        c = consumer(p, purchase_linger_ms=linger_ms)
        task = asyncio.create_task(c.run())
        try:
            await asyncio.sleep(0.5)  # blocked on its read: idle
            started = time.monotonic()
            await inject(redis, p, reqs[:1])
            await wait_settled(redis, reqs[:1], 10)
            first = time.monotonic() - started
            for q in reqs[1:]:  # then one every 10 ms
                await inject(redis, p, [q])
                await asyncio.sleep(0.01)
            recs = await wait_settled(redis, reqs, 20)
            assert all(rec["status"] == "committed" for rec in recs), recs
            return c, first
        finally:
            c.stop()
            await asyncio.wait_for(task, 10)

    gathered, first = await trickle(3000, [request(event_id, u) for u in users[:21]])
    assert first < 2.0  # not held for the 3 s linger: read as it arrived
    assert gathered.batches == 2, gathered.stats()  # the first alone, then the other 20
    one_by_one, _ = await trickle(0, [request(event_id, u) for u in users[21:]])
    assert one_by_one.batches >= 8, one_by_one.stats()

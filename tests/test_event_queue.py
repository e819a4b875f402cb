"""The EventQueue actor on real Ray and real Redis: durability, recovery, typed errors."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from actors import store
from actors.line import LineConfig, WaitingLine
from actors.directory import actor_name, forget, get_queue, NAMESPACE
from eventpulse import keys, ledger
from eventpulse.errors import DecodeError, EventNotFound, EventPulseError, InvalidInput
from tests.conftest import unique


async def new_event(redis, total=5, **extra) -> str:
    doc = await ledger.create_event(redis, {
        "name": "actor test", "description": "", "location": "", "event_date": "2027-01-01",
        "price": 1.0, "total_tickets": total, "max_per_user": 4, "organizer_id": "o",
        "ticket_types": [{"name": "general", "price": 1.0, "quantity": total}], **extra})
    return doc["id"]


def entries(views):
    return [(v["user_id"], v["status"], v["position"], v["offer"]) for v in views]


@pytest.fixture
def queue_of(ray_session):
    created = []

    def get(event_id):
        created.append(event_id)
        return get_queue(event_id)

    yield get
    for eid in created:
        try:
            ray.kill(ray.get_actor(actor_name(eid), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
        forget(eid)


async def test_batched_joins_give_exact_positions_and_offers(redis, queue_of):
    eid = await new_event(redis, total=3)
    q = queue_of(eid)
    users = [unique() for _ in range(10)]
    views = await q.join_many.remote([(u, 1, None, None) for u in users])
    assert [v["status"] for v in views] == ["offered"] * 3 + ["waiting"] * 7
    assert [v["position"] for v in views[3:]] == list(range(1, 8))
    stats = await q.stats.remote()
    assert stats["live_offers"] == 3 and stats["waiting"] == 7


async def views(q, users: list[str]) -> list:
    """The users' entries as the actor reads them."""
    return [r[2] for r in await q.read_many.remote(users)]


async def test_one_call_carries_joins_and_reads_each_answered_as_its_own_method(redis, queue_of):
    """`many`: what a replica coalesced for the line, of two kinds, in one actor call."""
    eid = await new_event(redis, total=1)
    q = queue_of(eid)
    first, second = unique(), unique()
    await q.join_many.remote([(first, 1, None, None)])
    answers = await q.many.remote([
        ("read_many", second), ("read_many", first), ("join_many", (second, 1, None, None)),
        ("join_many", (unique(), 99, None, None)), ("read_many", first), ("read_many", unique())])
    read_second, read_first, joined, bad, view_first, nobody = answers
    read_second, view_first, nobody = read_second[2], view_first[2], nobody[2]
    assert joined["user_id"] == second and joined["status"] == "waiting"
    assert joined["position"] == 1
    # the joins go first: a read in the same call sees them
    assert (read_second["status"], read_second["position"]) == ("waiting", 1)
    assert isinstance(bad, InvalidInput)  # an item's own error, the others answered
    assert view_first["status"] == "offered" and nobody is None
    _feed, count, view, _lane, slot = read_first
    assert view["user_id"] == first and view["status"] == "offered"
    assert count > 0 and slot >= 0
    with pytest.raises(Exception, match="many takes only"):
        await q.many.remote([("leave", first)])


async def test_a_line_started_by_an_earlier_release_takes_the_coalesced_items_kind_by_kind(
        redis, queue_of):
    """A detached line actor outlives a deploy: one started before `many` existed gets a
    replica's coalesced items as a call for each kind (`serve.batching`)."""
    from actors.directory import _options
    from actors.event_queue import EventQueue
    from serve.batching import Coalescer

    class Earlier(EventQueue):  # an earlier release's line: no `many`
        many = None

    eid = await new_event(redis, total=1)
    ray.remote(Earlier).options(**_options(eid)).remote(eid)
    assert not hasattr(queue_of(eid), "many")  # the handle of the line that runs
    c = Coalescer(0.002)
    user = unique()
    joined, bad, view = await asyncio.gather(
        c.call(eid, "many", ("join_many", (user, 1, None, None))),
        c.call(eid, "many", ("join_many", (unique(), 99, None, None))),
        c.call(eid, "many", ("read_many", user)), return_exceptions=True)
    assert joined["status"] == "offered" and view[2]["status"] == "offered"
    assert isinstance(bad, InvalidInput)
    assert c.calls == 1


async def test_bad_arguments_raise_typed_errors(redis, queue_of):
    eid = await new_event(redis)
    q = queue_of(eid)
    results = await q.join_many.remote([(unique(), -1, None, None), (unique(), 99, None, None),
                                        (unique(), 1, "no-such-type", None), (unique(), 1, None, None)])
    assert isinstance(results[0], InvalidInput) and results[0].status == 422
    assert isinstance(results[1], InvalidInput)
    assert isinstance(results[2], InvalidInput)
    assert results[3]["status"] == "offered"
    with pytest.raises(EventNotFound):
        await queue_of("missing" + unique()).ping.remote()


async def test_killed_actor_recovers_every_acknowledged_join_in_order(redis, queue_of):
    eid = await new_event(redis, total=20)
    q = queue_of(eid)
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def writer():
        n = 0
        while not stop.is_set():
            batch = [f"k{n + i:06d}" for i in range(50)]
            n += 50
            try:
                views = await q.join_many.remote([(u, 1, None, None) for u in batch])
            except ray.exceptions.RayError:
                continue  # not acknowledged: may or may not be there
            acknowledged.extend(v["user_id"] for v in views if not isinstance(v, EventPulseError))

    task = asyncio.create_task(writer())
    deadline = time.monotonic() + 30
    while len(acknowledged) < 500 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    before = await views(q, list(acknowledged))
    ray.kill(q, no_restart=False)
    await asyncio.sleep(1.0)
    stop.set()
    await task
    before_users = [v["user_id"] for v in before]
    after = await views(q, before_users)
    assert len(before_users) > 100
    assert all(v is not None for v in after), "an acknowledged join was lost"
    # Offers (and their absolute expiries) survived; waiting order is the join order.
    assert [v["offer"] for v in after] == [v["offer"] for v in before]
    waiting = [v for v in await views(q, acknowledged) if v["status"] == "waiting"]
    positions = [v["position"] for v in waiting]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert [v["user_id"] for v in waiting] == sorted(v["user_id"] for v in waiting)


async def test_snapshot_taken_during_writes_is_consistent(redis, queue_of):
    eid = await new_event(redis, total=10)
    q = queue_of(eid)
    users = [f"s{i:05d}" for i in range(3000)]
    writes = [q.join_many.remote([(u, 1, None, None) for u in users[i:i + 100]])
              for i in range(0, 3000, 100)]
    snap = q.snapshot_now.remote()
    await asyncio.gather(*writes, snap)
    expected = await views(q, users)
    loaded = await store.load(redis, eid)
    assert loaded.line_state is not None
    assert await redis.llen(keys.journal(eid)) < 30  # the snapshot trimmed what it covers
    ray.kill(q, no_restart=False)
    await asyncio.sleep(0.5)
    assert await views(q, users) == expected


async def test_corrupt_journal_fails_closed_naming_the_event(redis, queue_of):
    eid = await new_event(redis)
    await redis.rpush(keys.journal(eid), b"\xc1\xffnot msgpack")
    with pytest.raises(DecodeError, match=eid):
        await queue_of(eid).ping.remote()


async def test_corrupt_snapshot_fails_closed_naming_the_event(redis, queue_of):
    eid = await new_event(redis)
    good = store.encode_snapshot(0, WaitingLine(LineConfig(capacity={"general": 5})).to_snapshot())
    await redis.set(keys.snapshot(eid), good[:-7] + b"\xc1" * 7)  # a torn write
    with pytest.raises(DecodeError, match=eid):
        await queue_of(eid).ping.remote()


async def test_offer_expiry_is_driven_by_the_actor_timer(redis, queue_of):
    eid = await new_event(redis, total=1, offer_minutes=0.02)  # 1.2 s offers
    q = queue_of(eid)
    a, b = unique(), unique()
    await q.join_many.remote([(a, 1, None, None), (b, 1, None, None)])
    deadline = time.time() + 5
    while time.time() < deadline:
        va, vb = await views(q, [a, b])
        if vb["status"] == "offered":
            break
        await asyncio.sleep(0.1)
    assert va["status"] == "expired" and vb["status"] == "offered"


async def test_the_fact_count_moves_with_the_line_and_reads_say_it(redis, queue_of):
    """What the followers and the hub go by: `changes` says the fact count, a read leaves
    it as it was, a change moves it, and `read_many` says the count its views are exact at."""
    eid = await new_event(redis, total=1)
    q = queue_of(eid)
    users = [unique() for _ in range(4)]
    await q.join_many.remote([(u, 1, None, None) for u in users])
    read = await q.read_many.remote(users[1:])
    count = read[0][1]
    assert [r[2]["position"] for r in read] == [1, 2, 3]
    _feed, now, _rate, since = await q.changes.remote(count, [])
    assert (now, since) == (count, [])
    await views(q, users)  # reading changes nothing
    assert (await q.changes.remote(count, []))[1] == count
    await q.leave.remote(users[1])
    read = await q.read_many.remote(users[1:])
    newer = read[0][1]
    assert newer > count and (await q.changes.remote(count, []))[1] == newer
    assert [r[2] and r[2]["position"] for r in read] == [None, 1, 2]
    assert (await q.changes.remote(count, []))[3], "the leave is among the changes since"


async def test_an_idle_line_leaves_and_the_next_call_brings_it_back(redis, queue_of, monkeypatch):
    """An event's actor with nothing due in its line and no call for `line_idle_exit_s`
    ends for good (an idle actor still costs Ray's per-process work); the next call goes
    to a new actor under the same name, which has the line back from Redis."""
    from actors import directory

    eid = await new_event(redis, total=5)
    monkeypatch.setenv("EVENTPULSE_LINE_IDLE_EXIT_S", "1")
    q = queue_of(eid)  # created with the short limit in its environment
    monkeypatch.delenv("EVENTPULSE_LINE_IDLE_EXIT_S")
    users = [unique() for _ in range(3)]
    views = await q.join_many.remote([(u, 1, None, None) for u in users])
    assert [v["status"] for v in views] == ["offered"] * 3  # offers expire later: due
    for u in users[:2]:
        await q.leave.remote(u)
    first = await q.incarnation.remote()
    await asyncio.sleep(8)
    assert ray.get_actor(actor_name(eid), namespace=NAMESPACE)  # an offer is still due
    await q.leave.remote(users[2])  # now nothing is due at any time
    for _ in range(60):
        try:
            ray.get_actor(actor_name(eid), namespace=NAMESPACE)
        except ValueError:
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError("the idle actor did not leave")
    views = await directory.call(eid, "read_many", users)
    assert [v[2]["status"] for v in views] == ["left"] * 3
    stats = await directory.call(eid, "stats")
    assert stats["live_offers"] == 0 and stats["waiting"] == 0
    assert await directory.call(eid, "incarnation") != first  # a new actor, the same name


"""The ledger, the journal/snapshot store and rate limits on a real 3-master Redis Cluster.

Selected by configuration (`Settings(redis_cluster=True)`); every Lua script, transaction
and multi-key command must stay inside one slot thanks to the `{ev:…}` / `{u:…}` tags.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Iterator

import pytest

from actors import store
from actors.line import LineConfig, WaitingLine
from eventpulse import keys, ledger
from eventpulse.errors import RateLimited
from eventpulse.redis import create_client, pool_stats
from eventpulse.settings import Settings
from serve import ratelimit
from tests.conftest import RedisClusterServers, unique

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterServers]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed: apt-get install -y redis-server")
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def cluster_settings(redis_cluster) -> Settings:
    return Settings(_env_file=None, redis_url=redis_cluster.url, redis_cluster=True)


@pytest.fixture
async def rc(cluster_settings):
    client = create_client(cluster_settings)
    yield client
    await client.aclose()


def event_doc(total: int = 4) -> dict:
    return {"name": "cluster night", "description": "", "location": "", "price": 5.0,
            "event_date": "2027-01-01", "total_tickets": total, "max_per_user": 4,
            "ticket_types": [{"name": "general", "price": 5.0, "quantity": total}]}


def item(pid: str, user: str, qty: int = 1) -> dict:
    return {"purchase_id": pid, "user_id": user, "quantity": qty, "ticket_type": "general",
            "unit_price": 5.0, "payment_reference": "test_ok_c"}


async def test_the_client_is_a_cluster_client_spread_over_three_masters(rc):
    from redis.asyncio.cluster import RedisCluster

    assert isinstance(rc, RedisCluster)
    assert await rc.ping()
    assert len(rc.get_nodes()) == 3
    stats = pool_stats(rc)
    assert stats["max"] == 50 and stats["in_use"] >= 0


async def test_every_key_of_one_event_or_user_shares_a_slot(rc):
    eid, uid = unique("ev"), unique("u")
    event_keys = [keys.event(eid), keys.sold(eid), keys.capacity(eid), keys.event_tickets(eid),
                  keys.idempotency(eid, "k"), keys.purchase(eid, "p"), keys.journal(eid),
                  keys.snapshot(eid), keys.line_durable(eid)]
    user_keys = [keys.user_tickets(uid), keys.user_tickets_version(uid),
                 keys.user_tickets_cache(uid, 3, "all"), keys.rate(uid, "join", 7)]
    for group in (event_keys, user_keys):
        slots = {await rc.cluster_keyslot(k) for k in group}
        assert len(slots) == 1, group


async def test_ledger_commits_exactly_once_and_never_oversells(rc):
    doc = await ledger.create_event(rc, event_doc(total=3))
    eid = doc["id"]
    assert (await ledger.get_event(rc, eid))["name"] == "cluster night"
    book = ledger.Ledger(rc)
    first = await book.commit(eid, [item("p1", "ann", 2), item("p2", "bob", 2), item("p3", "cy", 1)])
    assert [s for s, _ in first] == ["committed", "rejected", "committed"]
    assert first[1][1] == "sold_out"
    again = await book.commit(eid, [item("p1", "ann", 2)])
    assert again == [("duplicate", first[0][1])]
    assert await ledger.sold_counts(rc, eid) == {"general": 3, "_total": 3}
    users = await book.index_tickets(eid, first[0][1] + first[2][1])
    assert users == {"ann", "cy"}
    assert len(await ledger.user_tickets(rc, "ann")) >= 2
    listed, total = await ledger.list_events(rc, 0, 1000)
    assert total >= 1 and eid in {e["id"] for e in listed}
    assert await book.refund_event(eid) == 3
    assert await book.refund_event(eid) == 0  # idempotent
    statuses = {t["status"] for t in await ledger.user_tickets(rc, "cy") if t["event_id"] == eid}
    assert statuses == {"refunded"}
    assert (await book.commit(eid, [item("p4", "dee")]))[0] == ("rejected", "event_cancelled")
    assert await ledger.rebuild_user_index(rc, eid) == {"ann", "cy"}


async def test_journal_and_snapshot_round_trip(rc):
    eid = unique("ev")
    line = WaitingLine(LineConfig(capacity={"general": 2}))
    facts = []
    for i in range(5):
        _, f = line.join_many([(f"user{i}", 1, None, None)], 1000.0 + i)
        facts.append(f)
    await store.append(rc, eid, 0, facts[0] + facts[1])
    n0 = len(facts[0] + facts[1])
    await store.append(rc, eid, n0, facts[2])
    covered = n0 + len(facts[2])
    await store.write_snapshot(rc, eid, covered, line.to_snapshot(), trim=2)
    await store.append(rc, eid, covered, facts[3] + facts[4])
    loaded = await store.load(rc, eid)
    assert loaded.covered == covered and len(loaded.records) == 1
    assert [f for _, f in loaded.tail] == facts[3] + facts[4]
    restored = WaitingLine.from_snapshot(loaded.line_state)
    assert restored.to_snapshot() == line.to_snapshot()


async def test_rate_limit_holds_on_the_cluster(rc):
    user = unique("u")
    for _ in range(3):
        await ratelimit.hit(rc, user, "join", 3, 60)
    with pytest.raises(RateLimited) as caught:
        await ratelimit.hit(rc, user, "join", 3, 60)
    assert caught.value.retry_after is not None and caught.value.retry_after > 0


async def test_callers_wait_for_a_connection_instead_of_failing(redis_cluster):
    client = create_client(Settings(_env_file=None, redis_url=redis_cluster.url,
                                    redis_cluster=True, redis_pool_size=2,
                                    redis_pool_timeout_s=10))
    seen = []

    async def slow_call(i: int) -> None:
        await client.blpop([f"ep:test:nothing:{i}"], timeout=0.05)
        pipe = client.pipeline(transaction=False)
        pipe.incr(f"ep:test:n:{i}")
        pipe.get(f"ep:test:n:{i}")
        await pipe.execute()
        seen.append(pool_stats(client)["in_use"])

    await asyncio.gather(*(slow_call(i) for i in range(40)))
    assert len(seen) == 40 and max(seen) <= 2 + 3  # permits, plus a pipeline's other nodes
    await client.aclose()


async def test_pubsub_reaches_a_subscriber_on_another_master(rc, cluster_settings):
    """Cache invalidation and purchase outcomes ride on classic pub/sub, which a cluster
    broadcasts to every node."""
    listener = create_client(cluster_settings)
    await listener.ping()
    pubsub = listener.pubsub(node=listener.get_nodes()[-1])
    await pubsub.subscribe(keys.EVENT_CHANNEL)
    await rc.publish(keys.EVENT_CHANNEL, b"ev-123")
    got = None
    deadline = time.monotonic() + 5
    while got is None and time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if msg is not None:
            got = msg["data"]
    await pubsub.aclose()
    await listener.aclose()
    assert got == b"ev-123"


async def test_a_fresh_clients_first_call_may_be_a_transaction(cluster_settings):
    """redis-py queues cluster transactions through a helper thread's own loop; the client
    must still open its connections on the caller's loop."""
    client = create_client(cluster_settings)
    eid = unique("ev")
    loaded = await store.load(client, eid)  # MULTI GET LRANGE EXEC, before anything else
    assert loaded.line_state is None and loaded.tail == []
    await store.write_snapshot(client, eid, 0, WaitingLine(LineConfig(capacity={"g": 1})).to_snapshot(), 0)
    assert (await store.load(client, eid)).line_state is not None
    await client.aclose()

"""Faults under load: an actor, a Serve replica, the purchase job, Redis itself.

Each test runs background load (joins, position reads, purchases over real HTTP),
injects one fault, keeps the load on a few seconds more, then proves that nothing
acknowledged was lost (`tests/load.py::check_invariants`) and records what users saw
for docs/reliability.md. The Redis restart runs last: it touches the session's Redis.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from actors.directory import NAMESPACE, actor_name
from bench.fault_load import Load, check_invariants
from bench.reliability import record

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.usefixtures("purchase_job")]

CAPACITY = 40
RUNS: list = []  # the restarted consumers' run() calls, kept for the session


def describe(load: Load, start: float, end: float) -> tuple[str, str]:
    during = load.window(start, end)
    total = load.window(0)
    seconds = max(s[0] for s in total) - min(s[0] for s in total)
    load_text = (f"{load.workers} clients, {len(total)} requests in {seconds:.0f} s "
                 f"(joins, /queue/me, purchases)")
    saw = (f"during fault: {len(during)} requests, statuses {load.statuses(during)}, "
           f"errors {load.errors(during)} ({100 * load.errors(during) / max(len(during), 1):.2f}%), "
           f"p95 {load.p95_ms(during)} ms, max {load.max_ms(during)} ms")
    return load_text, saw


def lost_text(facts: dict) -> str:
    return (f"nothing: {facts['joined']} acknowledged joins all present, "
            f"{facts['purchases_accepted']} accepted purchases all final "
            f"({facts['committed']} committed), sold {facts['sold']}/{facts['capacity']}, "
            f"no duplicate ticket, positions 1..n exact")


async def alive(actor, timeout: float = 120) -> None:
    """Wait until a restarting actor answers (calls during the restart fail, no retries)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await actor.stats.remote()
            return
        except ray.exceptions.RayActorError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def ready(http, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get("/readyz") as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001
            pass
        await asyncio.sleep(0.5)
    raise AssertionError("the app did not become ready again")


async def test_event_actor_killed_under_load_recovers_its_line(http, auth_headers, make_event, redis):
    started = time.monotonic()
    event = await make_event(total_tickets=CAPACITY, max_per_user=1)
    load = Load(http, auth_headers, event["id"])
    load.start()
    await load.until_ok(60)
    fault_at = time.monotonic()
    ray.kill(ray.get_actor(actor_name(event["id"]), namespace=NAMESPACE), no_restart=False)
    await asyncio.sleep(1)
    await load.until_ok(30, since=time.monotonic())
    fault_end = time.monotonic()
    await load.until_ok(30, since=fault_end)
    await load.stop()
    after = [x for x in load.samples if x[0] >= fault_end]
    facts = await check_invariants(redis, load, CAPACITY)
    during = load.window(fault_at, fault_end)
    errors = load.errors(during)
    # The restart takes about a second: clients saw brief 503s (counted), never a 500, and
    # requests after the window all succeeded again.
    assert not any(s[2] == 500 for s in load.samples)
    assert load.errors(after) == 0, load.statuses(after)
    assert len(during) > 10
    load_text, saw = describe(load, fault_at, fault_end)
    record("actor-kill", order=10, fault="EventQueue actor killed (ray.kill, restarted by Ray)",
           load=load_text, saw=f"{saw}; {errors} brief 503s, none after the restart",
           lost=lost_text(facts), seconds=time.monotonic() - started)


async def test_serve_replica_killed_under_load_keeps_answering(http, auth_headers, make_event,
                                                               redis, serve_url, ray_session):
    from ray import serve
    from ray.util.state import list_actors

    from serve.app import Ingress

    started = time.monotonic()
    serve.run(Ingress.options(num_replicas=2).bind(), name="eventpulse", route_prefix="/")
    try:
        event = await make_event(total_tickets=CAPACITY, max_per_user=1)
        load = Load(http, auth_headers, event["id"])
        load.start()
        await load.until_ok(60)
        dashboard = "http://" + ray_session["info"].dashboard_url
        replicas = [a for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")],
                                           limit=1000)
                    if "ServeReplica" in (a.class_name or "") and "Ingress" in (a.class_name or "")]
        assert len(replicas) == 2, replicas
        fault_at = time.monotonic()
        ray.kill(ray.get_actor(replicas[0].name, namespace="serve"), no_restart=True)
        await asyncio.sleep(5)
        await load.until_ok(100, since=fault_at)
        fault_end = time.monotonic()
        await load.stop()
        facts = await check_invariants(redis, load, CAPACITY)
    finally:
        serve.run(Ingress.bind(), name="eventpulse", route_prefix="/")
        await ready(http)
    during = load.window(fault_at, fault_end)
    rate = load.errors(during) / max(len(during), 1)
    # Goal < 0.5 %: requests in flight on the killed replica are replayed by the ingress
    # on the other one (retry-on empty-response; every write route is idempotent), and a
    # purchase claimed by the dead replica is recorded by the client's retry.
    assert rate < 0.005, (load.statuses(during), load.failures)
    assert not any(s[2] == 500 for s in load.samples), load.failures
    load_text, saw = describe(load, fault_at, fault_end)
    record("replica-kill", order=20, fault="one of two Serve Ingress replicas killed",
           load=load_text, saw=f"{saw} (goal < 0.5%)", lost=lost_text(facts),
           seconds=time.monotonic() - started)


async def test_purchase_job_killed_mid_batch_reclaims_its_work(http, auth_headers, make_event,
                                                              redis, purchase_job):
    started = time.monotonic()
    event = await make_event(total_tickets=CAPACITY, max_per_user=1)
    load = Load(http, auth_headers, event["id"], workers=8)
    load.start()
    await load.until_ok(60)
    fault_at = time.monotonic()
    for consumer in purchase_job:  # every partition: whatever batch is in flight dies
        ray.kill(consumer, no_restart=False)
    for consumer in purchase_job:  # restarted by Ray; resume consuming, as a rerun job would
        await alive(consumer)
        RUNS.append(consumer.run.remote())
    fault_end = time.monotonic()
    await load.until_ok(60, since=fault_end)
    await load.stop()
    facts = await check_invariants(redis, load, CAPACITY)
    assert facts["purchases_accepted"] > 0
    assert not any(s[2] == 500 for s in load.samples)
    load_text, saw = describe(load, fault_at, fault_end)
    record("purchase-job-kill", order=30,
           fault="all purchase-job consumers killed mid-batch, restarted (XAUTOCLAIM reclaim)",
           load=load_text, saw=saw, lost=lost_text(facts), seconds=time.monotonic() - started)


async def test_purchase_claimed_by_a_dead_replica_is_recorded_by_the_retry(
        http, auth_headers, make_event, redis):
    """A replica that died between claiming an Idempotency-Key and recording the purchase
    left a claim with no purchase behind it (found by the replica-kill test). The claim
    carries the whole request, so the client's retry records that very purchase at once
    (no waiting out a grace period), and it commits exactly once."""
    import uuid

    from eventpulse import keys
    from serve import idempotency
    from serve.schemas import PurchaseIn

    event = await make_event(total_tickets=2, max_per_user=1)
    eid, user, key = event["id"], f"claim-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    async with http.post(f"/api/events/{eid}/queue", json={"quantity": 1},
                         headers=auth_headers(user)) as r:
        assert r.status == 200 and (await r.json())["status"] == "offered"
    body = {"quantity": 1, "payment_reference": "test_ok_claim"}
    pid = "deadreplica01"
    request = {"pid": pid, "event_id": eid, "user_id": user, "quantity": 1,
               "ticket_type": event["ticket_types"][0]["name"],
               "unit_price": event["ticket_types"][0]["price"], "payment_reference": body["payment_reference"]}
    # exactly what the dead replica wrote before it could record the purchase
    assert (await idempotency.claim(redis, keys.idempotency(eid, f"{user}:{key}"),
                                    PurchaseIn(**body), request))[1]
    headers = {**auth_headers(user), "Idempotency-Key": key}
    async with http.post(f"/api/events/{eid}/purchases?wait=10", json=body, headers=headers) as r:
        assert r.status == 201, await r.text()
        done = await r.json()
    assert done["purchase_id"] == pid and len(done["tickets"]) == 1
    async with http.post(f"/api/events/{eid}/purchases", json=body, headers=headers) as r:
        assert r.status == 201 and (await r.json())["purchase_id"] == pid  # settled once
    async with http.post(f"/api/events/{eid}/purchases", json={**body, "quantity": 2},
                         headers=headers) as r:
        assert r.status == 409  # same key, other body
        assert (await r.json())["error"]["code"] == "idempotency_key_reused"
    async with http.get(f"/api/users/{user}/tickets", headers=auth_headers(user)) as r:
        assert len(await r.json()) == 1


async def test_zz_redis_restart_answers_503_then_recovers(http, auth_headers, make_event, redis,
                                                          redis_server):
    """Runs last in this module: the session's Redis goes away for a few seconds."""
    started = time.monotonic()
    event = await make_event(total_tickets=CAPACITY, max_per_user=1)
    load = Load(http, auth_headers, event["id"])
    load.start()
    await load.until_ok(60)
    await redis.execute_command("CONFIG", "SET", "appendfsync", "always")
    fault_at = time.monotonic()
    try:
        redis_server.stop()
        await asyncio.sleep(4)
        async with http.get("/readyz") as r:
            assert r.status == 503
    finally:
        if redis_server.proc is None:
            await asyncio.to_thread(redis_server.start)
    fault_end = time.monotonic()
    await ready(http)
    recovered = time.monotonic()
    await load.until_ok(40, since=recovered)
    await load.stop()
    await redis.execute_command("CONFIG", "SET", "appendfsync", "everysec")
    facts = await check_invariants(redis, load, CAPACITY)
    during = load.window(fault_at, fault_end)
    assert not any(s[2] == 500 for s in load.samples), load.statuses(load.samples)
    tail = sorted(x for x in load.samples if x[0] >= recovered)[-20:]  # the last answers
    assert tail and load.errors(tail) == 0, load.statuses(tail)
    load_text, saw = describe(load, fault_at, fault_end)
    record("redis-restart", order=40, fault="Redis stopped ~4 s and restarted (AOF)",
           load=load_text, saw=f"{saw}; never 500, recovered without intervention",
           lost=lost_text(facts), seconds=time.monotonic() - started)
    assert len(during) > 0

"""`python -m bench.purchase_bench` — how fast the purchase job commits accepted purchases.

job mode (default): N accepted purchases (live offers on E events) are put on the
partition streams exactly as the API puts them, then one ConsumerActor per partition is
started and the clock runs until every stream is drained and acknowledged. Prints
committed purchases/s and checks the ledger (every purchase committed exactly once).

http mode (--http): the Serve app is deployed (as tests/conftest.py does) next to the
job; N buyers holding offers POST /api/events/{id}/purchases?wait=10 with C concurrent
connections. Prints purchases/s and p50/p95/p99 latency.

It starts its own redis-server and Ray (private temp dir), and stops them at the end.
--profile runs one partition in-process under cProfile instead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import msgpack

from cluster.launcher import free_port


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", str(workdir), "--appendonly", "yes",
                             "--appendfsync", "everysec", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


# set-up: events, offers, accepted purchases -------------------------------------------
async def prepare(n: int, events: int, partitions: int, enqueue: bool = True) -> list[dict]:
    """Create events, give every buyer a live offer, and enqueue one purchase each."""
    from actors.directory import get_queue
    from eventpulse import keys, ledger
    from eventpulse.redis import get_client

    r = get_client()
    per_event = -(-n // events)
    reqs = []
    for e in range(events):
        doc = {"name": f"Bench {e}", "description": "d", "location": "Hall", "price": 10.0,
               "event_date": "2027-01-01T20:00:00Z", "total_tickets": per_event,
               "max_per_user": 4, "ticket_types": [{"name": "GA", "quantity": per_event,
                                                    "price": 10.0}]}
        event_id = (await ledger.create_event(r, doc))["id"]
        users = [f"b{e}-{i}" for i in range(min(per_event, n - e * per_event))]
        queue = get_queue(event_id)
        for i in range(0, len(users), 5000):
            await queue.join_many.remote([(u, 1, "GA", None) for u in users[i:i + 5000]])
        reqs += [{"pid": ledger.new_id(), "event_id": event_id, "user_id": u, "quantity": 1,
                  "ticket_type": "GA", "unit_price": 10.0, "payment_reference": "test_ok_bench"}
                 for u in users]
    if not enqueue:
        return reqs
    for i in range(0, len(reqs), 5000):  # the API's pipeline: record, owner, stream entry
        pipe = r.pipeline(transaction=False)
        for q in reqs[i:i + 5000]:
            pipe.hset(keys.purchase(q["event_id"], q["pid"]), mapping={
                "status": "accepted", "user_id": q["user_id"], "quantity": 1})
            pipe.set(keys.purchase_owner(q["pid"]), q["event_id"])
            part = zlib.crc32(q["user_id"].encode()) % partitions
            pipe.xadd(keys.purchase_stream(part), {"m": msgpack.packb(q)})
        await pipe.execute()
    return reqs


async def backlog(partitions: int) -> int:
    """Entries not yet read plus entries read but not acknowledged, over all streams."""
    from eventpulse import keys
    from eventpulse.redis import get_client

    r, left = get_client(), 0
    for p in range(partitions):
        for g in await r.xinfo_groups(keys.purchase_stream(p)):
            left += (g.get("lag") or 0) + (g.get("pending") or 0)
    return left


async def verify(reqs: list[dict]) -> dict[str, int]:
    from eventpulse import keys, ledger
    from eventpulse.redis import get_client

    r = get_client()
    sold = 0
    for event_id in {q["event_id"] for q in reqs}:
        sold += (await ledger.sold_counts(r, event_id)).get("_total", 0)
    pipe = r.pipeline(transaction=False)
    for q in reqs:
        pipe.hget(keys.purchase(q["event_id"], q["pid"]), "status")
    statuses = [s.decode() if s else None for s in await pipe.execute()]
    return {"sold": sold, "committed": statuses.count("committed"), "requests": len(reqs)}


# job mode -----------------------------------------------------------------------------
async def run_job(args) -> None:
    import ray

    from cluster.purchase_job import ConsumerActor, PartitionConsumer
    from eventpulse import keys
    from eventpulse.redis import get_client
    from eventpulse.settings import get_settings

    t0 = time.perf_counter()
    reqs = await prepare(args.purchases, args.events, args.partitions)
    print(f"prepared {len(reqs)} accepted purchases on {args.events} events in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    args.batch_size = args.batch_size or get_settings().purchase_batch_size
    overrides = {"purchase_batch_size": args.batch_size, "purchase_partitions": args.partitions}
    r = get_client()
    for p in range(args.partitions):  # groups exist before the clock starts
        await PartitionConsumer(p).ensure_group(r)
    if args.profile:
        consumer = PartitionConsumer(0, get_settings().model_copy(update=overrides))
        prof = cProfile.Profile()
        n0 = await r.xlen(keys.purchase_stream(0))
        start = time.perf_counter()
        prof.enable()
        while await backlog(1):
            await consumer.run(max_seconds=1)
        prof.disable()
        took = time.perf_counter() - start
        print(f"in-process partition 0: {n0} purchases in {took:.2f}s = {n0 / took:,.0f}/s")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        return
    actors = [ConsumerActor.remote(p, overrides) for p in range(args.partitions)]
    await asyncio.gather(*(a.stats.remote() for a in actors))  # started, not yet consuming
    start = time.perf_counter()
    runs = [a.run.remote() for a in actors]
    while (left := await backlog(args.partitions)) > 0:
        await asyncio.sleep(0.05)
    took = time.perf_counter() - start
    stats = await asyncio.gather(*(a.stats.remote() for a in actors))
    for a in actors:
        ray.kill(a, no_restart=True)
    del runs, left
    check = await verify(reqs)
    print(f"committed {check['committed']}/{check['requests']} (sold {check['sold']}) in "
          f"{took:.2f}s = {len(reqs) / took:,.0f} purchases/s with {args.partitions} consumers, "
          f"batch {args.batch_size}; per consumer {[s['processed'] for s in stats]}")
    assert check["committed"] == check["sold"] == len(reqs), check


# http mode ----------------------------------------------------------------------------
async def run_http(args, workdir: Path) -> None:
    import aiohttp
    import ray
    from ray import serve

    from cluster.purchase_job import ConsumerActor
    from eventpulse.auth import mint_token
    from serve.app import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="eventpulse", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    actors = [ConsumerActor.remote(p) for p in range(args.partitions)]
    runs = [a.run.remote() for a in actors]
    reqs = await prepare(args.purchases, args.events, args.partitions, enqueue=False)
    secret = os.environ["EVENTPULSE_TOKEN_SECRET"]
    latencies: list[float] = []
    codes: dict[int, int] = {}
    sem = asyncio.Semaphore(args.concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(
            limit=args.concurrency)) as http:
        for _ in range(60):
            try:
                async with http.get("/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1)

        async def buy(q: dict) -> None:
            headers = {"Authorization": f"Bearer {mint_token(q['user_id'], [], secret=secret)}",
                       "Idempotency-Key": q["pid"] + "-key"}
            async with sem:
                t = time.perf_counter()
                async with http.post(f"/api/events/{q['event_id']}/purchases?wait=10",
                                     json={"quantity": 1, "payment_reference": "test_ok_b"},
                                     headers=headers) as resp:
                    await resp.read()
                    latencies.append(time.perf_counter() - t)
                    codes[resp.status] = codes.get(resp.status, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(buy(q) for q in reqs))
        took = time.perf_counter() - start
    latencies.sort()
    pct = {p: latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000
           for p in (50, 95, 99)}
    print(f"HTTP ?wait=10: {len(reqs)} purchases, {args.concurrency} connections, "
          f"{took:.1f}s = {len(reqs) / took:,.0f} purchases/s; status {codes}; "
          f"p50 {pct[50]:.0f} ms, p95 {pct[95]:.0f} ms, p99 {pct[99]:.0f} ms")
    for a in actors:
        ray.kill(a, no_restart=True)
    del runs
    serve.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.purchase_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--purchases", type=int, default=50_000)
    p.add_argument("--events", type=int, default=10)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the setting purchase_batch_size")
    p.add_argument("--http", action="store_true", help="end to end through the API")
    p.add_argument("--concurrency", type=int, default=200, help="--http: connections")
    p.add_argument("--profile", action="store_true", help="cProfile partition 0 in-process")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    workdir = Path(tempfile.mkdtemp(prefix="ep-pbench-"))
    redis_proc, redis_url = start_redis(workdir)
    # Private Ray temp dir: never attach to another Ray running on this machine.
    os.environ.update({"EVENTPULSE_REDIS_URL": redis_url, "RAY_TMPDIR": str(workdir),
                       "EVENTPULSE_DATA_DIR": str(workdir / "data"),
                       "EVENTPULSE_PURCHASE_PARTITIONS": str(args.partitions),
                       "EVENTPULSE_TOKEN_SECRET": os.environ.get("EVENTPULSE_TOKEN_SECRET",
                                                                 "bench-secret-" + "x" * 32),
                       "RAY_USAGE_STATS_ENABLED": "0"})
    if args.http:
        from cluster.launcher import haproxy_env

        os.environ.update({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                           "EVENTPULSE_JOIN_RATE_LIMIT": "1000000", **haproxy_env(workdir)})
    import ray

    ray.init(namespace="eventpulse", num_cpus=4, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    try:
        asyncio.run(run_http(args, workdir) if args.http else run_job(args))
    finally:
        ray.shutdown()
        if args.http:
            from cluster.launcher import stop_haproxy

            stop_haproxy(workdir)
        redis_proc.terminate()
        redis_proc.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

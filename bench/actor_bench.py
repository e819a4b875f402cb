"""EventQueue actor benchmarks: batched joins with journaling on, and recovery time.

    python -m bench.actor_bench [--joins 200000] [--batch 1000] [--recover 1000000]

Starts its own redis-server (AOF on, fsync every second) and a local Ray, and stops both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time

from cluster.launcher import free_port as _free_port


async def _event(r, total: int) -> str:
    from eventpulse import ledger

    doc = await ledger.create_event(r, {
        "name": "bench", "description": "", "location": "", "event_date": "2027-01-01",
        "price": 1.0, "total_tickets": total, "max_per_user": 4, "organizer_id": "bench",
        "ticket_types": [{"name": "general", "price": 1.0, "quantity": total}]})
    return doc["id"]


async def bench_joins(r, joins: int, batch: int, concurrency: int) -> dict:
    from actors.directory import get_queue

    eid = await _event(r, 10)
    q = get_queue(eid)
    await q.ping.remote()
    users = [f"user-{i:08d}" for i in range(joins)]
    batches = [users[i:i + batch] for i in range(0, joins, batch)]
    sem = asyncio.Semaphore(concurrency)

    async def one(b):
        async with sem:
            await q.join_many.remote([(u, 1, None, None) for u in b])

    started = time.perf_counter()
    await asyncio.gather(*(one(b) for b in batches))
    elapsed = time.perf_counter() - started
    stats = await q.stats.remote()
    assert stats["waiting"] + stats["live_offers"] == joins
    return {"joins": joins, "batch": batch, "concurrency": concurrency,
            "seconds": round(elapsed, 2), "joins_per_s": round(joins / elapsed)}


async def bench_recovery(r, entries: int) -> dict:
    """Fill a line of `entries` via the actor, snapshot it, add a journal tail, kill, time."""
    import ray

    from actors.directory import get_queue
    from eventpulse import keys

    eid = await _event(r, 10)
    q = get_queue(eid)
    users = [f"r-{i:08d}" for i in range(entries)]
    step = 5000
    pending = []
    for i in range(0, entries, step):
        pending.append(q.join_many.remote([(u, 1, None, None) for u in users[i:i + step]]))
        if len(pending) >= 8:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await q.snapshot_now.remote()
    tail = [f"t-{i:06d}" for i in range(20_000)]  # a journal tail to replay after the snapshot
    for i in range(0, len(tail), 1000):
        await q.join_many.remote([(u, 1, None, None) for u in tail[i:i + 1000]])
    snap_bytes = await r.strlen(keys.snapshot(eid))
    journal_len = await r.llen(keys.journal(eid))
    before = await q.incarnation.remote()
    ray.kill(q, no_restart=False)
    started = time.perf_counter()
    while True:  # until a new process has loaded the line and answers
        try:
            if await q.incarnation.remote() != before:
                break
        except ray.exceptions.RayError:
            pass
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    stats = await q.stats.remote()
    assert stats["waiting"] + stats["live_offers"] == entries + len(tail)
    return {"entries": entries + len(tail), "snapshot_mb": round(snap_bytes / 2**20, 1),
            "journal_records": journal_len, "recovery_s": round(elapsed, 2)}


async def main_async(args) -> None:
    from eventpulse.redis import get_client

    r = get_client()
    print("joins through the actor:", await bench_joins(r, args.joins, args.batch, args.concurrency))
    if args.recover:
        print("recovery:", await bench_recovery(r, args.recover))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--joins", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--recover", type=int, default=1_000_000)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="ep-bench-")
    port = _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--dir", tmp, "--appendonly", "yes",
                              "--appendfsync", "everysec", "--save", ""], stdout=subprocess.DEVNULL)
    os.environ["EVENTPULSE_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    os.environ["EVENTPULSE_DATA_DIR"] = tmp
    import ray

    time.sleep(0.3)
    ray.init(address="local", namespace="eventpulse", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        asyncio.run(main_async(args))
    finally:
        ray.shutdown()
        redis.terminate()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

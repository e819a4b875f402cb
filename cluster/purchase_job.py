"""The purchase job: commits accepted purchases in batches, exactly once.

Run with `ray job submit -- python -m cluster.purchase_job` (`eventpulse up` submits it
through the Job Submission API). One consumer actor per partition stream reads a batch
(consumer group), groups it by event, locks the offers with the event's actor in one
call, charges the payments in one call, commits the tickets with one Lua call per event
batch, settles the offers, acknowledges, and publishes each outcome. A replayed request
finds its purchase record already committed and gets the same tickets back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from typing import Any

import msgpack
import ray
from redis.exceptions import ResponseError

from actors.directory import NAMESPACE, get_queue
from eventpulse import keys, metrics
from eventpulse.errors import EventPulseError
from eventpulse.ledger import Ledger
from eventpulse.payments import PaymentGateway, get_gateway
from eventpulse.redis import RedisClient, get_client
from eventpulse.settings import Settings, get_settings

log = logging.getLogger(__name__)
RECLAIM_EVERY_S = 5.0
FINAL = ("committed", "declined", "rejected", "failed")


class PartitionConsumer:
    """Consumes one partition stream. Pure asyncio; the actor wrapper only hosts it."""

    def __init__(self, partition: int, settings: Settings | None = None,
                 gateway: PaymentGateway | None = None) -> None:
        self.partition = partition
        self.settings = settings or get_settings()
        self.gateway = gateway or get_gateway()
        self.stream = keys.purchase_stream(partition)
        self.name = f"p{partition}-{uuid.uuid4().hex[:8]}"
        self.processed = 0
        self._stop = False

    async def ensure_group(self, r: RedisClient) -> None:
        try:
            await r.xgroup_create(self.stream, keys.PURCHASE_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, max_seconds: float | None = None) -> int:
        """Consume until stopped (or for `max_seconds`); returns requests processed."""
        r = get_client(self.settings)
        await self.ensure_group(r)
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        next_reclaim = 0.0
        while not self._stop and (deadline is None or time.monotonic() < deadline):
            try:
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + RECLAIM_EVERY_S
                    await self.reclaim(r)
                    await self._report_lag(r)
                resp = await r.xreadgroup(keys.PURCHASE_GROUP, self.name, {self.stream: ">"},
                                          count=self.settings.purchase_batch_size,
                                          block=self.settings.purchase_batch_wait_ms)
                for _, messages in resp or []:
                    await self.process(r, messages)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — Redis or actor trouble: back off, go on
                log.warning("partition %d: %s", self.partition, e)
                await asyncio.sleep(0.5)
        return self.processed

    def stop(self) -> None:
        self._stop = True

    async def reclaim(self, r: RedisClient) -> None:
        """Take over work a dead consumer left; dead-letter requests that keep failing."""
        start = "0-0"
        while True:
            start, messages, *_ = await r.xautoclaim(
                self.stream, keys.PURCHASE_GROUP, self.name,
                min_idle_time=self.settings.purchase_reclaim_idle_ms, start_id=start,
                count=self.settings.purchase_batch_size)
            if messages:
                live = await self._dead_letter_exhausted(r, messages)
                if live:
                    await self.process(r, live)
            if not messages or start in (b"0-0", "0-0"):
                return

    async def _dead_letter_exhausted(self, r: RedisClient, messages: list) -> list:
        ids = [m[0] for m in messages]
        pending = await r.xpending_range(self.stream, keys.PURCHASE_GROUP, min=ids[0],
                                         max=ids[-1], count=len(ids) * 2)
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        live = []
        for mid, fields in messages:
            if deliveries.get(mid, 0) > self.settings.purchase_max_attempts:
                await self._dead_letter(r, mid, fields, "too many delivery attempts")
            else:
                live.append((mid, fields))
        return live

    async def _dead_letter(self, r: RedisClient, mid, fields: dict, error: str) -> None:
        pipe = r.pipeline(transaction=False)
        pipe.xadd(keys.dead_letter_stream(self.partition),
                  {"m": fields.get(b"m", b""), "error": error, "id": mid})
        pipe.xack(self.stream, keys.PURCHASE_GROUP, mid)
        await pipe.execute()
        try:
            req = msgpack.unpackb(fields[b"m"], raw=False)
            await self._settle_records(r, [(req, "failed", error)])
        except Exception:  # noqa: BLE001 — the message itself may be the poison
            pass
        metrics.get("dead_letters").inc(tags={"partition": str(self.partition)})

    async def process(self, r: RedisClient, messages: list) -> None:
        """One batch: decode, group by event, lock, charge, commit, settle, ack, publish."""
        started = time.perf_counter()
        metrics.get("purchase_batch").observe(len(messages))
        by_event: dict[str, list[tuple[Any, dict]]] = defaultdict(list)
        for mid, fields in messages:
            try:
                req = msgpack.unpackb(fields[b"m"], raw=False)
                req["purchase_id"] = req["pid"]
                req["event_id"], req["user_id"], int(req["quantity"])
            except Exception as e:  # noqa: BLE001 — undecodable: never blocks the partition
                await self._dead_letter(r, mid, fields, f"undecodable request: {e}")
                continue
            by_event[req["event_id"]].append((mid, req))
        ledger = Ledger(r)
        results = await asyncio.gather(*(self._process_event(r, ledger, eid, batch)
                                         for eid, batch in by_event.items()),
                                       return_exceptions=True)
        done_ids = []
        for (eid, batch), res in zip(by_event.items(), results):
            if isinstance(res, Exception):
                log.warning("partition %d: event %s batch failed: %s", self.partition, eid, res)
                continue  # left pending: reclaimed and retried, dead-lettered after N tries
            done_ids += [mid for mid, _ in batch]
        if done_ids:
            await r.xack(self.stream, keys.PURCHASE_GROUP, *done_ids)
            self.processed += len(done_ids)
        metrics.get("commit_latency").observe(time.perf_counter() - started)

    async def _process_event(self, r: RedisClient, ledger: Ledger, event_id: str,
                             batch: list[tuple[Any, dict]]) -> None:
        reqs = [req for _, req in batch]
        # A redelivered request may be settled already (crash after commit, before ack).
        pipe = r.pipeline(transaction=False)
        for req in reqs:
            pipe.hget(keys.purchase(event_id, req["pid"]), "status")
        statuses = [s.decode() if s else "accepted" for s in await pipe.execute()]
        fresh = [req for req, s in zip(reqs, statuses) if s not in FINAL]
        replayed = [req for req, s in zip(reqs, statuses) if s == "committed"]
        outcomes: list[tuple[dict, str, str]] = []
        queue = get_queue(event_id)
        if fresh:
            locks = await queue.begin_purchases.remote([(q["user_id"], int(q["quantity"]))
                                                        for q in fresh])
            locked = []
            for req, err in zip(fresh, locks):
                if err is None:
                    locked.append(req)
                else:
                    outcomes.append((req, "rejected", getattr(err, "code", "no_offer")))
            charged = await self.gateway.charge_many([
                {"purchase_id": q["pid"], "amount": q["unit_price"] * int(q["quantity"]),
                 "payment_reference": q["payment_reference"]} for q in locked])
            approved = [q for q, (ok, _) in zip(locked, charged) if ok]
            outcomes += [(q, "declined", "payment_declined")
                         for q, (ok, _) in zip(locked, charged) if not ok]
            committed = await ledger.commit(event_id, approved) if approved else []
            settle = []
            for req, (status, detail) in zip(approved, committed):
                if status in ("committed", "duplicate"):
                    req["tickets"] = detail
                    replayed.append(req)
                    settle.append((req["user_id"], "committed"))
                else:
                    outcomes.append((req, "rejected", str(detail)))
                    settle.append((req["user_id"], "declined"))
            settle += [(q["user_id"], "declined") for q, s, _ in outcomes if s == "declined"]
            if settle:
                await queue.finish_purchases.remote(settle)
        if replayed:
            tickets = [t for q in replayed for t in q.get("tickets") or
                       await self._tickets_of(r, event_id, q["pid"])]
            await ledger.index_tickets(event_id, tickets)
            outcomes += [(q, "committed", "") for q in replayed]
        await self._settle_records(r, outcomes)
        for _, status, _ in outcomes:
            metrics.get("purchases").inc(tags={"outcome": status})

    async def _tickets_of(self, r: RedisClient, event_id: str, pid: str) -> list[str]:
        raw = await r.hget(keys.purchase(event_id, pid), "tickets")
        return raw.decode().split(",") if raw else []

    async def _settle_records(self, r: RedisClient, outcomes: list[tuple[dict, str, str]]) -> None:
        if not outcomes:
            return
        pipe = r.pipeline(transaction=False)
        for req, status, reason in outcomes:
            if status != "committed":  # committed records were written by the Lua commit
                pipe.hset(keys.purchase(req["event_id"], req["pid"]),
                          mapping={"status": status, "reason": reason})
        await pipe.execute()
        pipe = r.pipeline(transaction=False)
        for req, status, reason in outcomes:
            pipe.publish(keys.PURCHASE_CHANNEL, msgpack.packb({
                "purchase_id": req["pid"], "event_id": req["event_id"],
                "user_id": req["user_id"], "status": status, "reason": reason}))
        await pipe.execute()

    async def _report_lag(self, r: RedisClient) -> None:
        try:
            for g in await r.xinfo_groups(self.stream):
                if g.get("name") in (keys.PURCHASE_GROUP.encode(), keys.PURCHASE_GROUP):
                    lag = (g.get("lag") or 0) + (g.get("pending") or 0)
                    metrics.get("purchase_lag").set(lag, tags={"partition": str(self.partition)})
        except Exception:  # noqa: BLE001 — lag is a metric, not a reason to stop
            pass


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class ConsumerActor:
    def __init__(self, partition: int) -> None:
        self.consumer = PartitionConsumer(partition)

    async def run(self) -> int:
        return await self.consumer.run()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(namespace=NAMESPACE)
    settings = get_settings()
    env = {k: v for k, v in __import__("os").environ.items() if k.startswith("EVENTPULSE_")}
    actors = [ConsumerActor.options(scheduling_strategy="SPREAD",
                                    runtime_env={"env_vars": env} if env else None).remote(p)
              for p in range(settings.purchase_partitions)]
    log.info("purchase job: %d partition consumers running", len(actors))
    ray.get([a.run.remote() for a in actors])


if __name__ == "__main__":
    main()

"""The purchase job: commits accepted purchases in batches, exactly once.

Run with `ray job submit -- python -m cluster.purchase_job` (`eventpulse up` submits it
through the Job Submission API). One consumer actor per partition stream reads a batch
(consumer group), groups it by event, locks the offers with the event's actor in one
call, charges the payments in one call, commits the tickets with one Lua call per event
batch, settles the offers, acknowledges, and publishes the outcomes (one message per
event batch). A replayed request finds its purchase record already committed and gets
the same tickets back.

Failure handling: a request is acknowledged only once its outcome is recorded, so a
consumer that dies leaves its batch pending and a live consumer takes it over with
XAUTOCLAIM after `purchase_reclaim_idle_ms`. Every step is idempotent (the offer lock,
the charge by purchase id, the Lua commit by purchase record), so a replay settles each
request exactly once. A request that keeps failing is isolated from its batch and, after
`purchase_max_attempts` deliveries, moved to the dead-letter stream with its error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import defaultdict
from typing import Any, Awaitable, TypeVar

import msgpack
import ray
from ray.exceptions import ActorDiedError
from redis.exceptions import ResponseError

from actors.directory import NAMESPACE, call, forget, get_queue
from eventpulse import keys, metrics
from eventpulse.ledger import Ledger
from eventpulse.payments import PaymentGateway, get_gateway
from eventpulse.redis import RedisClient, get_client
from eventpulse.settings import Settings, get_settings

T = TypeVar("T")
log = logging.getLogger(__name__)
RECLAIM_EVERY_S = 5.0
FINAL = ("committed", "declined", "rejected", "failed")
# Commit refusals after which the offer's hold goes back to the line. 'already_purchased'
# is not one: the user's other request holds (or consumed) the same offer.
RELEASE_REASONS = ("sold_out", "event_cancelled", "unknown_ticket_type")

Outcome = tuple[dict, str, str]  # request, status, reason


class PoisonRequest(ValueError):
    """A stream entry that can never be processed as it is."""


def decode_request(fields: dict) -> dict[str, Any]:
    """The request of one stream entry, checked enough that a batch cannot trip on it."""
    try:
        req = msgpack.unpackb(fields[b"m"], raw=False)
        if not isinstance(req, dict):
            raise TypeError("not a map")
        for name in ("pid", "event_id", "user_id", "ticket_type"):
            if not isinstance(req.get(name), str) or not req[name]:
                raise TypeError(f"{name} must be a non-empty string")
        req["quantity"] = int(req["quantity"])
    except Exception as e:  # noqa: BLE001 — whatever is wrong, it stays wrong
        raise PoisonRequest(f"undecodable request: {type(e).__name__}: {e}") from e
    req["purchase_id"] = req["pid"]
    return req


async def stage(name: str, step: Awaitable[T]) -> T:
    """Await one step of a batch, timed into eventpulse_purchase_stage_duration_seconds."""
    started = time.perf_counter()
    try:
        return await step
    finally:
        metrics.get("purchase_stage").observe(time.perf_counter() - started,
                                              tags={"stage": name})


class PartitionConsumer:
    """Consumes one partition stream. Pure asyncio; the actor wrapper only hosts it."""

    def __init__(self, partition: int, settings: Settings | None = None,
                 gateway: PaymentGateway | None = None) -> None:
        self.partition = partition
        self.settings = settings or get_settings()
        self.gateway = gateway or get_gateway()
        self.stream = keys.purchase_stream(partition)
        # Last error per pending request, kept in Redis so whichever consumer dead-letters
        # a request (maybe not the one that saw it fail) can say why.
        self.errors_key = keys.purchase_errors(partition)
        self.name = f"p{partition}-{uuid.uuid4().hex[:8]}"
        self.processed = 0  # requests acknowledged with an outcome
        self.batches = 0  # reads that returned work
        self.reclaimed = 0  # requests taken over from idle consumers
        self.dead_lettered = 0
        # Reclaim at least twice per idle period so a dead consumer's work waits ~1 period.
        self.reclaim_every_s = min(RECLAIM_EVERY_S,
                                   self.settings.purchase_reclaim_idle_ms / 2000)
        self._stop = False

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "partition": self.partition, "processed": self.processed,
                "batches": self.batches,
                "reclaimed": self.reclaimed, "dead_lettered": self.dead_lettered}

    async def ensure_group(self, r: RedisClient) -> None:
        try:
            await r.xgroup_create(self.stream, keys.PURCHASE_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, max_seconds: float | None = None) -> int:
        """Consume until stopped (or for `max_seconds`); returns requests processed."""
        r = get_client(self.settings)
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        next_reclaim = 0.0
        grouped = False
        linger = self.settings.purchase_linger_ms / 1000
        while not self._stop and (deadline is None or time.monotonic() < deadline):
            try:
                if not grouped:  # inside the retry: Redis may be starting, or flaky, too
                    await self.ensure_group(r)
                    grouped = True
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + self.reclaim_every_s
                    await self.reclaim(r)
                    await self._report_lag(r)
                resp = await r.xreadgroup(keys.PURCHASE_GROUP, self.name, {self.stream: ">"},
                                          count=self.settings.purchase_batch_size,
                                          block=self.settings.purchase_batch_wait_ms)
                taken = 0
                for _, messages in resp or []:
                    await self.process(r, messages)
                    taken += len(messages)
                if 0 < taken < self.settings.purchase_batch_size and linger > 0:
                    await asyncio.sleep(linger)  # let the next batch gather (a setting)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — Redis or actor trouble: back off, go on
                log.warning("partition %d: %s", self.partition, e)
                if "NOGROUP" in str(e):  # a Redis that lost the stream: start it anew
                    try:
                        await self.ensure_group(r)
                    except Exception:  # noqa: BLE001
                        pass
                await asyncio.sleep(0.5)
        return self.processed

    def stop(self) -> None:
        self._stop = True

    # taking over and giving up -------------------------------------------------------
    async def reclaim(self, r: RedisClient) -> None:
        """Take over work a dead consumer left; dead-letter requests that keep failing."""
        start = "0-0"
        while True:
            start, messages, *_ = await r.xautoclaim(
                self.stream, keys.PURCHASE_GROUP, self.name,
                min_idle_time=self.settings.purchase_reclaim_idle_ms, start_id=start,
                count=self.settings.purchase_batch_size)
            messages = [(mid, fields) for mid, fields in messages if fields is not None]
            if messages:
                self.reclaimed += len(messages)
                live = await self._dead_letter_exhausted(r, messages)
                if live:
                    await self.process(r, live)
            if not messages or start in (b"0-0", "0-0"):
                return

    async def _dead_letter_exhausted(self, r: RedisClient, messages: list) -> list:
        """Dead-letter the requests delivered more than `purchase_max_attempts` times."""
        ids = [m[0] for m in messages]
        pending = await r.xpending_range(self.stream, keys.PURCHASE_GROUP, min=ids[0],
                                         max=ids[-1], count=len(ids) * 2)
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        live = []
        for mid, fields in messages:
            tries = deliveries.get(mid, 0)
            if tries > self.settings.purchase_max_attempts:
                error = await r.hget(self.errors_key, mid)
                error = error.decode() if error else "unknown error"
                await self._dead_letter(r, mid, fields, f"{tries - 1} attempts failed: {error}")
            else:
                live.append((mid, fields))
        return live

    async def _dead_letter(self, r: RedisClient, mid, fields: dict, error: str) -> None:
        """Park a request with its error, settle it as failed, and let the partition go on."""
        pipe = r.pipeline(transaction=False)
        pipe.xadd(keys.dead_letter_stream(self.partition),
                  {"m": fields.get(b"m", b""), "error": error, "id": mid})
        pipe.xack(self.stream, keys.PURCHASE_GROUP, mid)
        pipe.hdel(self.errors_key, mid)
        await pipe.execute()
        self.dead_lettered += 1
        metrics.get("dead_letters").inc(tags={"partition": str(self.partition)})
        try:
            req = decode_request(fields)
        except PoisonRequest:
            return  # nothing to settle: no record can be found from it
        try:
            await self._give_up(r, req, error)
        except Exception as e:  # noqa: BLE001 — it is parked already; an operator replays it
            log.warning("partition %d: settling dead letter %s: %s", self.partition, mid, e)

    async def _give_up(self, r: RedisClient, req: dict, error: str) -> None:
        """A parked request fails unless it had committed; its offer lock is released."""
        ledger = Ledger(r)
        await self._settle_records(r, ledger, req["event_id"], [(req, "failed", error[:200])])
        committed = req.get("status") == "committed"
        await call(req["event_id"], "finish_purchases",
                   [(req["user_id"], "committed" if committed else "failed")])
        if committed:
            tickets = await self._tickets_of(r, req["event_id"], req["pid"])
            await ledger.index_tickets(req["event_id"], tickets)

    @staticmethod
    async def _tickets_of(r: RedisClient, event_id: str, pid: str) -> list[str]:
        raw = await r.hget(keys.purchase(event_id, pid), "tickets")
        return raw.decode().split(",") if raw else []

    # one batch -----------------------------------------------------------------------
    async def process(self, r: RedisClient, messages: list) -> None:
        """One batch: decode, group by event, run each event's requests, ack what settled."""
        started = time.perf_counter()
        self.batches += 1
        metrics.get("purchase_batch").observe(len(messages))
        by_event: dict[str, list[tuple[Any, dict]]] = defaultdict(list)
        for mid, fields in messages:
            try:
                req = decode_request(fields)
            except PoisonRequest as e:  # never retried: it would fail the same way
                await self._dead_letter(r, mid, fields, str(e))
                continue
            by_event[req["event_id"]].append((mid, req))
        ledger = Ledger(r)
        done = await asyncio.gather(*(self._run_event(r, ledger, eid, batch)
                                      for eid, batch in by_event.items()))
        done_ids = [mid for ids in done for mid in ids]
        if done_ids:
            await r.xack(self.stream, keys.PURCHASE_GROUP, *done_ids)
            self.processed += len(done_ids)
        metrics.get("commit_latency").observe(time.perf_counter() - started)

    async def _run_event(self, r: RedisClient, ledger: Ledger, event_id: str,
                         batch: list[tuple[Any, dict]]) -> list:
        """Settle one event's requests; returns the entry ids that may be acknowledged.

        When the batch fails, each request is retried alone so that one bad request
        leaves only itself pending (reclaimed, then dead-lettered) and not its neighbours.
        Retrying is safe: every step of `_process_event` is idempotent.
        """
        try:
            await self._process_event(r, ledger, event_id, [req for _, req in batch])
            return [mid for mid, _ in batch]
        except Exception as e:  # noqa: BLE001
            if isinstance(e, ActorDiedError):  # an idle line's actor left: a new one next
                forget(event_id)
            if len(batch) == 1:
                await self._note_failure(r, batch[0][0], event_id, e)
                return []
            log.warning("partition %d: event %s batch failed (%s); retrying one by one",
                        self.partition, event_id, e)
        done = []
        for mid, req in batch:
            try:
                await self._process_event(r, ledger, event_id, [req])
                done.append(mid)
            except Exception as e:  # noqa: BLE001 — left pending: reclaimed, retried
                await self._note_failure(r, mid, event_id, e)
        return done

    async def _note_failure(self, r: RedisClient, mid, event_id: str, e: Exception) -> None:
        log.warning("partition %d: request %s of event %s failed: %s", self.partition, mid,
                    event_id, e)
        try:
            await r.hset(self.errors_key, mid, f"{type(e).__name__}: {e}"[:500])
        except Exception:  # noqa: BLE001 — the error text is a courtesy, not a must
            pass

    async def _process_event(self, r: RedisClient, ledger: Ledger, event_id: str,
                             reqs: list[dict]) -> None:
        """Lock, charge, commit, settle and publish one event's requests."""
        fresh, committed = await stage("read", self._unsettled(ledger, event_id, reqs))
        blobs: dict[str, tuple[str, bytes]] = {}  # tickets committed now: owner, record
        fresh, outcomes = self._one_per_user(fresh)
        queue = get_queue(event_id)
        # A replayed commit may have died before settling the line: settle it again
        # (the line answers "already settled" when it had, which is fine).
        settle = [(q["user_id"], "committed") for q in committed]
        if fresh:
            locked = await stage("lock", self._lock(queue, fresh, outcomes))
            approved, declined = await stage("charge", self._charge(locked, outcomes))
            settle += [(q["user_id"], "declined") for q in declined]
            if approved:
                done, released = await stage("commit", self._commit(
                    ledger, event_id, approved, outcomes, blobs))
                committed += done
                settle += [(q["user_id"], "committed") for q in done]
                settle += [(q["user_id"], "declined") for q in released]
        # Settling the line and indexing the buyers' tickets are independent: overlap them.
        steps = []
        if settle:
            steps.append(queue.finish_purchases.remote(settle))
        if committed:
            steps.append(ledger.index_tickets(
                event_id, [t for q in committed for t in q["tickets"]], blobs))
            outcomes += [(q, "committed", "") for q in committed]
        await stage("settle", asyncio.gather(*steps))
        await stage("publish", self._settle_records(r, ledger, event_id, outcomes, blobs))

    async def _unsettled(self, ledger: Ledger, event_id: str, reqs: list[dict]
                         ) -> tuple[list[dict], list[dict]]:
        """Split requests into fresh ones and ones committed already (crash before ack).

        Requests settled otherwise (declined, rejected, failed) are dropped: their outcome
        was recorded and published before.
        """
        fresh, committed = [], []
        found = await ledger.statuses(event_id, [q["pid"] for q in reqs])
        for req, (status, tickets) in zip(reqs, found):
            if status == "committed":
                req["tickets"] = tickets
                committed.append(req)
            elif status is None or status not in FINAL:
                fresh.append(req)
        return fresh, committed

    @staticmethod
    def _one_per_user(reqs: list[dict]) -> tuple[list[dict], list[Outcome]]:
        """One offer buys once: a user's second request in the batch is refused up front.

        Without this both would pass the line's lock (a repeated lock is a no-op) and be
        charged; the ledger would still commit only one (its buyers guard).
        """
        pids: dict[str, str] = {}  # user -> the purchase id kept
        keep, refused = [], []
        for req in reqs:
            kept = pids.get(req["user_id"])
            if kept == req["pid"]:
                continue  # the same request delivered twice: settled once, acked with it
            if kept is not None:
                refused.append((req, "rejected", "already_purchased"))
            else:
                pids[req["user_id"]] = req["pid"]
                keep.append(req)
        return keep, refused

    @staticmethod
    async def _lock(queue, reqs: list[dict], outcomes: list[Outcome]) -> list[dict]:
        """Lock the offers in one actor call; a locked offer cannot expire mid-commit."""
        errors = await queue.begin_purchases.remote([(q["user_id"], q["quantity"]) for q in reqs])
        locked = []
        for req, err in zip(reqs, errors):
            if err is None:
                locked.append(req)
            else:
                outcomes.append((req, "rejected", getattr(err, "code", "no_offer")))
        return locked

    async def _charge(self, reqs: list[dict], outcomes: list[Outcome]
                      ) -> tuple[list[dict], list[dict]]:
        """Charge in one gateway call (idempotent by purchase id); (approved, declined)."""
        if not reqs:
            return [], []
        charged = await self.gateway.charge_many([
            {"purchase_id": q["pid"], "amount": q["unit_price"] * q["quantity"],
             "payment_reference": q["payment_reference"]} for q in reqs])
        approved, declined = [], []
        for req, (ok, _) in zip(reqs, charged):
            (approved if ok else declined).append(req)
        outcomes += [(q, "declined", "payment_declined") for q in declined]
        return approved, declined

    @staticmethod
    async def _commit(ledger: Ledger, event_id: str, reqs: list[dict], outcomes: list[Outcome],
                      blobs: dict[str, tuple[str, bytes]]) -> tuple[list[dict], list[dict]]:
        """One Lua call; returns (committed, refused-whose-hold-goes-back)."""
        done, released, offered = [], [], {}
        results = await ledger.commit(event_id, reqs, blobs_out=offered)
        for req, (status, detail) in zip(reqs, results):
            if status == "committed":  # what was offered is what is stored
                blobs.update((t, offered[t]) for t in detail)
            if status in ("committed", "duplicate"):
                req["tickets"] = detail
                done.append(req)
            else:
                outcomes.append((req, "rejected", str(detail)))
                if detail in RELEASE_REASONS:
                    released.append(req)
        return done, released

    async def _settle_records(self, r: RedisClient, ledger: Ledger, event_id: str,
                              outcomes: list[Outcome],
                              blobs: dict[str, tuple[str, bytes]] | None = None) -> None:
        """Record non-commit outcomes (never over a commit) and publish them all at once.

        Each outcome carries what its buyer's answer shows (quantity, and the records of
        the tickets committed now), so the replica holding the request answers without
        reading it all back: under a flash sale's load each round trip there cost the
        buyer ~80-150 ms (`eventpulse_purchase_request_stage_seconds`)."""
        if not outcomes:
            return
        others = [(i, o) for i, o in enumerate(outcomes) if o[1] != "committed"]
        stored = await ledger.settle(event_id, [(q["pid"], s, why) for _, (q, s, why) in others])
        outcomes = list(outcomes)
        for (i, (req, status, _)), now in zip(others, stored):
            if now == "committed":  # its twin committed it: that is the outcome
                req["status"] = now
                outcomes[i] = (req, now, "")
        blobs = blobs or {}

        def shown(req: dict, status: str, reason: str) -> dict[str, Any]:
            out = {"purchase_id": req["pid"], "event_id": event_id, "user_id": req["user_id"],
                   "status": status, "reason": reason, "quantity": req.get("quantity")}
            ids = req.get("tickets") or []
            if status == "committed" and ids and all(t in blobs for t in ids):
                out["tickets"] = [blobs[t][1] for t in ids]
            return out

        await r.publish(keys.PURCHASE_CHANNEL, msgpack.packb(
            [shown(req, status, reason) for req, status, reason in outcomes], use_bin_type=True))
        for _, status, _ in outcomes:
            metrics.get("purchases").inc(tags={"outcome": status})

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
    """Hosts one partition's consumer. `overrides` change settings (tests, benchmarks)."""

    def __init__(self, partition: int, overrides: dict[str, Any] | None = None) -> None:
        settings = get_settings()
        if overrides:
            settings = settings.model_copy(update=overrides)
        self.consumer = PartitionConsumer(partition, settings)
        self._task: asyncio.Task | None = None

    async def ensure_running(self) -> bool:
        """Start consuming unless already consuming; True if it started now.

        Ray restarts a dead consumer actor (max_restarts=-1) but not the call that was
        running in it, so a supervisor calls this periodically (`keep_running`).
        """
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.consumer.run())
            return True
        return False

    async def run(self) -> int:
        """Consume until stopped (one loop per actor, however often it is called)."""
        await self.ensure_running()
        assert self._task is not None
        return await asyncio.shield(self._task)

    async def stats(self) -> dict[str, Any]:
        return {**self.consumer.stats(), "pid": os.getpid()}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ray.init(namespace=NAMESPACE)
    settings = get_settings()
    env = {k: v for k, v in __import__("os").environ.items() if k.startswith("EVENTPULSE_")}
    actors = [ConsumerActor.options(scheduling_strategy="SPREAD",
                                    runtime_env={"env_vars": env} if env else None).remote(p)
              for p in range(settings.purchase_partitions)]
    log.info("purchase job: %d partition consumers running", len(actors))
    keep_running(actors)


def keep_running(actors: list, poll_s: float = 1.0, stop: Any = None) -> None:
    """Keep every consumer consuming until `stop` (a threading.Event) is set.

    A consumer that died is restarted by Ray; this restarts its loop. Calls to an actor
    that is restarting fail for a moment and are simply tried again on the next round.
    """
    while stop is None or not stop.is_set():
        for actor in actors:
            try:
                if ray.get(actor.ensure_running.remote(), timeout=30):
                    log.info("a consumer (re)started consuming")
            except (ray.exceptions.RayError, TimeoutError) as e:
                log.warning("consumer not answering (%s); trying again", type(e).__name__)
        time.sleep(poll_s)


if __name__ == "__main__":
    main()

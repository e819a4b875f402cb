"""bench scenarios end to end against a small in-process fake of the documented HTTP API
(no Event-Pulse server needed): run_smoke for each scenario, the oversell check, push
delays, the ramp's steps, and the compare tool."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web

from bench.smoke import run_smoke

# Signs the tokens the fake server checks. It starts with "-", as ~1 secret in 64 does.
SECRET = "-" + secrets.token_urlsafe(32)


class FakeApi:
    """Just enough of the API: one process, no persistence, instant offers."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.events: dict[str, dict[str, Any]] = {}
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}
        self.lines: dict[str, list[str]] = {}
        self.tickets: dict[str, list[dict[str, Any]]] = {}
        self.streams: dict[str, list[tuple[str, asyncio.Queue[Any]]]] = {}
        self.hits = 0

    def user(self, req: web.Request) -> str:
        tok = req.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            return jwt.decode(tok, SECRET, algorithms=["HS256"])["sub"]
        except jwt.PyJWTError:
            raise web.HTTPUnauthorized() from None

    def entry(self, eid: str, uid: str) -> dict[str, Any] | None:
        e = self.entries.get((eid, uid))
        if e is None:
            return None
        pos = self.lines[eid].index(uid) + 1 if e["status"] == "waiting" else None
        return {"event_id": eid, "user_id": uid, "status": e["status"], "position": pos,
                "eta_seconds": None, "quantity": e["quantity"], "offer": e["offer"]}

    def pump(self, eid: str) -> None:
        ev = self.events[eid]
        line = self.lines[eid]
        while line and not ev["paused"]:
            live = sum(1 for (e, _), x in self.entries.items() if e == eid
                       and x["status"] == "offered")
            if ev["max_live_offers"] is not None and live >= ev["max_live_offers"]:
                break
            uid = line[0]
            q = self.entries[(eid, uid)]["quantity"]
            if ev["total"] - ev["sold"] - ev["held"] < q:
                break
            line.pop(0)
            ev["held"] += q
            self.entries[(eid, uid)].update(status="offered",
                                            offer={"quantity": q, "expires_at": time.time() + 60})
        for uid, queue in self.streams.get(eid, []):
            queue.put_nowait(self.entry(eid, uid))

    def j(self, data: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(data), status=status,
                            content_type="application/json")

    async def healthz(self, req: web.Request) -> web.Response:
        return self.j({"ok": True})

    async def create(self, req: web.Request) -> web.Response:
        self.user(req)
        b = await req.json()
        eid = f"ev{next(self.ids)}"
        self.events[eid] = {"id": eid, "name": b["name"], "total": b["total_tickets"], "sold": 0,
                            "held": 0, "paused": False, "max_live_offers": None}
        self.lines[eid] = []
        return self.j({"id": eid, "name": b["name"]}, 201)

    async def event(self, req: web.Request) -> web.Response:
        self.hits += 1
        return self.j(self.events[req.match_info["eid"]])

    async def availability(self, req: web.Request) -> web.Response:
        ev = self.events[req.match_info["eid"]]
        rem = ev["total"] - ev["sold"] - ev["held"]
        return self.j({"total": ev["total"], "sold": ev["sold"], "held": ev["held"],
                       "remaining": rem, "sold_out": ev["sold"] >= ev["total"]})

    async def join(self, req: web.Request) -> web.Response:
        uid, eid = self.user(req), req.match_info["eid"]
        q = (await req.json())["quantity"]
        if (eid, uid) not in self.entries:
            self.entries[(eid, uid)] = {"status": "waiting", "quantity": q, "offer": None}
            self.lines[eid].append(uid)
            self.pump(eid)
        return self.j(self.entry(eid, uid), 201)

    async def me(self, req: web.Request) -> web.Response:
        e = self.entry(req.match_info["eid"], self.user(req))
        return self.j(e) if e else self.j({"error": {"code": "not_found", "message": "-"}}, 404)

    async def position(self, req: web.Request) -> web.Response:
        self.user(req)
        e = self.entry(req.query["eventId"], req.query["userId"])
        return self.j(e) if e else self.j({"error": {"code": "not_found", "message": "-"}}, 404)

    async def leave(self, req: web.Request) -> web.Response:
        uid, eid = self.user(req), req.match_info["eid"]
        self.lines[eid].remove(uid)
        self.entries[(eid, uid)]["status"] = "left"
        self.pump(eid)
        return self.j(self.entry(eid, uid))

    async def stream(self, req: web.Request) -> web.StreamResponse:
        uid, eid = self.user(req), req.match_info["eid"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(req)
        except ConnectionResetError:
            return resp
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.streams.setdefault(eid, []).append((uid, queue))
        queue.put_nowait(self.entry(eid, uid))
        try:
            while True:
                try:
                    e = await asyncio.wait_for(queue.get(), 1.0)
                    await resp.write(b"data: " + orjson.dumps(e) + b"\n\n")
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except ConnectionResetError:  # the client went away
            pass
        finally:
            self.streams[eid].remove((uid, queue))

    async def purchase(self, req: web.Request) -> web.Response:
        uid, eid = self.user(req), req.match_info["eid"]
        assert req.headers["Idempotency-Key"]
        b = await req.json()
        assert b["payment_reference"].startswith("test_ok_")
        e = self.entries.get((eid, uid))
        if e is None or e["status"] != "offered":
            return self.j({"error": {"code": "no_offer", "message": "-"}}, 409)
        ev = self.events[eid]
        ev["held"] -= e["quantity"]
        ev["sold"] += e["quantity"]
        e.update(status="purchased", offer=None)
        t = {"id": f"t{next(self.ids)}", "event_id": eid, "status": "valid",
             "quantity": e["quantity"], "purchased_at": time.time()}
        self.tickets.setdefault(uid, []).append(t)
        self.pump(eid)
        return self.j({"purchase_id": "p1", "status": "committed", "tickets": [t]}, 201)

    async def tickets_of(self, req: web.Request) -> web.Response:
        self.user(req)
        ts = self.tickets.get(req.match_info["uid"], [])
        if "eventId" in req.query:
            ts = [t for t in ts if t["event_id"] == req.query["eventId"]]
        return self.j(ts)

    async def admin_queue(self, req: web.Request) -> web.Response:
        self.user(req)
        eid = req.match_info["eid"]
        b = await req.json()
        ev = self.events[eid]
        if "paused" in b:
            ev["paused"] = b["paused"]
        if "max_live_offers" in b:
            ev["max_live_offers"] = b["max_live_offers"]
        self.pump(eid)
        return self.j({"ok": True})

    async def stats(self, req: web.Request) -> web.Response:
        self.user(req)
        return self.j({"cache": {"events": {"hits": self.hits, "misses": 1}}, "replicas": 1})

    def app(self) -> web.Application:
        a = web.Application()
        r = a.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/noop/", self.healthz)
        r.add_post("/api/events", self.create)
        r.add_get("/api/events/{eid}", self.event)
        r.add_get("/api/events/{eid}/availability", self.availability)
        r.add_post("/api/events/{eid}/queue", self.join)
        r.add_get("/api/events/{eid}/queue/me", self.me)
        r.add_delete("/api/events/{eid}/queue/me", self.leave)
        r.add_get("/api/events/{eid}/queue/me/stream", self.stream)
        r.add_get("/api/queue/position", self.position)
        r.add_post("/api/events/{eid}/purchases", self.purchase)
        r.add_get("/api/users/{uid}/tickets", self.tickets_of)
        r.add_patch("/api/admin/events/{eid}/queue", self.admin_queue)
        r.add_get("/api/admin/stats", self.stats)
        return a


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeApi]]:
    api = FakeApi()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        runner = web.AppRunner(api.app(), shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    assert started.wait(10)
    yield f"http://127.0.0.1:{holder['port']}", api
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_seed_mix_smoke(fake: tuple[str, FakeApi], tmp_path: Path) -> None:
    url, _ = fake
    rep = run_smoke(url, SECRET, "seed-mix", out=tmp_path)
    routes = rep["routes"]
    for r in ("healthz", "availability", "queue_position", "event", "user_tickets", "join"):
        assert routes[r]["count"] >= 1, r
    assert rep["totals"]["errors"] == 0
    assert routes["join"]["count"] == 4
    assert rep["counters"]["joined"] == 4
    assert rep["server"]["available"] is True
    assert (tmp_path / "report.json").exists()
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert rep["elapsed_s"] < 10


def test_flash_sale_smoke_sells_exactly_capacity(fake: tuple[str, FakeApi],
                                                 tmp_path: Path) -> None:
    url, _ = fake
    rep = run_smoke(url, SECRET, "flash-sale", out=tmp_path)
    res = rep["result"]
    assert res["joined"] == 6
    assert res["purchased"] == 3
    assert res["offer_to_ticket_ms"]["count"] == 3
    assert res["joins_per_s"] > 0
    assert res["join_answers_per_s"] >= res["joins_per_s"]
    assert res["oversell"]["ok"] is True
    assert res["oversell"]["sold"] == 3 and res["oversell"]["tickets_held_by_users"] == 3
    assert rep["counters"].get("read_your_writes_ok") == 3
    assert rep["counters"].get("offer_via_sse") == 3
    assert rep["elapsed_s"] < 20


def test_waiting_crowd_measures_push_delays(fake: tuple[str, FakeApi], tmp_path: Path) -> None:
    url, _ = fake
    rep = run_smoke(url, SECRET, "waiting-crowd", out=tmp_path)
    res = rep["result"]
    assert res["joined"] == 5 and res["open_streams_max"] == 5
    assert [r["expected"] for r in res["rounds"]] == [4, 3]
    assert res["missed_pushes"] == 0
    assert res["push_delay_ms"]["count"] == 7
    assert res["push_delay_ms"]["p95"] < 2000


def test_waiting_crowd_offers_move(fake: tuple[str, FakeApi], tmp_path: Path) -> None:
    url, _ = fake
    rep = run_smoke(url, SECRET, "waiting-crowd", out=tmp_path, move="offers")
    res = rep["result"]
    assert res["missed_pushes"] == 0 and res["push_delay_ms"]["count"] == 7


def test_ramp_smoke_reaches_max_users(fake: tuple[str, FakeApi], tmp_path: Path) -> None:
    url, _ = fake
    rep = run_smoke(url, SECRET, "ramp", out=tmp_path)
    res = rep["result"]
    assert [s["users"] for s in res["steps"]] == [2, 4]
    assert res["held_users"] == 4 and "max-users" in res["stop_reason"]


def test_ramp_stops_when_kpi_breaks(fake: tuple[str, FakeApi], tmp_path: Path) -> None:
    from bench.kpi import Kpis
    url, _ = fake
    rep = run_smoke(url, SECRET, "ramp", out=tmp_path, kpis=Kpis(p95_s=0.0))
    res = rep["result"]
    assert len(res["steps"]) == 1 and res["held_users"] == 0
    assert "p95" in res["stop_reason"]


def test_max_requests_bounds_the_run(fake: tuple[str, FakeApi], tmp_path: Path) -> None:
    url, _ = fake
    rep = run_smoke(url, SECRET, "seed-mix", out=tmp_path, max_requests=30, duration_s=30.0,
                    think=(0.0, 0.01))
    assert rep["totals"]["requests"] <= 30 + 4 * 1  # in-flight overshoot at most one per VU
    assert rep["elapsed_s"] < 10


def test_compare_reports_ratios(fake: tuple[str, FakeApi], tmp_path: Path) -> None:
    from bench.compare import main
    url, _ = fake
    assert main(["--url", url, "--floor-url", url + "/noop/", f"--secret={SECRET}", "-c", "4",
                 "--duration", "0.5", "--warmup", "0", "--users", "4",
                 "--out", str(tmp_path)]) == 0
    rep = orjson.loads((tmp_path / "compare.json").read_bytes())
    assert set(rep["routes"]) == {"floor_healthz", "floor_noop", "queue_position",
                                  "availability", "user_tickets"}
    for r in rep["routes"].values():
        assert r["requests"] > 0 and r["errors"] == 0
        assert set(r["ratio"]) == {"floor_healthz", "floor_noop"}
    assert rep["routes"]["floor_healthz"]["ratio"]["floor_healthz"] == 1.0

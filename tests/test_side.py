"""The side server (`serve/side.py`): the replicas' own aiohttp servers behind the session's real
HAProxy, answering the hottest per-user routes exactly as the app does."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import secrets

import aiohttp
import orjson
import pytest

from tests.conftest import replica_stats, unique


async def _side_backend() -> dict[str, str]:
    """HAProxy's stats row of the side server backend (its stats page, as CSV)."""
    port = os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/stats;csv") as r:
        rows = csv.DictReader(io.StringIO((await r.text()).lstrip("# ")))
        return next(row for row in rows if row["pxname"] == "ep_side" and row["svname"] == "BACKEND")


async def _side_up() -> None:
    """Until HAProxy has sent the side server's routes to the side server for a while (up to 60 s).

    Until its health check sees the side server up, HAProxy sends the side server's routes to Serve, as
    it does when a node has no replica up. Serve reloads HAProxy as the app's replicas come
    up, and a new HAProxy process starts with the side server as the last state dump saw it, which
    may be before it was up: so also until the newest HAProxy process is 3 s old."""
    import time

    import psutil

    base = os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    for _ in range(120):
        row = await _side_backend()
        started = max((p.info["create_time"] for p in psutil.process_iter(["cmdline", "create_time"])
                       if base in " ".join(p.info.get("cmdline") or ())), default=0.0)
        if row["status"] == "UP" and time.time() - started >= 3:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"HAProxy never settled with the side server up: {row}")


async def _side_served(http, auth_headers) -> int:
    """Requests the replicas' side servers have taken so far, once the side server is up. Each replica
    counts its own (`/api/admin/stats`, which Serve answers: asked until every running
    replica has). Counted where the requests arrive, not in HAProxy's stats, which a
    reload of HAProxy starts again from zero."""
    await _side_up()
    return sum(s["side"]["requests"] for s in await replica_stats(http, auth_headers))


async def test_haproxy_sends_the_sides_routes_to_the_side(serve_url, auth_headers, make_event,
                                                         app_env, purchase_job):
    # A connection per request: Serve reloads HAProxy as replicas come up, and an old
    # process keeps serving the connections it has with the config it had.
    async with aiohttp.ClientSession(serve_url, connector=aiohttp.TCPConnector(force_close=True)
                                     ) as http:
        await _routes_go_to_the_side(http, auth_headers, make_event, app_env)


async def _routes_go_to_the_side(http, auth_headers, make_event, app_env) -> None:
    event = await make_event(total_tickets=5)
    u = unique()
    before = await _side_served(http, auth_headers)
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                         headers=auth_headers(u)) as r:
        assert r.status == 200 and (await r.json())["status"] == "offered"
    for path in (f"/api/events/{event['id']}/queue/me",
                 f"/api/queue/position?eventId={event['id']}&userId={u}",
                 f"/api/users/{u}/tickets"):
        async with http.get(path, headers=auth_headers(u)) as r:
            assert r.status == 200, (path, await r.text())
    assert await _side_served(http, auth_headers) - before == 4
    # the offer bought on the side server; the same Idempotency-Key through Serve (a query the
    # side server's routing leaves out) answers the same purchase
    buy = {"quantity": 1, "payment_reference": "test_ok_side"}
    key = {**auth_headers(u), "Idempotency-Key": f"side-{unique()}"}
    before = await _side_served(http, auth_headers)
    async with http.post(f"/api/events/{event['id']}/purchases?wait=5", json=buy,
                         headers=key) as r:
        bought = await r.json()
        assert r.status == 201 and bought["status"] == "committed", bought
    assert await _side_served(http, auth_headers) - before == 1
    async with http.post(f"/api/events/{event['id']}/purchases?wait=5&x=1", json=buy,
                         headers=key) as r:
        assert r.status == 201 and (await r.json())["purchase_id"] == bought["purchase_id"]
    assert await _side_served(http, auth_headers) - before == 1
    before = await _side_served(http, auth_headers)
    for query in ("fields=id", f"eventId={event['id']}", f"eventId={event['id']}&fields=id,status",
                  "fields=password"):  # the last one the side server refuses as the app does (422)
        async with http.get(f"/api/users/{u}/tickets?{query}", headers=auth_headers(u)) as r:
            assert r.status == (422 if "password" in query else 200), query
    assert await _side_served(http, auth_headers) - before == 4
    # a public read the edge verified but has not cached (a new event's) goes to the side server
    before = await _side_served(http, auth_headers)
    for path in (f"/api/events/{event['id']}", f"/api/events/{event['id']}/availability"):
        async with http.get(path, headers=auth_headers(u)) as r:
            assert r.status == 200 and (await r.json())["total_tickets" if "avail" not in path
                                                         else "total"] == 5
    assert await _side_served(http, auth_headers) - before == 2
    # anything else still goes through Serve: not counted on the side server
    before = await _side_served(http, auth_headers)
    async with http.get(f"/api/users/{u}/tickets?fields=id&x=1", headers=auth_headers(u)) as r:
        assert r.status == 200
    async with http.get(f"/api/events/{event['id']}/queue/me/stream?x=1",
                        headers=auth_headers(u)) as r:
        assert r.status == 200
    await asyncio.sleep(0.5)
    assert await _side_served(http, auth_headers) == before


async def test_the_side_answers_as_the_app_does(http, auth_headers, make_event, app_env):
    """The same requests straight to a replica's side server and through the ingress to Serve
    (a query string the side server's routing leaves out sends them to FastAPI's twin)."""
    event = await make_event(total_tickets=5)
    side = f"http://127.0.0.1:{app_env['EVENTPULSE_SIDE_PORT']}"
    me, other = unique(), unique()
    buy = {"quantity": 1, "payment_reference": "test_ok_side"}

    def key(user: str) -> dict[str, str]:
        return {**auth_headers(user), "Idempotency-Key": f"k-{secrets.token_hex(8)}"}
    async with aiohttp.ClientSession(side) as direct:
        async with direct.get("/healthz") as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
        async with direct.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                               headers=auth_headers(me)) as r:
            assert r.status == 200 and (await r.json())["status"] == "offered"
        cases = [
            ("GET", f"/api/events/{event['id']}/queue/me", auth_headers(me), None),
            ("GET", f"/api/events/{event['id']}/queue/me", {}, None),                  # 401
            ("GET", f"/api/users/{me}/tickets", auth_headers(me), None),
            ("GET", f"/api/users/{me}/tickets", auth_headers(other), None),            # 403
            ("GET", f"/api/users/{me}/tickets?eventId={event['id']}&fields=id", auth_headers(me),
             None),
            ("GET", f"/api/users/{me}/tickets?fields=password", auth_headers(me), None),  # 422
            ("GET", "/api/events/nope/queue/me", auth_headers(me), None),              # 404
            # the edge cache's misses
            ("GET", f"/api/events/{event['id']}", auth_headers(me), None),
            ("GET", f"/api/events/{event['id']}", {}, None),                           # 401
            ("GET", f"/api/events/{event['id']}/availability", auth_headers(me), None),
            ("GET", "/api/events/nope/availability", auth_headers(me), None),          # 404
            ("POST", f"/api/events/{event['id']}/queue", auth_headers(me), {"quantity": 1}),
            ("POST", f"/api/events/{event['id']}/queue", auth_headers(other), {"quantity": 0}),
            ("POST", f"/api/events/{event['id']}/queue", auth_headers(other), {"seats": 2}),
            ("POST", "/api/events/nope/queue", auth_headers(other), {"quantity": 1}),
            # a bad token and a bad body: the token is refused first, as FastAPI does
            ("POST", f"/api/events/{event['id']}/queue", {"Authorization": "Bearer x.y.z"},
             {"quantity": 0, "ticket_type": True}),
            # purchases: what is not exactly as documented the side server has the app answer
            ("POST", f"/api/events/{event['id']}/purchases?wait=2", key(other), buy),  # 409
            ("POST", f"/api/events/{event['id']}/purchases", key(other), buy),         # 409
            ("POST", f"/api/events/{event['id']}/purchases", auth_headers(other), buy),  # 422
            ("POST", f"/api/events/{event['id']}/purchases",
             {**auth_headers(other), "Idempotency-Key": "short"}, buy),                # 422
            ("POST", f"/api/events/{event['id']}/purchases?wait=30.5", key(other), buy),  # 422
            ("POST", f"/api/events/{event['id']}/purchases", key(other),
             {"quantity": 0, "payment_reference": "x"}),                               # 422
            ("POST", f"/api/events/{event['id']}/purchases", key(me), {"quantity": 3,
             "payment_reference": "x"}),                                               # 400
            ("POST", f"/api/events/{event['id']}/purchases", auth_headers(other),
             {"quantity": 0}),                                                         # 422 x3
            ("POST", f"/api/events/{event['id']}/purchases",
             {"Authorization": "Bearer x.y.z", "Idempotency-Key": "k" * 9}, buy),        # 401
            ("POST", "/api/events/nope/purchases", key(other), buy),                  # 404
        ]
        for method, path, headers, body in cases:
            async with direct.request(method, path, headers=headers, json=body) as r:
                on_side = (r.status, await r.json())
            via_serve = path + ("&" if "?" in path else "?") + "via=serve"
            async with http.request(method, via_serve, headers=headers, json=body) as r:
                on_serve = (r.status, await r.json())
            if on_side[0] == 200 and "position" in on_side[1]:
                for answer in (on_side[1], on_serve[1]):
                    answer.pop("eta_seconds", None)  # moves with the clock
            assert on_side == on_serve, (method, path, on_side, on_serve)
        async with direct.post(f"/api/events/{event['id']}/queue", data=b"{" * 70_000,
                               headers={**auth_headers(other), "Content-Type": "application/json"}
                               ) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
        async with direct.post(f"/api/events/{event['id']}/queue", data=b"not json",
                               headers={**auth_headers(other), "Content-Type": "application/json"}
                               ) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "malformed_json"
        async with direct.get("/api/events", headers=auth_headers(me)) as r:
            assert r.status == 404  # not a side server route: HAProxy never sends it here


@pytest.mark.parametrize("via", ["side", "serve"])
async def test_a_stream_pushes_the_entry_as_it_changes(http, auth_headers, make_event, app_env,
                                                       via):
    """Through the ingress to the side server (or, with a query the side server's routes do
    not take, to FastAPI's route on Serve's path): the opening event, then a push when the
    line moves (the entry ahead leaves), then the stream ends when the client goes."""
    event = await make_event(total_tickets=1)
    first, me = unique(), unique()
    for u in (first, me):
        async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                             headers=auth_headers(u)) as r:
            assert r.status == 200
    before = await _side_served(http, auth_headers)
    query = "" if via == "side" else "?via=serve"
    async with http.get(f"/api/events/{event['id']}/queue/me/stream{query}",
                        headers=auth_headers(me)) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")

        async def next_entry() -> dict:
            while True:
                line = await asyncio.wait_for(stream.content.readline(), 30)
                if line.startswith(b"data:"):
                    return orjson.loads(line[5:])

        opening = await next_entry()
        assert opening["status"] == "waiting" and opening["position"] == 1
        async with http.delete(f"/api/events/{event['id']}/queue/me",
                               headers=auth_headers(first)) as r:
            assert r.status == 200
        assert (await next_entry())["status"] == "offered"
    assert await _side_served(http, auth_headers) - before == (via == "side")  # the stream
    side = f"http://127.0.0.1:{app_env['EVENTPULSE_SIDE_PORT']}"
    async with aiohttp.ClientSession(side) as s, \
            s.get(f"/api/events/{event['id']}/queue/me/stream") as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"


async def test_the_side_takes_haproxys_word_for_a_signature_only_with_the_proof(
        http, auth_headers, make_event, app_env, test_secret):
    """HAProxy checks a side server request's token signature and says so (`cluster/haproxy.py`);
    the side server then reads only the claims. A token signed with another secret shows what
    that word is worth: taken with the proof HAProxy sends and the very signature it
    checked, refused with anything less, and through the ingress (which strips what a
    client claims) refused whatever the client adds."""
    from eventpulse.auth import edge_proof, mint_token

    event = await make_event(total_tickets=5)
    u = unique()
    another = secrets.token_urlsafe(32)  # not the app's secret
    forged = mint_token(u, secret=another)
    path = f"/api/events/{event['id']}/queue"
    proof = edge_proof(test_secret)
    word = {"Authorization": f"Bearer {forged}", "X-EP-Verified": forged.rsplit(".", 1)[1]}
    side = f"http://127.0.0.1:{app_env['EVENTPULSE_SIDE_PORT']}"
    async with aiohttp.ClientSession(side) as direct:
        for headers in ({**word, "X-EP-Proof": "0" * 64},
                        {**word, "X-EP-Proof": proof, "X-EP-Verified": "another-signature"},
                        {"Authorization": f"Bearer {forged}", "X-EP-Proof": proof}):
            async with direct.post(path, json={"quantity": 1}, headers=headers) as r:
                assert r.status == 401, headers
        async with direct.post(path, json={"quantity": 1}, headers={**word, "X-EP-Proof": proof}) as r:
            assert r.status == 200 and (await r.json())["status"] == "offered"
    other = unique()
    forged = mint_token(other, secret=another)
    made_up = {"Authorization": f"Bearer {forged}", "X-EP-Verified": forged.rsplit(".", 1)[1],
               "X-EP-Proof": proof}
    await _side_up()  # this goes there
    async with http.post(path, json={"quantity": 1}, headers=made_up) as r:
        assert r.status == 401
    async with http.post(path, json={"quantity": 1}, headers=auth_headers(other)) as r:
        assert r.status == 200  # a real token, vouched for by HAProxy


async def test_the_side_counts_a_client_that_left_as_499():
    """A side server of this process: a client sends half a join's body and goes. aiohttp cancels
    the handler waiting for the rest; the side server frees its slot and counts the request as
    499, as `Guard` counts a client that left Serve's path."""
    from eventpulse import metrics
    from serve import fastpath, side
    from serve.runtime import get_runtime
    from tests.conftest import free_port

    key = ("http_requests", (("route", fastpath.JOIN), ("method", "POST"), ("status", "499")))
    flushed: list[float] = []  # counts handed to Ray meanwhile leave the aggregate
    metrics.aggregate.on_flush(lambda: flushed.append(metrics.aggregate._counts.get(key, 0)))

    def counted() -> float:
        return sum(flushed) + metrics.aggregate._counts.get(key, 0)

    before = counted()
    rt = get_runtime()
    busy = rt.in_flight
    port = free_port()
    server = await side.start(port, None)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/events/e1/queue HTTP/1.1\r\nHost: side\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"quan")
        await writer.drain()
        for _ in range(200):
            if rt.in_flight > busy:
                break
            await asyncio.sleep(0.01)
        assert rt.in_flight == busy + 1  # waiting for the rest of the body
        writer.close()
        for _ in range(200):
            if rt.in_flight == busy:
                break
            await asyncio.sleep(0.01)
        assert rt.in_flight == busy
        assert counted() - before == 1
    finally:
        server.close()
        await server.wait_closed()

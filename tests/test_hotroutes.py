"""The hot routes' table (`serve/hotroutes.py`) and everything derived from it: the fast
path's matcher, the side server's routes, HAProxy's rules and FastAPI's limits agree, so a
request gets the same answer whichever server HAProxy sends it to."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest

from serve import hotroutes as H

E64, E65, E128 = "e" * 64, "e" * 65, "e" * 128
U128, U129 = "u" * 128, "u" * 129
JSON = {"Content-Type": "application/json"}

# method, path, query, headers, the route the fast path matches (None: FastAPI answers)
CASES = [
    ("GET", "/healthz", "", {}, H.HEALTH),
    ("GET", "/healthz", "x=1", {}, None),
    ("GET", "/api/events/e1", "", {}, H.EVENT),
    ("GET", "/api/events/e1/availability", "", {}, H.AVAILABILITY),
    ("GET", "/x/events/e1/availability", "", {}, None),
    ("GET", "/api/events/e1/queue/me", "", {}, H.QUEUE_ME),
    ("GET", "/api/events/e1/queue/me", "via=serve", {}, None),
    ("GET", "/api/events/e1/queue/me/stream", "", {}, H.STREAM),
    ("GET", "/api/events/e1/queue/me/stream", "access_token=t.o.k", {}, H.STREAM),
    ("GET", "/api/events/e1/queue/me/stream", "access_token=t&x=1", {}, None),
    ("GET", "/api/queue/position", "eventId=e1&userId=u1", {}, H.POSITION),
    ("GET", "/api/queue/position", "userId=u1&eventId=e1", {}, H.POSITION),
    ("GET", "/api/queue/position", f"eventId={E64}&userId={U128}", {}, H.POSITION),
    ("GET", "/api/queue/position", f"eventId={E65}&userId=u1", {}, None),   # FastAPI's 422
    ("GET", "/api/queue/position", f"eventId={E128}&userId=u1", {}, None),  # FastAPI's 422
    ("GET", "/api/queue/position", f"eventId=e1&userId={U129}", {}, None),
    ("GET", "/api/queue/position", "eventId=e1", {}, None),
    ("GET", "/api/queue/position", "eventId=&userId=u1", {}, None),
    ("GET", "/api/users/u1/tickets", "", {}, H.TICKETS),
    ("GET", "/api/users/u1/tickets", "eventId=e1", {}, H.TICKETS),
    ("GET", "/api/users/u1/tickets", "fields=id,status&eventId=e1", {}, H.TICKETS),
    ("GET", "/api/users/u1/tickets", f"eventId={E65}", {}, None),
    ("GET", "/api/users/u1/tickets", "fields=" + "f" * 501, {}, None),
    ("GET", "/api/users/u1/tickets", "sort=id", {}, None),
    ("POST", "/api/events/e1/queue", "", JSON, H.JOIN),
    ("POST", "/api/events/e1/queue", "via=serve", JSON, None),
    ("POST", "/api/events/e1/purchases", "", JSON, H.PURCHASE),
    ("POST", "/api/events/e1/purchases", "wait=2.5", JSON, H.PURCHASE),
    ("POST", "/api/events/e1/purchases", "wait=30", JSON, H.PURCHASE),
    ("POST", "/api/events/e1/purchases", "wait=31", JSON, None),
    ("POST", "/api/events/e1/purchases", "wait=soon", JSON, None),
    ("GET", "/api/events", "", {}, None),
    ("DELETE", "/api/events/e1/queue/me", "", {}, None),
]


@pytest.mark.parametrize("method, path, query, headers, route", CASES)
def test_the_fast_path_matches_exactly_the_tables_shapes(method, path, query, headers, route):
    found = H.match(method, path, query.encode())
    assert (found[0] if found else None) == (route.path if route else None)


def test_the_tables_limits_are_fastapis():
    """Each route's FastAPI twin takes what the table takes (a request the fast path turns
    down is FastAPI's to refuse, with the one validation answer)."""
    from serve.app import api

    limits = {}
    routes = [r for top in api.routes
              for r in getattr(getattr(top, "original_router", None), "routes", [top])]
    for r in routes:
        for dep in getattr(getattr(r, "dependant", None), "query_params", []):
            meta = {type(m).__name__: m for m in dep.field_info.metadata}
            if "MaxLen" in meta:
                limits[(r.path, dep.alias)] = meta["MaxLen"].max_length
    for route in H.ROUTES:
        for p in route.query:
            if p.name not in ("access_token", "wait"):  # a header's stand-in; a number
                assert limits[(route.path, p.name)] == p.max_len, (route.path, p.name)


def _where(side_port: int, serve_port: int, expected: list[tuple[str, str, str, dict]]
           ) -> list[str]:
    """Which backend the real HAProxy, on the config `cluster.haproxy` renders, sends
    each request to: two small servers that answer with their own name."""
    from aiohttp import ClientConnectionError, ClientSession, web

    async def run(port: int) -> list[str]:
        runners = []
        for name, where in (("side", side_port), ("serve", serve_port)):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}",
                                 lambda _r, name=name: web.json_response({"at": name}))
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", where).start()
            runners.append(runner)
        try:
            async with ClientSession(f"http://127.0.0.1:{port}") as s:
                for _ in range(100):  # until HAProxy's health check sees the side server up
                    try:
                        async with s.get("/api/events/e1/queue/me") as r:
                            if (await r.json())["at"] == "side":
                                break
                    except (ClientConnectionError, ValueError):
                        pass
                    await asyncio.sleep(0.1)
                out = []
                for method, path, query, headers in expected:
                    url = path + (f"?{query}" if query else "")
                    async with s.request(method, url, headers=headers, data=b"{}") as r:
                        out.append((await r.json()).get("at", "haproxy"))  # its /healthz
                return out
        finally:
            for runner in runners:
                await runner.cleanup()

    return run


def test_haproxy_sends_the_lane_exactly_what_the_lane_matches(tmp_path):
    """The real HAProxy on the rendered rules: a request it sends to the side server is one the
    side server's matcher takes; every side-server route's valid shape goes there; the rest, the
    `eventId` of 65-128 characters among them, to Serve (whose FastAPI answers 422)."""
    from cluster.haproxy import edit, haproxy_binary
    from tests.conftest import free_port
    from tests.test_haproxy_edge import SERVE_SHAPED

    side_port, serve_port, port = free_port(), free_port(), free_port()
    (tmp_path / "500.http").write_bytes(b"HTTP/1.1 500 x\r\nContent-Length: 0\r\n\r\n")
    config = SERVE_SHAPED.format(serve_500=tmp_path / "500.http", port=port).replace(
        "127.0.0.1:9 check", f"127.0.0.1:{serve_port} check")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(edit(config, unavailable=tmp_path / "500.http", edge=False,
                        side_port=side_port))
    requests = [(m, p, q, h) for m, p, q, h, _ in CASES]
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(cfg)], env={"PATH": "/usr/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = asyncio.run(_where(side_port, serve_port, requests)(port))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    for (method, path, query, headers, route), at in zip(CASES, seen):
        to_side = route is not None and route.side and not route.edge
        expected = "haproxy" if path == H.HEALTH.path else "side" if to_side else "serve"
        assert at == expected, (method, path, query, at)


async def test_a_too_long_event_id_gets_one_answer_on_every_path(http, auth_headers):
    """`/api/queue/position` with an `eventId` of 65-128 characters: 422 through the
    ingress, on the fast path's and on FastAPI's way alike (documented in OpenAPI)."""
    for event_id in (E65, E128):
        answers = set()
        for extra in ("", "&via=serve"):
            async with http.get(f"/api/queue/position?eventId={event_id}&userId=u1{extra}",
                                headers=auth_headers("u1")) as r:
                answers.add((r.status, (await r.json())["error"]["code"]))
        assert answers == {(422, "invalid_input")}
    async with http.get("/openapi.json") as r:
        spec = await r.json()
    (event_param,) = [p for p in spec["paths"]["/api/queue/position"]["get"]["parameters"]
                      if p["name"] == "eventId"]
    assert event_param["schema"]["maxLength"] == H.EVENT_ID_MAX

"""The load generator's keep-alive HTTP client (`bench.http.Worker.call`) against real
servers on 127.0.0.1: an aiohttp app for the ordinary answers, and raw asyncio servers for
what a well-behaved framework never does (closing idle connections mid-race, cutting a
body short, a close-delimited body). Each test runs its own event loop (`asyncio.run`)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from bench.http import Budget, Worker


class App:
    """An aiohttp app that remembers what it was sent and on which connections."""

    def __init__(self) -> None:
        self.peers: set[Any] = set()   # client (host, port) pairs: one per connection
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: list[dict[str, Any]] = []

    def note(self, req: web.Request) -> None:
        assert req.transport is not None
        self.peers.add(req.transport.get_extra_info("peername"))

    async def echo(self, req: web.Request) -> web.Response:
        self.note(req)
        raw = await req.read()
        got = {"method": req.method, "path": req.path, "query": dict(req.query),
               "headers": dict(req.headers), "body": orjson.loads(raw) if raw else None}
        self.seen.append(got)
        return web.json_response(got)

    async def status(self, req: web.Request) -> web.Response:
        self.note(req)
        code = int(req.match_info["code"])
        headers = {"Retry-After": "7"} if code == 429 else None
        return web.json_response({"error": {"code": code}}, status=code, headers=headers)

    async def chunked(self, req: web.Request) -> web.StreamResponse:
        self.note(req)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        for part in (b'{"items": [', b"1, 2, ", b"3]}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def slow(self, req: web.Request) -> web.Response:
        self.note(req)
        await asyncio.sleep(float(req.query.get("s", "2")))
        return web.json_response({"slow": True})

    async def busy(self, req: web.Request) -> web.Response:
        self.note(req)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        return web.json_response({"ok": True})

    async def close(self, req: web.Request) -> web.Response:
        self.note(req)
        resp = web.json_response({"closing": True})
        resp.force_close()  # answers with `Connection: close`
        return resp

    def app(self) -> web.Application:
        a = web.Application()
        a.router.add_route("*", "/echo", self.echo)
        a.router.add_get("/status/{code}", self.status)
        a.router.add_get("/chunked", self.chunked)
        a.router.add_get("/slow", self.slow)
        a.router.add_get("/busy", self.busy)
        a.router.add_get("/close", self.close)
        return a


def run_with_app(test: Callable[[str, App], Awaitable[None]], **site: Any) -> App:
    """Serve an `App` on an ephemeral port, run `test(base_url, app)` against it."""
    state = App()

    async def go() -> None:
        runner = web.AppRunner(state.app(), shutdown_timeout=0.2, **site)
        await runner.setup()
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        await tcp.start()
        try:
            await test(f"http://127.0.0.1:{runner.addresses[0][1]}", state)
        finally:
            await runner.cleanup()

    asyncio.run(go())
    return state


def worker(base: str, connections: int = 4, timeout_s: float = 5.0) -> Worker:
    return Worker(base, Budget(deadline=time.monotonic() + 60), connections=connections,
                  timeout_s=timeout_s)


def test_json_round_trip_with_params_and_headers() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base) as w:
            r = await w.call("POST", "/echo?a=1", "echo", json={"x": [1, "ü"]},
                             params={"b": "two words", "c": 3},
                             headers={"Authorization": "Bearer t0k", "X-Test": "yes"})
            assert r.status == 200 and r.ok and r.headers is None
            assert r.body["method"] == "POST" and r.body["path"] == "/echo"
            assert r.body["query"] == {"a": "1", "b": "two words", "c": "3"}
            assert r.body["body"] == {"x": [1, "ü"]}
            h = r.body["headers"]
            assert h["Authorization"] == "Bearer t0k" and h["X-Test"] == "yes"
            assert h["Content-Type"] == "application/json"
            assert "Accept-Encoding" not in h
            g = await w.call("GET", "/echo", "echo", params={"q": "1"})
            assert g.status == 200 and g.body["method"] == "GET" and g.body["body"] is None
            assert g.body["query"] == {"q": "1"}
            d = await w.call("DELETE", "/echo", "echo")
            assert d.body["method"] == "DELETE"
            p = await w.call("PATCH", "/echo", "echo", json={"open": True},
                             headers={"Content-Type": "application/json; charset=utf-8"})
            assert p.body["body"] == {"open": True}
            assert p.body["headers"]["Content-Type"] == "application/json; charset=utf-8"
            assert w.sink.total.route_summary(1.0)["echo"]["count"] == 4

    run_with_app(test)


def test_statuses_retry_after_and_error_bodies() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base) as w:
            r201 = await w.call("GET", "/status/201", "s")
            assert r201.status == 201 and r201.body == {"error": {"code": 201}}
            r404 = await w.call("GET", "/status/404", "s", want_body=False)
            assert r404.status == 404 and r404.body == {"error": {"code": 404}}
            r429 = await w.call("GET", "/status/429", "s")
            assert r429.status == 429 and r429.headers == {"Retry-After": "7"}
            assert r429.retry_after() == 7.0
            ok = await w.call("GET", "/status/200", "s", want_body=False)
            assert ok.status == 200 and ok.body is None
            await w.call("GET", "/status/409", "s",
                         expected=lambda status, body: body["error"]["code"] == 409)
            await w.call("GET", "/status/200", "quiet", record=False)
            statuses = w.sink.total.route_summary(1.0)["s"]["statuses"]
            assert statuses == {"200": 1, "201": 1, "404": 1, "429": 1, "409 as designed": 1}
            assert "quiet" not in w.sink.total.route_summary(1.0)

    run_with_app(test)


def test_chunked_body() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base) as w:
            for _ in range(3):  # and the connection is still good after a chunked answer
                r = await w.call("GET", "/chunked", "chunked")
                assert r.status == 200 and r.body == {"items": [1, 2, 3]}
        assert len(app.peers) == 1

    run_with_app(test)


def test_keep_alive_reuses_connections() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base, connections=8) as w:
            for _ in range(20):
                assert (await w.call("GET", "/echo", "echo")).status == 200
        assert len(app.peers) == 1  # sequential calls: one connection

    run_with_app(test)


def test_the_pool_never_exceeds_its_limit() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base, connections=5) as w:
            pool = w.pool
            assert pool is not None
            peak = 0

            async def one() -> Any:
                nonlocal peak
                r = await w.call("GET", "/busy", "busy")
                peak = max(peak, pool.open, len(pool.conns))
                return r.status

            assert await asyncio.gather(*(one() for _ in range(50))) == [200] * 50
            assert peak <= 5 and pool.open <= 5 and len(pool.idle) == pool.open
            assert not pool.waiters
        assert app.max_in_flight <= 5 and len(app.peers) <= 5

    run_with_app(test)


def test_connection_close_answers() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base, connections=1) as w:
            assert (await w.call("GET", "/close", "close")).body == {"closing": True}
            assert (await w.call("GET", "/echo", "echo")).status == 200
            assert (await w.call("GET", "/close", "close")).status == 200
            assert (await w.call("GET", "/echo", "echo")).status == 200
            assert w.pool is not None and w.pool.open == 1
        assert len(app.peers) == 3  # closed after each `Connection: close`, kept otherwise

    run_with_app(test)


def test_a_server_closing_idle_connections() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base, connections=2) as w:
            assert (await w.call("GET", "/echo", "echo")).status == 200
            await asyncio.sleep(0.3)  # past the server's keep-alive timeout
            assert (await w.call("GET", "/echo", "echo")).status == 200
            assert (await w.call("POST", "/echo", "echo", json={"a": 1})).status == 200
        assert len(app.peers) == 2

    run_with_app(test, keepalive_timeout=0.1)


async def raw_server(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[None]]) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and its Content-Length body; b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n" \
     b'{"ok":true}'


def test_a_reused_connection_closed_as_the_request_is_sent_is_retried() -> None:
    """The server answers one request per connection, then closes the connection when the
    next request arrives, without a byte of answer and without `Connection: close` (the
    race with a keep-alive timeout): every call still succeeds, retried once."""
    conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        if await read_request(reader):
            writer.write(OK)
            await writer.drain()
            await read_request(reader)
        writer.close()

    async def go() -> None:
        server, base = await raw_server(handle)
        async with server, worker(base, connections=1) as w:
            for method in ("GET", "POST", "GET", "DELETE"):
                r = await w.call(method, "/x", "x", json={"n": 1} if method == "POST" else None)
                assert r.status == 200 and r.body == {"ok": True}, method
        assert conns == 4

    asyncio.run(go())


def test_a_fresh_connection_that_closes_unanswered_is_conn() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async def go() -> None:
        server, base = await raw_server(handle)
        async with server, worker(base, connections=1) as w:
            assert (await w.call("GET", "/x", "x")).status == "conn"
            assert (await w.call("GET", "/x", "x")).status == "conn"  # the slot was freed
            assert w.pool is not None and w.pool.open == 0

    asyncio.run(go())


def test_a_body_cut_short_is_conn_and_a_close_delimited_body_is_read() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"ok":')
        await writer.drain()
        writer.close()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[1,")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"2]")
        writer.close()

    async def go() -> None:
        server, base = await raw_server(cut)
        async with server, worker(base, connections=1) as w:
            assert (await w.call("GET", "/x", "x")).status == "conn"
        server, base = await raw_server(until_close)
        async with server, worker(base, connections=1) as w:
            for _ in range(2):
                r = await w.call("GET", "/x", "x")
                assert r.status == 200 and r.body == [1, 2]

    asyncio.run(go())


def test_a_slow_answer_times_out_and_frees_its_connection() -> None:
    async def test(base: str, app: App) -> None:
        async with worker(base, connections=1, timeout_s=0.3) as w:
            t0 = time.monotonic()
            r = await w.call("GET", "/slow", "slow")
            assert r.status == "timeout" and time.monotonic() - t0 < 1.5
            # the timed-out connection is closed, not reused; the pool's one slot is free
            assert (await w.call("GET", "/echo", "echo")).status == 200
            # a wait for a connection counts against the timeout too: the second call
            # waits for the first's connection and gives up with it
            both = await asyncio.gather(w.call("GET", "/slow", "slow"),
                                        w.call("GET", "/slow", "slow"))
            assert [r.status for r in both] == ["timeout", "timeout"]
            assert (await w.call("GET", "/echo", "echo")).status == 200
            assert w.pool is not None and w.pool.open == 1 and not w.pool.waiters
            assert w.sink.total.route_summary(1.0)["slow"]["statuses"] == {"timeout": 3}

    run_with_app(test)


def test_nothing_listening_is_conn() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connect is refused

        async def go() -> None:
            async with worker(f"http://127.0.0.1:{port}", connections=1) as w:
                for _ in range(2):
                    assert (await w.call("GET", "/x", "x")).status == "conn"
                assert w.sink.total.route_summary(1.0)["x"]["statuses"] == {"conn": 2}

        asyncio.run(go())


def test_exit_closes_every_connection() -> None:
    async def test(base: str, app: App) -> None:
        w = worker(base, connections=4)
        async with w:
            await asyncio.gather(*(w.call("GET", "/busy", "busy") for _ in range(4)))
            assert w.pool is not None
            conns = list(w.pool.conns)
            assert len(conns) == 4
        await asyncio.sleep(0.01)
        assert all(c.lost for c in conns) and not w.pool.conns

    run_with_app(test)

"""HTTP plumbing: one aiohttp session per worker, timed calls, SSE reading, tokens, limits."""

from __future__ import annotations

import asyncio
import resource
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from bench.stats import AS_DESIGNED, Sink

JSON_HEADERS = {"Content-Type": "application/json"}


class BudgetExhausted(Exception):
    """The run's request count or time limit is used up."""


@dataclass
class Budget:
    """Bounds shared by every request loop: a deadline, a request count, a stop flag."""
    deadline: float                     # time.monotonic() value
    max_requests: int | None = None
    used: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def live(self) -> bool:
        if self.stop.is_set():
            return False
        if time.monotonic() >= self.deadline:
            self.stop.set()
            return False
        if self.max_requests is not None and self.used >= self.max_requests:
            self.stop.set()
            return False
        return True

    def take(self) -> None:
        if not self.live():
            raise BudgetExhausted
        self.used += 1

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds` but wake on stop; True if still live afterwards."""
        seconds = min(seconds, self.remaining_s())
        if seconds > 0:
            try:
                await asyncio.wait_for(self.stop.wait(), seconds)
            except TimeoutError:
                pass
        return self.live()


class Tokens:
    """Mint and cache bearer tokens (one per user id)."""

    def __init__(self, secret: str, ttl_s: int = 6 * 3600) -> None:
        from eventpulse.auth import mint_token  # local: keeps `bench.stats` etc. light
        self._mint = mint_token
        self._secret = secret
        self._ttl = ttl_s
        self._cache: dict[tuple[str, tuple[str, ...]], str] = {}

    def header(self, user_id: str, roles: tuple[str, ...] = ("user",)) -> dict[str, str]:
        key = (user_id, roles)
        tok = self._cache.get(key)
        if tok is None:
            tok = self._cache[key] = self._mint(user_id, roles, secret=self._secret,
                                                ttl_s=self._ttl)
        return {"Authorization": f"Bearer {tok}"}


def default_secret() -> str:
    from eventpulse.auth import token_secret
    from eventpulse.settings import Settings
    return token_secret(Settings())


def raise_nofile_limit() -> int:
    """Lift the soft open-files limit to the hard one (streams hold one socket each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            return soft
    return soft


@dataclass
class Response:
    status: int | str          # HTTP status, or 'timeout' / 'conn' for transport failures
    body: Any = None
    headers: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300

    def retry_after(self, default: float = 1.0) -> float:
        try:
            return float((self.headers or {}).get("Retry-After", default))
        except ValueError:
            return default


class Worker:
    """A session and a stats sink. Virtual users are spread over workers."""

    def __init__(self, base_url: str, budget: Budget, *, connections: int,
                 timeout_s: float = 10.0) -> None:
        self.base = base_url
        self.budget = budget
        self.sink = Sink()
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._connect_timeout_s = timeout_s
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Worker:
        conn = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0,
                                    ttl_dns_cache=3600, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=conn, timeout=self._timeout,
            json_serialize=lambda o: orjson.dumps(o).decode())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def call(self, method: str, path: str, route: str, *,
                   headers: dict[str, str] | None = None, json: Any = None,
                   params: dict[str, Any] | None = None, budgeted: bool = True,
                   want_body: bool = True, record: bool = True,
                   expected: Any = None) -> Response:
        """One timed request, recorded under `route`. Never raises for HTTP/transport errors;
        raises BudgetExhausted (before sending) when `budgeted` and the run is over.

        `expected(status, body)` marks a refusal the scenario counts on (a flash sale's
        late joiners told `409 sold_out`): recorded as "409 as designed", not an error.
        """
        assert self.session is not None
        if budgeted:
            self.budget.take()
        data = None
        hdrs = headers
        if json is not None:
            data = orjson.dumps(json)
            hdrs = {**JSON_HEADERS, **(headers or {})}
        t0 = time.perf_counter()
        try:
            async with self.session.request(method, self.base + path, data=data,
                                            headers=hdrs, params=params) as resp:
                raw = await resp.read()
                status: int | str = resp.status
                body = None
                if want_body or status >= 400:
                    body = _decode(raw)
                rh = {"Retry-After": resp.headers["Retry-After"]} \
                    if "Retry-After" in resp.headers else None
        except TimeoutError:
            status, body, rh = "timeout", None, None
        except (aiohttp.ClientError, OSError):
            status, body, rh = "conn", None, None
        if record:
            shown = f"{status}{AS_DESIGNED}" if expected is not None and isinstance(
                status, int) and status >= 400 and expected(status, body) else status
            self.sink.record(route, time.perf_counter() - t0, shown, time.time())
        return Response(status, body, rh)

    async def follow(self, path: str, route: str, *, headers: dict[str, str],
                     on_event: Any, on_open: Any = None) -> bool:
        """Read the SSE stream at `path`, calling `on_event(payload)` for each event as it
        arrives, until the stream ends; True if it was established (200).

        The time to the response head is recorded under `route` with its status (a
        refusal is an error there); an open that failed (timeout, connection) or a stream
        cut off mid-body is recorded under `route:broken`.
        """
        url = urlsplit(self.base + path)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        target = url.path + (f"?{url.query}" if url.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}",
                 "Accept: text/event-stream", "Cache-Control: no-cache",
                 *(f"{k}: {v}" for k, v in headers.items())]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        proto: SseFollower | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: SseFollower(request, on_event), host, port)
            status = await proto.head  # not bounded: 8,000 opens at once take 10-20 s
            status = "conn" if status is None else status
            self.sink.record(route, time.perf_counter() - t0, status, time.time())
            if status != 200:
                return False
            if on_open is not None:
                on_open()
            await proto.done
            if not proto.complete:  # cut off mid-stream, not ended by the server
                self.sink.record(route + ":broken", time.perf_counter() - t0, "conn",
                                 time.time())
            return True
        except TimeoutError:
            self.sink.record(route + ":broken", time.perf_counter() - t0, "timeout", time.time())
        except OSError:
            self.sink.record(route + ":broken", time.perf_counter() - t0, "conn", time.time())
        finally:
            if proto is not None:
                proto.close()
        return False


class SseFollower(asyncio.Protocol):
    """One SSE stream read by callback, for crowds of thousands of streams.

    Read with aiohttp, every event woke the stream's task (aiohttp's reader, then two
    async generators); at 8,000 streams moving at once that made the generator, not the
    server, the slowest part of a round. Here `data_received` parses the response and
    calls `on_event(payload)` in place: no task runs per event. HTTP/1.1 GET only, with a
    chunked or a close-delimited body (what an SSE answer is).
    """

    def __init__(self, request: bytes, on_event: Any) -> None:
        self.request = request
        self.on_event = on_event
        self.transport: asyncio.Transport | None = None
        self.status: int | str | None = None      # set when the head has arrived
        self.head = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()
        self._buf = b""        # raw bytes not yet parsed
        self._chunked = False
        self._need = -1        # chunked: bytes of the current chunk still to read
        self._sse = b""        # decoded body not yet split into events
        self.complete = False  # the body ended as HTTP says it should

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and not self._chunked and self.status is not None:
            self.complete = True  # a close-delimited body ends with the connection
        if not self.head.done():
            self.head.set_result(None)
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.status is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4:]
            lines = head.split("\r\n")
            try:
                self.status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self.status = "conn"
            self._chunked = any(h.lower().replace(" ", "") == "transfer-encoding:chunked"
                                for h in lines[1:])
            if not self.head.done():  # not if the reader gave up waiting (cancelled)
                self.head.set_result(self.status)
        body = self._dechunk() if self._chunked else self._take_all()
        if not body:
            return
        self._sse += body
        if b"\r" in self._sse:  # CRLF line ends; a CR may come in one read, its LF in the next
            self._sse = self._sse.replace(b"\r\n", b"\n")
        while (end := self._sse.find(b"\n\n")) >= 0:
            event, self._sse = self._sse[:end], self._sse[end + 2:]
            payload = _decode(_sse_data(event))
            if payload is not None:
                self.on_event(payload)

    def _take_all(self) -> bytes:
        out, self._buf = self._buf, b""
        return out

    def _dechunk(self) -> bytes:
        out = []
        buf = self._buf
        while buf:
            if self._need < 0:  # a size line, or the CRLF after a chunk's data
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line, buf = buf[:end], buf[end + 2:]
                if not line:
                    continue
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:  # the last chunk: the stream is over
                    buf = b""
                    self.complete = True
                    self.close()
                    break
                self._need = size
            take = buf[:self._need]
            out.append(take)
            buf = buf[len(take):]
            self._need -= len(take)
            if self._need == 0:
                self._need = -1
        self._buf = buf
        return b"".join(out)


def _sse_data(event: bytes) -> bytes:
    """The `data:` lines of one SSE event, joined; comments, `event:`, `id:` and `retry:`
    lines are ignored."""
    data = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(v[1:] if v.startswith(b" ") else v for v in data)


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None

"""HTTP plumbing: a keep-alive connection pool per worker, timed calls, SSE reading,
tokens, limits."""

from __future__ import annotations

import asyncio
import resource
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlencode, urlsplit

import httptools
import orjson

from bench.stats import AS_DESIGNED, Sink


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
    """A connection pool and a stats sink. Virtual users are spread over workers."""

    def __init__(self, base_url: str, budget: Budget, *, connections: int,
                 timeout_s: float = 10.0) -> None:
        self.base = base_url
        self.budget = budget
        self.sink = Sink()
        self._connections = connections
        self._timeout_s = timeout_s
        self._connect_timeout_s = timeout_s
        self.pool: ConnectionPool | None = None

    async def __aenter__(self) -> Self:
        self.pool = ConnectionPool(self.base, self._connections)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.close()
            await asyncio.sleep(0)  # let the transports call connection_lost

    async def call(self, method: str, path: str, route: str, *,
                   headers: dict[str, str] | None = None, json: Any = None,
                   params: dict[str, Any] | None = None, budgeted: bool = True,
                   want_body: bool = True, record: bool = True,
                   expected: Any = None) -> Response:
        """One timed request, recorded under `route`. Never raises for HTTP/transport errors;
        raises BudgetExhausted (before sending) when `budgeted` and the run is over.

        `expected(status, body)` marks a refusal the scenario counts on (a flash sale's
        late joiners told `409 sold_out`): recorded as "409 as designed", not an error.
        The whole request (waiting for a connection included) is bounded by `timeout_s`.
        """
        pool = self.pool
        assert pool is not None
        if budgeted:
            self.budget.take()
        request = pool.request_bytes(method, path, headers, json, params)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                status, raw, retry_after = await pool.send(request, head=method == "HEAD")
            body = _decode(raw) if want_body or status >= 400 else None
            rh = {"Retry-After": retry_after} if retry_after is not None else None
        except TimeoutError:
            status, body, rh = "timeout", None, None
        except OSError:
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


class Unanswered(ConnectionError):
    """The connection closed before a byte of the response arrived (or before the request
    was written): the server sent nothing, so the request may be tried again."""


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one origin, at most `limit` open at once.

    Replaces aiohttp for plain requests: 64 loops of GETs against a fixed answer cost the
    generator 227–240 µs of CPU per request through aiohttp and 66–80 µs through this
    pool, and in `seed-mix` the generator shares the 2 cores with the server under test. A request takes an idle
    connection (the most recently used: the least likely to have been closed by the
    server's idle timeout), or opens one while fewer than `limit` are open, or else waits,
    first come first served, for one to be freed. One request in flight per connection (no
    pipelining); each response is parsed by httptools (llhttp) as its bytes arrive.
    """

    def __init__(self, base_url: str, limit: int) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.ssl = url.scheme == "https" or None
        self.port = url.port or (443 if self.ssl else 80)
        self.prefix = url.path.rstrip("/")       # a base URL may carry a path
        self.host_header = url.netloc.rpartition("@")[2]
        self.limit = max(1, limit)
        self.open = 0       # slots taken: connections open, being opened, or about to be
        self.idle: list[HttpConnection] = []
        self.conns: set[HttpConnection] = set()
        self.waiters: deque[asyncio.Future[HttpConnection | None]] = deque()
        self.closed = False

    def request_bytes(self, method: str, path: str, headers: dict[str, str] | None,
                      json: Any, params: dict[str, Any] | None) -> bytes:
        """The request, built once (it is sent again as is if it has to be retried)."""
        target = self.prefix + path
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params, doseq=True)
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"
        body = b""
        if json is not None:
            body = orjson.dumps(json)
            if not headers or not any(k.lower() == "content-type" for k in headers):
                head += "Content-Type: application/json\r\n"
            head += f"Content-Length: {len(body)}\r\n"
        elif method in ("POST", "PUT", "PATCH"):
            head += "Content-Length: 0\r\n"  # some proxies refuse a body-less POST without it
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return (head + "\r\n").encode() + body

    async def send(self, request: bytes, *, head: bool = False
                   ) -> tuple[int, bytes, str | None]:
        """Send `request`, return (status, body, Retry-After or None). Raises OSError
        (ConnectionError) for a connect failure or a connection lost mid-response.

        The caller bounds the time: when it gives up (cancels us), the connection in use is
        closed (a late answer would be read as the next request's) and its slot freed.
        """
        conn = await self._take()
        reused = conn is not None
        try:
            if conn is None:
                conn = await self._connect()
            try:
                answer = await conn.exchange(request, head)
            except Unanswered:
                # A server may close an idle keep-alive connection at any time, racing our
                # request. If a *reused* connection closed before a byte of the response,
                # try once more on a fresh one (in the same slot). For every method, unlike
                # aiohttp 3.14 (which retries idempotent methods only, RFC 9112 9.3.1.1):
                # the API's POSTs are safe to repeat (joining is idempotent, purchases carry
                # an Idempotency-Key, a second created event is harmless in a benchmark).
                if not reused:
                    raise
                conn.close()
                conn = await self._connect()
                answer = await conn.exchange(request, head)
        except BaseException:
            if conn is not None:
                conn.close()
            self._free_slot()
            raise
        status, body, retry_after, keep_alive = answer
        if keep_alive:
            self._put_back(conn)
        else:  # `Connection: close`, HTTP/1.0 or a close-delimited body
            conn.close()
            self._free_slot()
        return status, body, retry_after

    async def _take(self) -> HttpConnection | None:
        """An idle connection, or None: a slot is ours to open a connection in."""
        if self.closed:
            raise ConnectionError("the pool is closed")
        while self.idle:
            conn = self.idle.pop()
            conn.idle = False
            if conn.usable():
                return conn
            conn.close()  # closed while idle, connection_lost not yet run
            self._free_slot()
        if self.open < self.limit and not self.waiters:
            self.open += 1
            return None
        fut: asyncio.Future[HttpConnection | None] = \
            asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed to us as we were cancelled
                got = fut.result()
                if got is None:
                    self._free_slot()
                else:
                    self._put_back(got)
            raise

    async def _connect(self) -> HttpConnection:
        if self.closed:
            raise ConnectionError("the pool is closed")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: HttpConnection(self), self.host,
                                                   self.port, ssl=self.ssl)
        except TimeoutError as e:  # the kernel's connect timeout: a connect failure
            raise ConnectionError(f"connect: {e}") from e
        self.conns.add(conn)
        return conn

    def _hand_over(self, value: HttpConnection | None) -> bool:
        """Give a connection, or a free slot (None), to the longest waiter, if any."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():  # a cancelled waiter's future is done
                fut.set_result(value)
                return True
        return False

    def _put_back(self, conn: HttpConnection) -> None:
        if self.closed or not conn.usable():
            conn.close()
            self._free_slot()
        elif not self._hand_over(conn):
            conn.idle = True
            self.idle.append(conn)

    def _free_slot(self) -> None:
        if not self._hand_over(None):
            self.open -= 1

    def lost_idle(self, conn: HttpConnection) -> None:
        """An idle connection closed (the server's keep-alive timeout): drop it."""
        conn.idle = False
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        self._free_slot()

    def close(self) -> None:
        """Close every connection, idle or busy (a busy request then fails as "conn")."""
        self.closed = True
        for conn in list(self.conns):
            conn.close()
        self.idle.clear()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("the pool is closed"))


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its response in
    `data_received` with an `httptools.HttpResponseParser` (its callbacks below) and
    resolves the `exchange` future when the message is complete: no task runs per read.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle = False          # in the pool's idle list
        self.lost = False
        self._answer: asyncio.Future[tuple[int, bytes, str | None, bool]] | None = None
        self._got_bytes = False    # any byte of the current response has arrived
        self._head = False         # the request was a HEAD: no body follows the head
        self._status = 0           # set when the response head is complete
        self._body: list[bytes] = []
        self._retry_after: str | None = None
        self._framed = False       # Content-Length or chunked (else: ends at close)
        self._keep_alive = False

    def usable(self) -> bool:
        return not self.lost and self.transport is not None and \
            not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def exchange(self, request: bytes, head: bool = False
                 ) -> asyncio.Future[tuple[int, bytes, str | None, bool]]:
        """Write `request`; the future gets (status, body, Retry-After, keep-alive)."""
        if not self.usable():
            raise Unanswered("the connection closed before the request was written")
        self._answer = answer = asyncio.get_running_loop().create_future()
        self._got_bytes = False
        self._head = head
        self.transport.write(request)  # type: ignore[union-attr]
        return answer

    # asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.conns.discard(self)
        if self.idle:
            self.pool.lost_idle(self)
        answer = self._answer
        if answer is None or answer.done():
            return
        if not self._got_bytes:
            answer.set_exception(Unanswered("the connection closed before the response"))
        elif self._status and not self._framed and exc is None:
            self._keep_alive = False  # a close-delimited body ends with the connection
            self.on_message_complete()
        else:
            answer.set_exception(ConnectionError("the connection closed mid-response"))

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        answer = self._answer
        if answer is None or answer.done():  # nothing asked: the connection is unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            if not answer.done():
                answer.set_exception(ConnectionError(f"bad response: {e}"))
            self.close()

    # httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._status = 0
        self._body = []
        self._retry_after = None
        self._framed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"retry-after":
            self._retry_after = value.decode("latin-1")
        elif name == b"content-length" or name == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        # llhttp's verdict: False for `Connection: close`, HTTP/1.0 without keep-alive, or
        # a body that ends only when the connection does.
        self._keep_alive = self.parser.should_keep_alive()
        if self._head:  # the parser would wait for the body the headers announce
            self._keep_alive = False
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer = self._answer
        if answer is None or answer.done():
            return
        if 100 <= self._status < 200:  # an interim answer (103 Early Hints): wait on
            return
        body = b"".join(self._body)
        self._body = []
        answer.set_result((self._status, body, self._retry_after, self._keep_alive))


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

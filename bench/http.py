"""HTTP plumbing: one aiohttp session per worker, timed calls, SSE reading, tokens, limits."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.stats import Sink

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
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                     sock_read=None)
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
                   want_body: bool = True, record: bool = True) -> Response:
        """One timed request, recorded under `route`. Never raises for HTTP/transport errors;
        raises BudgetExhausted (before sending) when `budgeted` and the run is over."""
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
            self.sink.record(route, time.perf_counter() - t0, status, time.time())
        return Response(status, body, rh)

    async def stream(self, path: str, route: str, *, headers: dict[str, str],
                     on_open: Any = None) -> AsyncIterator[Any]:
        """Yield each SSE `data:` payload (decoded JSON) from `path` until it ends.

        The time to the response headers is recorded under `route`; a non-200 answer or a
        transport failure is recorded and ends the iteration at once (the caller falls back
        to polling). `on_open()` is called when the stream is established.
        """
        assert self.session is not None
        t0 = time.perf_counter()
        hdrs = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **headers}
        try:
            async with self.session.get(self.base + path, headers=hdrs,
                                        timeout=self._stream_timeout) as resp:
                self.sink.record(route, time.perf_counter() - t0, resp.status, time.time())
                if resp.status != 200:
                    await resp.read()
                    return
                if on_open is not None:
                    on_open()
                # Whole chunks split on the blank line that ends an event: one await per
                # network read instead of one per line (a push is four lines), so the
                # generator keeps up with thousands of streams moving at once.
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk
                    while (end := buf.find(b"\n\n")) >= 0:
                        event, buf = buf[:end], buf[end + 2:]
                        payload = _decode(_sse_data(event))
                        if payload is not None:
                            yield payload
        except TimeoutError:
            self.sink.record(route + ":broken", time.perf_counter() - t0, "timeout", time.time())
        except (aiohttp.ClientError, OSError):
            self.sink.record(route + ":broken", time.perf_counter() - t0, "conn", time.time())


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

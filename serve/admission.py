"""Admission: what every server that answers requests does before and after a route.

Two servers answer requests in a replica: FastAPI on Serve's request path
(`serve.middleware.Guard`, an ASGI adapter) and the side server (`serve/side.py`, aiohttp).
Both admit a request here, so they bound and count it alike:

* a body above `max_body` is 413 (before reading it when its length is declared), a bad
  `Content-Length` 400, and a body not complete within `body_timeout_s` 408: a client that
  dribbles its body cannot hold a handler;
* past `max_in_flight` requests (streams apart) a request is refused with 503 and
  `Retry-After` (queueing it would only add latency), and past `max_streams` open streams
  a stream is refused with 503 `streams_full` (its client polls `/queue/me` meanwhile);
* each answered request is counted by route, method and status, and timed (streams are
  counted, not timed); a request whose client left before any answer counts as nginx's
  499, not as a 500 the 5xx alert would page on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from starlette.responses import Response

from eventpulse import metrics
from eventpulse.errors import PayloadTooLarge
from eventpulse.settings import Settings
from serve.errors import error_response, from_domain
from serve.runtime import Runtime

STREAMS_RETRY_S = 10  # a refused stream retries later; its client polls meanwhile
UNCOUNTED = ("/healthz", "/readyz")  # never refused as overload: they say how we are


def too_large(max_body: int) -> Response:
    return from_domain(PayloadTooLarge(f"body above {max_body} bytes"))


def body_late(timeout_s: float) -> Response:
    return error_response(408, "request_timeout", f"body not received within {timeout_s:g} s")


def streams_full() -> Response:
    return error_response(503, "streams_full", "no stream free: poll /queue/me meanwhile",
                          STREAMS_RETRY_S)


def overloaded() -> Response:
    return error_response(503, "overloaded", "too many requests in flight", 1)


class Admitted:
    """One admitted request, from its admission to its answer (a `with` block): counted in
    flight (or as an open stream) meanwhile, then counted and timed with `status`, the
    status of its answer (500 until one is set; 499 if it is cancelled before)."""

    __slots__ = ("rt", "route", "method", "stream", "side", "status", "started")

    def __init__(self, rt: Runtime, route: str, method: str, stream: bool, side: bool) -> None:
        self.rt, self.route, self.method, self.stream, self.side = rt, route, method, stream, side
        self.status = 500
        self.started = time.perf_counter()

    def __enter__(self) -> Admitted:
        rt = self.rt
        rt.requests += 1
        if self.stream:
            rt.sse_open += 1
        else:
            rt.in_flight += 1
        if self.side:
            rt.side_requests += 1
            if not self.stream:
                rt.side_in_flight += 1
        return self

    def __exit__(self, kind, exc, tb) -> None:
        rt = self.rt
        if self.stream:
            rt.sse_open -= 1
        else:
            rt.in_flight -= 1
            if self.side:
                rt.side_in_flight -= 1
        if kind is not None and issubclass(kind, asyncio.CancelledError) and self.status == 500:
            self.status = 499  # the client went away (Serve and aiohttp cancel its handler)
        tags = (("route", self.route), ("method", self.method))
        metrics.aggregate.count("http_requests", tags + (("status", str(self.status)),))
        if not self.stream:
            metrics.aggregate.observe("eventpulse_http_request_duration_seconds", tags,
                                      time.perf_counter() - self.started)


class Admission:
    """The bounds of one replica's servers (`Settings`), over its `Runtime`'s counts."""

    def __init__(self, rt: Runtime, settings: Settings) -> None:
        self.rt = rt
        self.max_body, self.max_in_flight = settings.max_body_bytes, settings.max_in_flight
        self.max_streams, self.body_timeout_s = settings.max_streams, settings.body_timeout_s

    def refusal(self, path: str, stream: bool, length: bytes | int | None) -> Response | None:
        """The answer that refuses a request before its body is read, or None to admit it."""
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return error_response(400, "bad_request", "bad Content-Length")
            if too_big:
                return too_large(self.max_body)
        rt = self.rt
        if stream:
            if rt.sse_open >= self.max_streams:
                metrics.get("overload").inc(tags={"route": "stream"})
                return streams_full()
        elif rt.in_flight >= self.max_in_flight and path not in UNCOUNTED:
            metrics.get("overload").inc(tags={"route": _family(path)})
            return overloaded()
        return None

    def admit(self, route: str, method: str, *, stream: bool = False, side: bool = False
              ) -> Admitted:
        return Admitted(self.rt, route, method, stream, side)

    async def body(self, read: Callable[[], Awaitable[bytes | None]]) -> bytes | Response:
        """The whole body, read chunk by chunk with `read` (None or b"" at its end) within
        `body_timeout_s`, or the answer that refuses it (413, 408)."""
        try:
            return await asyncio.wait_for(self._read(read), self.body_timeout_s)
        except TimeoutError:
            return body_late(self.body_timeout_s)

    async def _read(self, read: Callable[[], Awaitable[bytes | None]]) -> bytes | Response:
        body = b""
        while chunk := await read():
            body += chunk
            if len(body) > self.max_body:  # a chunked upload carries no length
                return too_large(self.max_body)
        return body


def _family(path: str) -> str:
    """The overload counter's route label: the path's first segment below `/api`."""
    return path.split("/")[2] if path.count("/") > 1 else path

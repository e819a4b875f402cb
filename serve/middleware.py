"""Pure ASGI middleware (no per-request task switching): body limit, overload, metrics."""

from __future__ import annotations

import asyncio
import time

from eventpulse import metrics
from eventpulse.errors import PayloadTooLarge
from serve import fastpath
from serve.errors import error_response, from_domain
from serve.runtime import get_runtime

_UNCOUNTED = ("/healthz", "/readyz")
STREAMS_RETRY_S = 10  # a refused stream retries later; its client polls meanwhile


def too_large(max_body: int):
    return from_domain(PayloadTooLarge(f"body above {max_body} bytes"))


def body_late(timeout_s: float):
    """A body that did not arrive in time: its client must not hold a handler."""
    return error_response(408, "request_timeout", f"body not received within {timeout_s:g} s")


def streams_full():
    """A stream refused past `max_streams`: its client polls `/queue/me` meanwhile."""
    return error_response(503, "streams_full", "no stream free: poll /queue/me meanwhile",
                          STREAMS_RETRY_S)


def overloaded():
    """A request refused past `max_in_flight`: queueing it would only add latency."""
    return error_response(503, "overloaded", "too many requests in flight", 1)


def replay(body: bytes):
    """An ASGI `receive` that hands over a body already read, once, then a disconnect."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class Guard:
    """Refuses oversized bodies (413) and sheds load (503 + Retry-After) past a bound of
    requests in flight, so latency does not pile up; records per-route metrics."""

    def __init__(self, app, max_body: int, max_in_flight: int, max_streams: int,
                 body_timeout_s: float = 10.0) -> None:
        self.app, self.max_body, self.max_in_flight = app, max_body, max_in_flight
        self.body_timeout_s, self.max_streams = body_timeout_s, max_streams

    async def _read_body(self, receive) -> bytes | None:
        """The request body, or None past `max_body` (chunked uploads carry no length)."""
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return None
        return body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rt = get_runtime()
        path = scope["path"]
        streaming = path.endswith("/stream")
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await error_response(400, "bad_request", "bad Content-Length")(scope, receive, send)
            if too_big:
                return await too_large(self.max_body)(scope, receive, send)
        body = b""
        if scope["method"] in ("POST", "PUT", "PATCH"):
            # Read the whole (small) body before routing, under the size limit and a
            # deadline: a client that sends headers and then dribbles its body is cut
            # with 408 instead of holding a handler for as long as it likes.
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
            except asyncio.TimeoutError:
                return await body_late(self.body_timeout_s)(scope, receive, send)
            if body is None:
                return await too_large(self.max_body)(scope, receive, send)
            receive = replay(body)
        if streaming and rt.sse_open >= self.max_streams:
            metrics.get("overload").inc(tags={"route": "stream"})
            return await streams_full()(scope, receive, send)
        if not streaming and path not in _UNCOUNTED and rt.in_flight >= self.max_in_flight:
            metrics.get("overload").inc(tags={"route": path.split("/")[2] if path.count("/") > 1 else path})
            return await overloaded()(scope, receive, send)
        status = 500
        started = time.perf_counter()

        async def send_wrapped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        fast = fastpath.match(scope["method"], path, scope.get("query_string", b""))
        counted = not streaming
        if counted:
            rt.in_flight += 1
        else:
            rt.sse_open += 1
        rt.requests += 1
        try:
            if fast is None:
                await self.app(scope, receive, send_wrapped)
            elif fast[0] == fastpath.STREAM:
                await fastpath.stream(fast[1], fast[2], headers, scope, receive, send_wrapped)
            else:
                response = await fastpath.answer(fast[0], fast[1], fast[2], headers, body)
                if response is None:
                    await self.app(scope, receive, send_wrapped)
                else:
                    await response(scope, receive, send_wrapped)
        except asyncio.CancelledError:
            # Cancelled before any answer: the client went away (Serve cancels the request
            # when its connection closes). Counted as nginx's 499, not as a 500 that the
            # 5xx alert would page on: a crowd that gives up is not a server error.
            if status == 500:
                status = 499
            raise
        finally:
            if counted:
                rt.in_flight -= 1
            else:
                rt.sse_open -= 1
            name = fast[0] if fast is not None else getattr(scope.get("route"), "path", "unmatched")
            tags = (("route", name), ("method", scope["method"]))
            metrics.aggregate.count("http_requests", tags + (("status", str(status)),))
            if not streaming:
                metrics.aggregate.observe("eventpulse_http_request_duration_seconds", tags,
                                          time.perf_counter() - started)

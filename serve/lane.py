"""The lane: the hot per-user routes served by a plain aiohttp server in each replica.

Each Ingress replica also listens on `lane_port` (127.0.0.1, shared by the node's
replicas with SO_REUSEPORT), and the node's HAProxy sends the table's lane routes there
(`serve/hotroutes.py`) while the lane answers its health check. The lane calls the same
functions as the fast path and FastAPI's routes, with the same bounds as `Guard`; what
is not exactly a route's shape gets FastAPI's own answer. Why, and what it saves:
`docs/architecture.md`, "The lane".
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from eventpulse import metrics
from eventpulse.auth import VOUCHED_PROOF, VOUCHED_SIGNATURE
from eventpulse.errors import EventPulseError
from eventpulse.settings import get_settings
from serve import fastpath, hotroutes
from serve.auth import authenticate
from serve.errors import _validation_message, error_response, from_domain, unexpected
from serve.middleware import (
    Guard,
    body_late,
    overloaded,
    replay,
    streams_full,
    too_large,
)
from serve.runtime import get_runtime
from serve.schemas import JoinIn

ROUTES = hotroutes.LANE  # the table's lane routes (the edge cache's misses among them)
_HEADERS = ("authorization", "if-none-match", "accept-encoding", "content-type",
            "idempotency-key", VOUCHED_SIGNATURE.decode(), VOUCHED_PROOF.decode())
_BODIED = (fastpath.JOIN, fastpath.PURCHASE)


class _ClientGone(Exception):
    """The client closed the connection before its request's body was complete."""


class Lane:
    """aiohttp's low-level handler for the lane's routes, bounded as `Guard` bounds the app."""

    def __init__(self, max_body: int, max_in_flight: int, body_timeout_s: float,
                 max_streams: int) -> None:
        self.max_body, self.max_in_flight = max_body, max_in_flight
        self.body_timeout_s, self.max_streams = body_timeout_s, max_streams

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        method = request.method
        fast = fastpath.match(method, request.path,
                              request.rel_url.raw_query_string.encode("latin-1"))
        if fast is None or fast[0] not in ROUTES:  # HAProxy sends only the lane's shapes
            return _aiohttp(error_response(404, "not_found", "no such route on the lane"))
        route = fast[0]
        if route == fastpath.HEALTH:
            return _aiohttp(await fastpath.answer(route, [], {}, {}))
        rt = get_runtime()
        if route == fastpath.STREAM:
            return await self._stream(request, fast)
        if rt.in_flight >= self.max_in_flight:
            metrics.get("overload").inc(tags={"route": route.split("/")[2]})
            return _aiohttp(overloaded())
        status = 500
        started = time.perf_counter()
        rt.in_flight += 1
        rt.lane_in_flight += 1
        rt.requests += 1
        rt.lane_requests += 1
        try:
            try:
                response = await self._answer(request, fast)
            except asyncio.CancelledError:
                status = 499  # the client left (aiohttp cancels its handler), as `Guard` counts it
                raise
            except _ClientGone:  # it left mid-body: there is no one to answer
                status = 499
                return web.Response(status=499)
            except Exception as e:  # noqa: BLE001 — in the envelope, as the app's handlers do
                response = unexpected(e)
            status = response.status_code
            return _aiohttp(response)
        finally:
            rt.in_flight -= 1
            rt.lane_in_flight -= 1
            tags = (("route", route), ("method", method))
            metrics.aggregate.count("http_requests", tags + (("status", str(status)),))
            metrics.aggregate.observe("eventpulse_http_request_duration_seconds", tags,
                                      time.perf_counter() - started)

    async def _answer(self, request: web.BaseRequest,
                      fast: tuple[str, list[str], dict[str, str]]) -> Response:
        route, params, q = fast
        headers = _headers(request)
        body = b""
        if route in _BODIED:
            if request.content_length is not None and request.content_length > self.max_body:
                return too_large(self.max_body)
            try:
                body = await asyncio.wait_for(self._read_body(request), self.body_timeout_s)
            except TimeoutError:
                return body_late(self.body_timeout_s)
            except ConnectionResetError:  # aiohttp's "Connection lost" for a body cut short
                raise _ClientGone from None
            if body is None:
                return too_large(self.max_body)
        response = await fastpath.answer(route, params, q, headers, body)
        if response is not None:
            return response
        if route == fastpath.PURCHASE:  # not exactly as documented: FastAPI's own answer
            return await _by_the_app(request, body)
        return _invalid_join(body, headers)

    async def _stream(self, request: web.BaseRequest,
                      fast: tuple[str, list[str], dict[str, str]]) -> web.StreamResponse:
        """My entry as Server-Sent Events, pushed by the hub (`fastpath.follow`) until the
        client leaves: aiohttp then cancels this handler (`handler_cancellation`)."""
        rt = get_runtime()
        if rt.sse_open >= self.max_streams:
            metrics.get("overload").inc(tags={"route": "stream"})
            return _aiohttp(streams_full())
        _, params, q = fast
        headers = _headers(request)
        status = 500
        rt.sse_open += 1
        rt.requests += 1
        rt.lane_requests += 1
        try:
            opened = await fastpath.open_stream(params[0], q, headers)
            if isinstance(opened, Response):
                status = opened.status_code
                return _aiohttp(opened)
            response = web.StreamResponse(status=200, headers={
                k.decode(): v.decode() for k, v in fastpath.SSE_HEADERS})
            await response.prepare(request)
            status = 200

            async def send(message: dict) -> None:
                await response.write(message["body"])

            await fastpath.follow(opened, send, asyncio.get_running_loop().create_future())
            return response
        except asyncio.CancelledError:
            if status == 500:
                status = 499  # the client left before any answer, as `Guard` counts it
            raise
        finally:
            rt.sse_open -= 1
            tags = (("route", fastpath.STREAM), ("method", "GET"))
            metrics.aggregate.count("http_requests", tags + (("status", str(status)),))

    async def _read_body(self, request: web.BaseRequest) -> bytes | None:
        """The body, or None past `max_body` (a chunked upload carries no length)."""
        body = b""
        while chunk := await request.content.read(self.max_body + 1):
            body += chunk
            if len(body) > self.max_body:
                return None
        return body


def _headers(request: web.BaseRequest) -> dict[bytes, bytes]:
    """The request headers the fast path reads, as the ASGI scope carries them."""
    src = request.headers
    return {k.encode(): src[k].encode("latin-1") for k in _HEADERS if k in src}


def _invalid_join(body: bytes, headers: dict[bytes, bytes]) -> Response:
    """FastAPI's answer to a join body that is not exactly the documented JSON, in its
    order: JSON that does not parse is a 400, then a bad token a 401, then the same
    validation errors, worded by the app's one handler (`serve.errors`)."""
    if body:  # FastAPI parses only a body that is there
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_response(400, "malformed_json", "the request body is not valid JSON")
    try:
        authenticate(fastpath._token(headers))
    except EventPulseError as e:
        return from_domain(e)
    if not body:
        return error_response(422, "invalid_input", "body: Field required")
    try:
        JoinIn.model_validate_json(body)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        status, code, message = _validation_message(RequestValidationError(errors))
        return error_response(status, code, message)
    return error_response(400, "bad_request", "the join could not be read")


async def _by_the_app(request: web.BaseRequest, body: bytes) -> Response:
    """FastAPI's answer to a request, in process: the app beneath `Guard` (which counts and
    bounds requests, as the lane already has), so validation errors, their order and
    wording are the app's own. For a purchase that is not exactly as documented: its
    query, header and body errors come in one answer, which only FastAPI words alike."""
    app = _beneath_guard()
    start: dict = {}
    chunks: list[bytes] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    url = request.rel_url
    await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
               "method": request.method, "scheme": "http", "path": url.path,
               "raw_path": url.raw_path.encode("latin-1"),
               "query_string": url.raw_query_string.encode("latin-1"), "root_path": "",
               "headers": [(k.lower(), v) for k, v in request.raw_headers],
               "client": None, "server": None}, replay(body), send)
    response = Response(b"".join(chunks), status_code=start.get("status", 500))
    response.raw_headers = list(start.get("headers") or [])
    return response


def _beneath_guard():
    """The FastAPI app's middleware stack below `Guard` (built as Starlette builds it)."""
    from serve.app import api  # imported here: the app imports the lane

    if api.middleware_stack is None:
        api.middleware_stack = api.build_middleware_stack()
    node = api.middleware_stack
    while not isinstance(node, Guard):
        node = node.app
    return node.app


def _aiohttp(response: Response) -> web.Response:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers
               if k != b"content-length"]
    return web.Response(body=response.body, status=response.status_code, headers=headers)


async def start(port: int, host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Listen on `host:port` beside the node's other replicas (SO_REUSEPORT)."""
    s = get_settings()
    lane = Lane(s.max_body_bytes, s.max_in_flight, s.body_timeout_s, s.max_streams)
    # a client that leaves cancels its handler, as Serve cancels a request: a stream ends
    server = web.Server(lane.handle, access_log=None, handler_cancellation=True)
    return await asyncio.get_running_loop().create_server(
        server, host, port, reuse_port=True, backlog=4096)

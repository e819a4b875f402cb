"""The side server: the hot routes served by a plain aiohttp server in each replica.

Each Ingress replica also listens on `side_port` (127.0.0.1, shared by the node's
replicas with SO_REUSEPORT), and the node's HAProxy sends the table's side-server routes
there (`serve/hotroutes.py`) while it answers its health check. A request is admitted as
on Serve's path (`serve/admission.py`) and answered by the same functions
(`serve/fastpath.py`); a join or purchase that is not exactly as documented is answered
by the FastAPI app in process, so its validation errors are worded once. Why it exists,
and what it saves: `docs/architecture.md`, "The side server".
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from starlette.responses import Response

from eventpulse.auth import VOUCHED_PROOF, VOUCHED_SIGNATURE
from serve import fastpath, hotroutes
from serve.admission import Admission
from serve.errors import error_response, unexpected
from serve.middleware import ADMITTED, replay
from serve.runtime import get_runtime
from serve.sse import SSE_HEADERS

ROUTES = hotroutes.SIDE  # the table's side-server routes (the edge cache's misses among them)
_HEADERS = ("authorization", "if-none-match", "accept-encoding", "content-type",
            "idempotency-key", VOUCHED_SIGNATURE.decode(), VOUCHED_PROOF.decode())
_BODIED = (fastpath.JOIN, fastpath.PURCHASE)


class _ClientGone(Exception):
    """The client closed the connection before its request's body was complete."""


class SideServer:
    """aiohttp's low-level handler for the side server's routes; `app` (the FastAPI app)
    answers what is not exactly a route's shape."""

    def __init__(self, admission: Admission, app) -> None:
        self.admission, self.app = admission, app

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        method = request.method
        fast = fastpath.match(method, request.path,
                              request.rel_url.raw_query_string.encode("latin-1"))
        if fast is None or fast[0] not in ROUTES:  # HAProxy sends only the table's shapes
            return _aiohttp(error_response(404, "not_found", "no such route on the side server"))
        route = fast[0]
        if route == fastpath.HEALTH:
            return _aiohttp(await fastpath.answer(route, [], {}, {}))
        stream = route == fastpath.STREAM
        refusal = self.admission.refusal(request.path, stream, request.content_length)
        if refusal is not None:
            return _aiohttp(refusal)
        with self.admission.admit(route, method, stream=stream, side=True) as admitted:
            if stream:
                return await self._stream(request, fast, admitted)
            try:
                response = await self._answer(request, fast)
            except _ClientGone:  # it left mid-body: there is no one to answer
                admitted.status = 499
                return web.Response(status=499)
            except Exception as e:  # noqa: BLE001 — in the envelope, as the app's handlers do
                response = unexpected(e)
            admitted.status = response.status_code
            return _aiohttp(response)

    async def _answer(self, request: web.BaseRequest,
                      fast: tuple[str, list[str], dict[str, str]]) -> Response:
        route, params, q = fast
        headers = _headers(request)
        body = b""
        if route in _BODIED:
            try:
                read = await self.admission.body(self._chunks(request))
            except ConnectionResetError:  # aiohttp's "Connection lost" for a body cut short
                raise _ClientGone from None
            if not isinstance(read, bytes):
                return read
            body = read
        response = await fastpath.answer(route, params, q, headers, body)
        if response is None:  # not exactly as documented: FastAPI's own answer
            response = await in_process(self.app, request, body)
        return response

    @staticmethod
    def _chunks(request: web.BaseRequest):
        async def read() -> bytes:
            return await request.content.readany()

        return read

    async def _stream(self, request: web.BaseRequest,
                      fast: tuple[str, list[str], dict[str, str]], admitted) -> web.StreamResponse:
        """My entry as Server-Sent Events, pushed by the hub until the client leaves:
        aiohttp then cancels this handler (`handler_cancellation`)."""
        _, params, q = fast
        opened = await fastpath.open_stream(params[0], q, _headers(request))
        if isinstance(opened, Response):
            admitted.status = opened.status_code
            return _aiohttp(opened)
        response = web.StreamResponse(status=200, headers={
            k.decode(): v.decode() for k, v in SSE_HEADERS})
        await response.prepare(request)
        admitted.status = 200

        async def send(message: dict) -> None:
            await response.write(message["body"])

        await get_runtime().hub.follow(*opened, send, asyncio.get_running_loop().create_future())
        return response


def _headers(request: web.BaseRequest) -> dict[bytes, bytes]:
    """The request headers the fast path reads, as an ASGI scope carries them."""
    src = request.headers
    return {k.encode(): src[k].encode("latin-1") for k in _HEADERS if k in src}


async def in_process(app, request: web.BaseRequest, body: bytes) -> Response:
    """`app`'s answer to a request already admitted here (`ADMITTED`: `Guard` lets it
    through), called in process with the request as an ASGI scope."""
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
               "client": None, "server": None, ADMITTED: True}, replay(body), send)
    response = Response(b"".join(chunks), status_code=start.get("status", 500))
    response.raw_headers = list(start.get("headers") or [])
    return response


def _aiohttp(response: Response) -> web.Response:
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers
               if k != b"content-length"]
    return web.Response(body=response.body, status=response.status_code, headers=headers)


async def start(port: int, app, host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Listen on `host:port` beside the node's other replicas (SO_REUSEPORT); `app` answers
    what the fast path leaves to FastAPI."""
    rt = get_runtime()
    side = SideServer(Admission(rt, rt.settings), app)
    # a client that leaves cancels its handler, as Serve cancels a request: a stream ends
    server = web.Server(side.handle, access_log=None, handler_cancellation=True)
    return await asyncio.get_running_loop().create_server(
        server, host, port, reuse_port=True, backlog=4096)

"""The hottest routes answered without FastAPI's routing and dependency injection.

The earlier product's load mix is five GETs per user every few seconds, and an on-sale
starts with everyone joining and opening their stream at once, then buying; on two cores
the Serve replica's per-request Python is the budget, and FastAPI's router, dependency
solver and exception middleware are a large share of it for routes this small. These
routes (the five GETs, joins, purchases and SSE streams) call the very same functions
as their FastAPI twins (which stay, for the OpenAPI document and for anything unusual);
whatever the fast path does not recognise exactly, it hands to FastAPI.
"""

from __future__ import annotations

import gzip
import re
from urllib.parse import parse_qsl

from starlette.responses import Response

from eventpulse.errors import EventPulseError, Unauthorized
from serve import idempotency
from serve.auth import authenticate_vouched, require_self
from serve.errors import from_domain, unexpected
from serve.responses import json
from serve.routes import purchases, queue
from serve.routes.events import event_response
from serve.routes.queue import my_entry, shaped
from serve.schemas import JoinIn, PurchaseIn
from serve.sse import Feed, Writer, hub
from serve.routes.tickets import tickets_response
from serve.runtime import get_runtime

# route template (the metrics label, as FastAPI would name it) per recognised shape
EVENT = "/api/events/{event_id}"
AVAILABILITY = "/api/events/{event_id}/availability"
QUEUE_ME = "/api/events/{event_id}/queue/me"
POSITION = "/api/queue/position"
TICKETS = "/api/users/{user_id}/tickets"
STREAM = "/api/events/{event_id}/queue/me/stream"
JOIN = "/api/events/{event_id}/queue"
PURCHASE = "/api/events/{event_id}/purchases"
HEALTH = "/healthz"
GZIP_MIN = 1024  # as the app's GZipMiddleware
# `?wait=` in its plain spellings (HAProxy's route to the lane matches the same); past
# the route's 30 s, or spelt otherwise, it is FastAPI's to answer
_WAIT = re.compile(rb"wait=((?:[0-9]|[12][0-9]|30)(?:\.[0-9]{1,3})?)")
WAIT_MAX_S = 30.0
_IDEMPOTENCY_KEY = re.compile(idempotency.KEY_PATTERN.encode())


def match(method: str, path: str, query: bytes) -> tuple[str, list[str], dict[str, str]] | None:
    """(route, path params, query) for a request the fast path serves exactly, else None."""
    if method == "POST":
        parts = path.split("/")
        if len(parts) == 5 and parts[2] == "events" and parts[4] == "queue" and not query:
            return JOIN, [parts[3]], {}
        if len(parts) == 5 and parts[2] == "events" and parts[4] == "purchases":
            if not query:
                return PURCHASE, [parts[3]], {}
            wait = _WAIT.fullmatch(query)
            if wait is not None:
                return PURCHASE, [parts[3]], {"wait": wait.group(1).decode()}
        return None
    if method != "GET":
        return None
    if path == HEALTH and not query:
        return HEALTH, [], {}
    parts = path.split("/")
    q = dict(parse_qsl(query.decode("latin-1"))) if query else {}
    n = len(parts)
    if n == 4 and parts[1] == "api" and parts[2] == "events" and not q:
        return EVENT, [parts[3]], q
    if n == 5 and parts[2] == "events" and parts[4] == "availability" and not q:
        return AVAILABILITY, [parts[3]], q
    if n == 6 and parts[2] == "events" and parts[4] == "queue" and parts[5] == "me" and not q:
        return QUEUE_ME, [parts[3]], q
    if n == 7 and parts[4] == "queue" and parts[5] == "me" and parts[6] == "stream" and \
            set(q) <= {"access_token"}:
        return STREAM, [parts[3]], q
    if path == POSITION and set(q) == {"eventId", "userId"} and all(
            0 < len(v) <= 128 for v in q.values()):
        return POSITION, [], q
    if n == 5 and parts[2] == "users" and parts[4] == "tickets" and set(q) <= {"eventId", "fields"}:
        if len(q.get("eventId", "")) <= 64 and len(q.get("fields", "")) <= 500:
            return TICKETS, [parts[3]], q
    return None


def _token(headers: dict[bytes, bytes], query_token: str | None = None) -> str:
    raw = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = raw.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if query_token:  # EventSource cannot set headers: streams take ?access_token=
        return query_token
    raise Unauthorized("missing bearer token")


async def answer(route: str, params: list[str], q: dict[str, str],
                 headers: dict[bytes, bytes], body: bytes = b"") -> Response | None:
    """The response of a matched request, gzipped like the app's larger answers; None
    hands the request to FastAPI (a join or purchase that is not exactly as documented
    gets FastAPI's own validation answer)."""
    parsed: JoinIn | tuple[PurchaseIn, str] | None = None
    if route == JOIN:
        parsed = _join_body(headers, body)
        if parsed is None:
            return None
    elif route == PURCHASE:
        parsed = _purchase(headers, body) if float(q.get("wait", 0)) <= WAIT_MAX_S else None
        if parsed is None:
            return None
    response = await _answer(route, params, q, headers, parsed)
    if len(response.body) >= GZIP_MIN and b"gzip" in headers.get(b"accept-encoding", b""):
        out = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        out.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return Response(gzip.compress(response.body, 6), status_code=response.status_code,
                        headers=out)
    return response


def _join_body(headers: dict[bytes, bytes], body: bytes) -> JoinIn | None:
    """A join's body when it is exactly the documented JSON, else None."""
    if not headers.get(b"content-type", b"").startswith(b"application/json"):
        return None
    try:
        return JoinIn.model_validate_json(body)
    except ValueError:
        return None


def _purchase(headers: dict[bytes, bytes], body: bytes) -> tuple[PurchaseIn, str] | None:
    """A purchase's body and Idempotency-Key when both are exactly as documented, else None."""
    key = headers.get(b"idempotency-key")
    if key is None or _IDEMPOTENCY_KEY.fullmatch(key) is None:
        return None
    if not headers.get(b"content-type", b"").startswith(b"application/json"):
        return None
    try:
        return PurchaseIn.model_validate_json(body), key.decode()
    except ValueError:
        return None


def _failure(e: Exception) -> Response:
    """The answer FastAPI's exception handlers give for an error raised on the fast path."""
    return from_domain(e) if isinstance(e, EventPulseError) else unexpected(e)


async def _answer(route: str, params: list[str], q: dict[str, str],
                  headers: dict[bytes, bytes],
                  body: JoinIn | tuple[PurchaseIn, str] | None = None) -> Response:
    if route == HEALTH:
        return json({"status": "ok"})
    try:
        p = authenticate_vouched(_token(headers), headers)
        if route == JOIN:
            assert isinstance(body, JoinIn)
            return await queue.join(params[0], body, p)
        if route == PURCHASE:
            assert isinstance(body, tuple)
            return await purchases.purchase(params[0], body[0], p, body[1],
                                            float(q.get("wait", 0)))
        inm = headers.get(b"if-none-match", b"").decode("latin-1") or None
        if route == EVENT:
            return await event_response(params[0], inm)
        if route == AVAILABILITY:
            avail = await get_runtime().availability_of(params[0])
            return json(avail, headers={"Cache-Control": "public, max-age=1"})
        if route == QUEUE_ME:
            return json(await my_entry(params[0], p.user_id))
        if route == POSITION:
            require_self(p, q["userId"])
            return json(await my_entry(q["eventId"], q["userId"]))
        return await tickets_response(p, params[0], q.get("eventId"), q.get("fields"), inm)
    except Exception as e:  # noqa: BLE001 — answered as FastAPI's handlers would
        return _failure(e)


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


async def stream(params: list[str], q: dict[str, str], headers: dict[bytes, bytes],
                 scope, receive, send) -> None:
    """My entry as Server-Sent Events, written straight to the connection.

    The same stream as the FastAPI route's `StreamingResponse`, without the response
    class's task group, the five middleware `send` wrappers every pushed entry went
    through and a task per stream to wake: the hub writes each change itself
    (`serve.sse.Writer`). This request's own coroutine only waits for the client to go.
    """
    opened = await open_stream(params[0], q, headers)
    if isinstance(opened, Response):
        return await opened(scope, receive, send)
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def until_gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    await follow(opened, send, until_gone())


async def open_stream(event_id: str, q: dict[str, str], headers: dict[bytes, bytes]
                      ) -> tuple[str, str, dict] | Response:
    """(event, user, first entry) for a stream to follow, or the error to answer."""
    try:
        p = authenticate_vouched(_token(headers, q.get("access_token")), headers)
        return event_id, p.user_id, await my_entry(event_id, p.user_id)
    except Exception as e:  # noqa: BLE001 — answered as FastAPI's handlers would
        return _failure(e)


async def follow(opened: tuple[str, str, dict], send, gone) -> None:
    """Write the opening event, then let the hub push changes through `send` (an ASGI
    send) until `gone` (the client left) completes."""
    event_id, user_id, first = opened
    feed = Feed(first, lambda v: shaped(event_id, v))
    await send({"type": "http.response.body", "body": feed.opening(), "more_body": True})
    writer = Writer(feed, send)
    hub.subscribe(event_id, user_id, writer, first)
    try:
        await gone
    finally:
        hub.unsubscribe(event_id, user_id, writer)
        await writer.close()

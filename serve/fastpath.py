"""The hottest GET routes answered without FastAPI's routing and dependency injection.

The earlier product's load mix is five GETs per user every few seconds; on two cores the
Serve replica's per-request Python is the budget, and FastAPI's router, dependency
solver and exception middleware are a large share of it for routes this small. These
routes call the very same functions as their FastAPI twins (which stay, for the OpenAPI
document and for anything unusual); whatever the fast path does not recognise exactly,
it hands to FastAPI.
"""

from __future__ import annotations

import gzip
from urllib.parse import parse_qsl

from starlette.responses import Response

from eventpulse.errors import EventPulseError, Unauthorized
from serve.auth import authenticate, require_self
from serve.errors import from_domain, unexpected
from serve.responses import json
from serve.routes.events import event_response
from serve.routes.queue import my_entry
from serve.routes.tickets import tickets_response
from serve.runtime import get_runtime

# route template (the metrics label, as FastAPI would name it) per recognised shape
EVENT = "/api/events/{event_id}"
AVAILABILITY = "/api/events/{event_id}/availability"
QUEUE_ME = "/api/events/{event_id}/queue/me"
POSITION = "/api/queue/position"
TICKETS = "/api/users/{user_id}/tickets"
HEALTH = "/healthz"
GZIP_MIN = 1024  # as the app's GZipMiddleware


def match(method: str, path: str, query: bytes) -> tuple[str, list[str], dict[str, str]] | None:
    """(route, path params, query) for a request the fast path serves exactly, else None."""
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
    if path == POSITION and set(q) == {"eventId", "userId"} and all(
            0 < len(v) <= 128 for v in q.values()):
        return POSITION, [], q
    if n == 5 and parts[2] == "users" and parts[4] == "tickets" and set(q) <= {"eventId", "fields"}:
        if len(q.get("eventId", "")) <= 64 and len(q.get("fields", "")) <= 500:
            return TICKETS, [parts[3]], q
    return None


def _token(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = raw.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token")
    return token.strip()


async def answer(route: str, params: list[str], q: dict[str, str],
                 headers: dict[bytes, bytes]) -> Response:
    """The response of a matched request, gzipped like the app's larger answers."""
    response = await _answer(route, params, q, headers)
    if len(response.body) >= GZIP_MIN and b"gzip" in headers.get(b"accept-encoding", b""):
        out = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        out.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return Response(gzip.compress(response.body, 6), status_code=response.status_code,
                        headers=out)
    return response


async def _answer(route: str, params: list[str], q: dict[str, str],
                  headers: dict[bytes, bytes]) -> Response:
    if route == HEALTH:
        return json({"status": "ok"})
    try:
        p = authenticate(_token(headers))
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
    except EventPulseError as e:
        return from_domain(e)
    except Exception as e:  # noqa: BLE001 — same answer FastAPI's handler gives
        return unexpected(e)

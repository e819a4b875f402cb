"""The hot routes' answers on the side server (`serve/side.py`), without FastAPI's
routing and dependency injection.

They call the very same functions as their FastAPI twins (which answer them on Serve's
path, and give the OpenAPI document); a join or purchase that is not exactly as
documented is left to FastAPI, which words its validation errors. Why:
`docs/architecture.md`, "The side server".
"""

from __future__ import annotations

import gzip
import re

from starlette.responses import Response

from eventpulse.errors import EventPulseError, Unauthorized
from serve import hotroutes, idempotency
from serve.auth import authenticate_vouched, require_self
from serve.errors import from_domain, unexpected
from serve.responses import json
from serve.routes import purchases, queue
from serve.routes.events import event_response
from serve.routes.queue import my_entry, shaped
from serve.schemas import JoinIn, PurchaseIn
from serve.sse import EntryEvents
from serve.routes.tickets import tickets_response
from serve.runtime import get_runtime

# route templates (the metrics label, as FastAPI names them) of the hot routes' table
EVENT = hotroutes.EVENT.path
AVAILABILITY = hotroutes.AVAILABILITY.path
QUEUE_ME = hotroutes.QUEUE_ME.path
POSITION = hotroutes.POSITION.path
TICKETS = hotroutes.TICKETS.path
STREAM = hotroutes.STREAM.path
JOIN = hotroutes.JOIN.path
PURCHASE = hotroutes.PURCHASE.path
HEALTH = hotroutes.HEALTH.path
GZIP_MIN = 1024  # as the app's GZipMiddleware
WAIT_MAX_S = float(hotroutes.WAIT_MAX_S)
_IDEMPOTENCY_KEY = re.compile(idempotency.KEY_PATTERN.encode())
match = hotroutes.match


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
            avail = await get_runtime().catalog.availability_of(params[0])
            return json(avail, headers={"Cache-Control": "public, max-age=1"})
        if route == QUEUE_ME:
            return json(await my_entry(params[0], p.user_id))
        if route == POSITION:
            require_self(p, q["userId"])
            return json(await my_entry(q["eventId"], q["userId"]))
        return await tickets_response(p, params[0], q.get("eventId"), q.get("fields"), inm)
    except Exception as e:  # noqa: BLE001 — answered as FastAPI's handlers would
        return _failure(e)


async def open_stream(event_id: str, q: dict[str, str], headers: dict[bytes, bytes]
                      ) -> tuple[str, str, EntryEvents] | Response:
    """(event, user, its entry's events) for a stream to follow, or the error to answer."""
    try:
        p = authenticate_vouched(_token(headers, q.get("access_token")), headers)
        first = await my_entry(event_id, p.user_id)
        return event_id, p.user_id, EntryEvents(first, lambda v: shaped(event_id, v))
    except Exception as e:  # noqa: BLE001 — answered as FastAPI's handlers would
        return _failure(e)

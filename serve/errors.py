"""The one place where errors become HTTP answers: `{"error": {"code", "message"}}`."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from eventpulse.errors import EventPulseError

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_input", 429: "rate_limited",
               503: "unavailable"}


def error_response(status: int, code: str, message: str, retry_after: float | None = None
                   ) -> Response:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(retry_after))))
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def from_domain(e: EventPulseError) -> Response:
    status = e.status if e.status < 500 or e.status == 503 else 503
    return error_response(status, e.code, e.message, e.retry_after if status in (429, 503) else None)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return 400, "malformed_json", "the request body is not valid JSON"
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return 422, "invalid_input", "; ".join(parts) or "invalid input"


def install(app: FastAPI) -> None:
    """Register the handlers so every route inherits the envelope."""

    @app.exception_handler(EventPulseError)
    async def _domain(_: Request, exc: EventPulseError) -> Response:
        return from_domain(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        status, code, message = _validation_message(exc)
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's answer to a body that is not even text: same code as bad JSON.
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return unexpected(exc)


def unexpected(exc: Exception) -> Response:
    """Actor or Redis trouble: tell the client to retry (503), log the cause."""
    log.error("unhandled error: %s: %s", type(exc).__name__, exc)
    from redis.exceptions import RedisError

    if isinstance(exc, (RedisError, OSError)):
        from eventpulse import metrics

        metrics.aggregate.count("redis_errors", ())
    return error_response(503, "unavailable", "temporarily unavailable, retry shortly", 1)


def _envelope_doc(description: str) -> dict:
    from serve.schemas import ErrorEnvelope

    return {"model": ErrorEnvelope, "description": description}


ErrorEnvelope_responses = {
    400: _envelope_doc("malformed request"),
    401: _envelope_doc("missing or invalid token"),
    403: _envelope_doc("not yours, or missing role"),
    404: _envelope_doc("not found"),
    409: _envelope_doc("state conflict"),
    413: _envelope_doc("body too large"),
    422: _envelope_doc("invalid input"),
    429: _envelope_doc("rate limited"),
    503: _envelope_doc("overloaded or a dependency is down"),
}

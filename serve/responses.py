"""Response helpers: orjson bodies, ETags, cache headers."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from starlette.responses import Response

from serve.errors import ErrorEnvelope_responses  # noqa: F401  (re-exported for routes)


def json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers=headers)


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=10).hexdigest() + '"'


def cached_json(inm: str | None, body: bytes, etag: str, cache_control: str) -> Response:
    """200 with the body, or 304 when the client's If-None-Match holds this version."""
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if inm and etag in [t.strip() for t in inm.split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)

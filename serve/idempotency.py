"""Idempotency-Key claims, shared by every route that takes the header.

The first request with a key stores a claim (a digest of its body and a value the route
chooses, in one `SET NX GET`); a repeat with the same body gets that claim's value back,
a repeat with another body is refused (409 `idempotency_key_reused`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
from pydantic import BaseModel

from eventpulse.errors import IdempotencyMismatch
from eventpulse.redis import RedisClient

KEY_PATTERN = r"^[A-Za-z0-9_.:-]{8,128}$"  # the Idempotency-Key header
TTL_S = 7 * 24 * 3600  # how long a key answers with its first result


def digest(body: BaseModel) -> str:
    return hashlib.blake2b(body.model_dump_json().encode(), digest_size=12).hexdigest()


def packed(body: BaseModel, value: Any) -> bytes:
    """A claim as stored: the body's digest and the route's value."""
    return msgpack.packb({"h": digest(body), "v": value})


async def claim(r: RedisClient, key: str, body: BaseModel, value: Any) -> tuple[Any, bool]:
    """Claim `key` with `value` unless a claim is there; (the value in force, ours?)."""
    raw = await r.set(key, packed(body, value), nx=True, get=True, ex=TTL_S)
    return (value, True) if raw is None else (claimed(raw, body), False)


async def prior(r: RedisClient, key: str, body: BaseModel) -> Any | None:
    """The value an earlier request with this key claimed, or None."""
    raw = await r.get(key)
    return None if raw is None else claimed(raw, body)


def claimed(raw: bytes, body: BaseModel) -> Any:
    """The value of a stored claim, when it was made with the same body."""
    found = msgpack.unpackb(raw, raw=False)
    if found.get("h") != digest(body):
        raise IdempotencyMismatch("this Idempotency-Key was used with a different body")
    return found["v"]

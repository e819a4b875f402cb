"""Per-user rate limits kept in Redis, so they hold across replicas (fixed windows)."""

from __future__ import annotations

import time

from eventpulse import keys
from eventpulse.errors import RateLimited
from eventpulse.redis import RedisClient


async def hit(r: RedisClient, user_id: str, action: str, limit: int, window_s: int) -> None:
    """Count one `action` by the user; RateLimited (429 + Retry-After) above `limit`.

    One round trip: INCR and EXPIRE in one pipeline on the user's slot.
    """
    now = time.time()
    window = int(now // window_s)
    key = keys.rate(user_id, action, window)
    pipe = r.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, window_s + 5)
    count, _ = await pipe.execute()
    if count > limit:
        retry = (window + 1) * window_s - now
        raise RateLimited(f"at most {limit} {action} requests per {window_s} s",
                          retry_after=retry)

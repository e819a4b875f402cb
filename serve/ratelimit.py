"""Per-user rate limits kept in Redis, so they hold across replicas (fixed windows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from eventpulse import keys
from eventpulse.errors import RateLimited
from eventpulse.redis import RedisClient, script

# INCR each key and arm its window's expiry, in one call: a pipeline costs redis-py
# several times the CPU of one script call, and joins arrive in bursts. One user's key
# (a slot of its own in a Redis Cluster), or on one Redis the keys of the joins a replica
# takes in the same few milliseconds. Counted one call each, a join's count is a fifth of
# a join's replica CPU, mostly redis-py's per-call encoding and parsing (`py-spy`).
_HIT_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('EXPIRE', key, ARGV[1]) end
  out[i] = n
end
return out
"""


def batch_runner(redis: Callable[[], RedisClient]):
    """`Coalescer` run function counting many users' keys in one script call; a batch's
    key is (action, expiry seconds)."""
    async def run(key: tuple[str, str], rate_keys: list[str]) -> list[int]:
        return await script(redis(), _HIT_LUA)(keys=rate_keys, args=[key[1]])
    return run


async def hit(r: RedisClient, user_id: str, action: str, limit: int, window_s: int,
              batcher: Any = None) -> None:
    """Count one `action` by the user; RateLimited (429 + Retry-After) above `limit`.

    One round trip: a script on the user's slot, or a share of one `batcher` call.
    """
    now = time.time()
    window = int(now // window_s)
    key = keys.rate(user_id, action, window)
    if batcher is not None:
        count = await batcher.call(action, str(window_s + 5), key)
    else:
        (count,) = await script(r, _HIT_LUA)(keys=[key], args=[window_s + 5])
    if count > limit:
        retry = (window + 1) * window_s - now
        raise RateLimited(f"at most {limit} {action} requests per {window_s} s",
                          retry_after=retry)

"""Per-user rate limits kept in Redis, so they hold across replicas (fixed windows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from eventpulse import keys
from eventpulse.errors import RateLimited
from eventpulse.redis import RedisClient

# INCR and arm the window's expiry in one command: a pipeline costs redis-py several
# times the CPU of one script call, and joins arrive in bursts.
_HIT_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""
# The same for many users at once: on one Redis (not a cluster, where each user's key is
# a slot of its own) the joins a replica takes in the same few milliseconds share one
# call. A join's count was a fifth of a lane join's replica CPU, mostly redis-py's
# per-call encoding and parsing (`py-spy`, `docs/benchmarks.md`).
_HIT_MANY_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('EXPIRE', key, ARGV[1]) end
  out[i] = n
end
return out
"""
_scripts: dict[tuple[int, str], object] = {}


def _script(r: RedisClient, source: str):
    script = _scripts.get((id(r), source))
    if script is None:
        script = _scripts[(id(r), source)] = r.register_script(source)
    return script


def batch_runner(redis: Callable[[], RedisClient]):
    """`Coalescer` run function counting many users' keys in one script call; a batch's
    key is (action, expiry seconds)."""
    async def run(key: tuple[str, str], rate_keys: list[str]) -> list[int]:
        return await _script(redis(), _HIT_MANY_LUA)(keys=rate_keys, args=[key[1]])
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
        count = await _script(r, _HIT_LUA)(keys=[key], args=[window_s + 5])
    if count > limit:
        retry = (window + 1) * window_s - now
        raise RateLimited(f"at most {limit} {action} requests per {window_s} s",
                          retry_after=retry)

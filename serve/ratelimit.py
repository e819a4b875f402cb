"""Per-user rate limits kept in Redis, so they hold across replicas (fixed windows)."""

from __future__ import annotations

import time

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
_scripts: dict[int, object] = {}


async def hit(r: RedisClient, user_id: str, action: str, limit: int, window_s: int) -> None:
    """Count one `action` by the user; RateLimited (429 + Retry-After) above `limit`.

    One round trip: a script on the user's slot.
    """
    script = _scripts.get(id(r))
    if script is None:
        script = _scripts[id(r)] = r.register_script(_HIT_LUA)
    now = time.time()
    window = int(now // window_s)
    count = await script(keys=[keys.rate(user_id, action, window)], args=[window_s + 5])
    if count > limit:
        retry = (window + 1) * window_s - now
        raise RateLimited(f"at most {limit} {action} requests per {window_s} s",
                          retry_after=retry)

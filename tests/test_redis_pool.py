"""The Redis pool: callers wait for a connection instead of failing; it survives a restart."""

from __future__ import annotations

import asyncio

from eventpulse.redis import create_client, pool_stats
from eventpulse.settings import Settings


async def test_callers_wait_for_a_free_connection_instead_of_failing(redis_server):
    client = create_client(Settings(redis_url=redis_server.url, redis_pool_size=2,
                                    redis_pool_timeout_s=10))
    seen = []

    async def slow_call(i: int) -> None:
        await client.blpop([f"ep:test:nothing:{i}"], timeout=0.05)
        seen.append(pool_stats(client)["in_use"])

    await asyncio.gather(*(slow_call(i) for i in range(40)))
    assert len(seen) == 40
    assert max(seen) <= 2
    assert pool_stats(client)["max"] == 2
    await client.aclose()


async def test_pool_reconnects_after_redis_restart_without_losing_acknowledged_writes(redis_server):
    client = create_client(Settings(redis_url=redis_server.url, redis_retries=8))
    await client.set("ep:test:restart", b"kept")
    await client.execute_command("CONFIG", "SET", "appendfsync", "always")
    await client.set("ep:test:restart2", b"kept-too")
    redis_server.stop()

    async def restart_later() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_server.start)

    restarter = asyncio.create_task(restart_later())
    # Issued while Redis is down: the retry with backoff carries it over the restart.
    value = await client.get("ep:test:restart")
    await restarter
    assert value == b"kept"
    assert await client.get("ep:test:restart2") == b"kept-too"
    await client.execute_command("CONFIG", "SET", "appendfsync", "everysec")
    await client.aclose()


async def test_exhausted_pool_times_out_with_a_connection_error(redis_server):
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = create_client(Settings(redis_url=redis_server.url, redis_pool_size=1,
                                    redis_pool_timeout_s=0.2, redis_retries=0))
    blocker = asyncio.create_task(client.blpop(["ep:test:block"], timeout=1))
    await asyncio.sleep(0.05)
    try:
        await client.get("ep:test:x")
    except RedisConnectionError as e:
        assert "No connection available" in str(e)
    else:  # pragma: no cover — the assertion below explains
        raise AssertionError("a caller past the pool timeout must get a clear error")
    await blocker
    await client.aclose()


def test_the_redis_internals_read_are_there_and_their_loss_is_named(monkeypatch):
    """`pool_stats` and the waiting cluster client read redis-py internals: the installed
    redis-py has them, and one that lacks one fails at import with its name and the pin."""
    import pytest

    import eventpulse.redis as module

    module.check_internals()

    class MovedNode(module.ClusterNode):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            del self._free

    monkeypatch.setattr(module, "ClusterNode", MovedNode)
    with pytest.raises(module.RedisInternalsChanged, match=r"MovedNode\._free.*redis>=8\.1,<8\.2"):
        module.check_internals()

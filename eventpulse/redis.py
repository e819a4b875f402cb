"""One bounded, blocking Redis connection pool per process.

Callers *wait* for a free connection (up to `redis_pool_timeout_s`) instead of failing:
the earlier product's non-blocking pool answered "Too many connections" as 500s under
load. Connection errors and timeouts are retried with exponential backoff, idle
connections are health-checked, and replies are parsed by hiredis when installed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventpulse.settings import Settings, get_settings

RedisClient = aioredis.Redis | RedisCluster

_clients: dict[tuple[int, str], RedisClient] = {}


def _retry(settings: Settings) -> Retry:
    return Retry(
        ExponentialWithJitterBackoff(base=0.05, cap=2.0),
        retries=settings.redis_retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError, ConnectionResetError, OSError),
    )


def create_client(settings: Settings | None = None, url: str | None = None) -> RedisClient:
    """A new client with its own pool, built from settings (`url` overrides redis_url)."""
    settings = settings or get_settings()
    url = url or settings.redis_url
    if url == "embedded":
        raise RuntimeError(
            "EVENTPULSE_REDIS_URL is 'embedded' but no embedded Redis was started here; "
            "run `eventpulse up` or set a redis:// URL"
        )
    common: dict[str, Any] = dict(
        retry=_retry(settings),
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        health_check_interval=settings.redis_health_check_s,
        decode_responses=False,
    )
    if settings.redis_cluster:
        return RedisCluster.from_url(url, max_connections=settings.redis_pool_size, **common)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_pool_size,
        timeout=settings.redis_pool_timeout_s,
        retry_on_timeout=True,
        **common,
    )
    return aioredis.Redis(connection_pool=pool)


def get_client(settings: Settings | None = None) -> RedisClient:
    """The shared client of this process and event loop (one pool per process)."""
    settings = settings or get_settings()
    loop = asyncio.get_running_loop()
    key = (id(loop), settings.redis_url)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = create_client(settings)
    return client


def pool_stats(client: RedisClient) -> dict[str, int]:
    """In-use and idle connection counts, for /readyz and the pool gauges."""
    if isinstance(client, RedisCluster):
        in_use = idle = 0
        for node in client.get_nodes():
            in_use += len(node._connections) - len(node._free)
            idle += len(node._free)
        return {"in_use": in_use, "idle": idle, "max": client.max_connections}
    pool = client.connection_pool
    return {
        "in_use": len(pool._in_use_connections),
        "idle": len(pool._available_connections),
        "max": pool.max_connections,
    }


async def ping(client: RedisClient, timeout: float = 1.0) -> bool:
    try:
        return bool(await asyncio.wait_for(client.ping(), timeout))
    except Exception:
        return False

"""One bounded, blocking Redis connection pool per process.

Callers *wait* for a free connection (up to `redis_pool_timeout_s`) instead of failing:
the earlier product's non-blocking pool answered "Too many connections" as 500s under
load. Connection errors and timeouts are retried with exponential backoff, idle
connections are health-checked, and replies are parsed by hiredis when installed.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventpulse.settings import Settings, get_settings

REDIS_PIN = "redis>=8.1,<8.2"  # the series whose internals are read below (pyproject.toml)


class RedisInternalsChanged(RuntimeError):
    """The installed redis-py lacks an internal this module reads."""


def check_internals() -> None:
    """Fail at import, naming what is missing, if redis-py's internals that `pool_stats`
    and the cluster classes below read have moved, instead of answering wrong counts or
    failing mid-request. Builds the objects without any I/O (~8 ms)."""
    import redis

    cluster = RedisCluster(host="127.0.0.1", port=1)
    wanted = [(aioredis.BlockingConnectionPool(max_connections=1),
               ("_in_use_connections", "_available_connections", "max_connections")),
              (ClusterNode("127.0.0.1", 1), ("_connections", "_free", "max_connections")),
              (cluster, ("_initialize", "get_nodes", "initialize")),
              (ClusterPipeline(cluster), ("cluster_client", "execute_command", "execute"))]
    missing = [f"{type(obj).__name__}.{name}" for obj, names in wanted for name in names
               if not hasattr(obj, name)]
    if missing:
        raise RedisInternalsChanged(
            f"redis-py {redis.__version__} has no {', '.join(missing)}: eventpulse/redis.py "
            f"reads them and was written for {REDIS_PIN!r}; install that series")


check_internals()


class WaitingRedisCluster(RedisCluster):
    """A Redis Cluster client whose callers wait for a connection, like the blocking pool.

    redis-py's cluster node pools raise MaxConnectionsError at once when full (the earlier
    product's "Too many connections" 500s). Commands and pipelines here take one of
    `redis_pool_size` permits first, waiting up to `redis_pool_timeout_s`; each node may
    open a few connections more than that for pub/sub and a pipeline spanning nodes.
    """

    HEADROOM = 4

    def _init_waiting(self, permits: int, timeout_s: float) -> None:
        self.pool_size = permits
        self._permits = asyncio.Semaphore(permits)
        self._permit_timeout = timeout_s

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._permits.acquire(), self._permit_timeout)
        except asyncio.TimeoutError:
            raise RedisConnectionError("No connection available.") from None
        try:
            yield
        finally:
            self._permits.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.permit():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _WaitingPipeline(self, transaction)


class _WaitingPipeline(ClusterPipeline):
    """A cluster pipeline that waits for a permit; transactions queue their commands
    until `execute`.

    redis-py queues each command of an async cluster transaction through `asyncio.run` in
    a helper thread; on a client not yet initialized that would open the cluster's
    connections on the helper's short-lived loop, leaving them unusable ("Event loop is
    closed"). Deferring the queueing until the client is initialized on the caller's loop
    keeps that thread free of I/O.
    """

    def __init__(self, client: RedisCluster, transaction: Any = None) -> None:
        super().__init__(client, transaction)
        self._deferred: list[tuple[tuple, dict]] | None = [] if transaction else None

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._deferred is not None:
            self._deferred.append((args, kwargs))
            return self
        return super().execute_command(*args, **kwargs)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        client = self.cluster_client
        async with client.permit():
            if self._deferred:
                if client._initialize:
                    await client.initialize()
                calls, self._deferred = self._deferred, None
                try:
                    for call_args, call_kwargs in calls:
                        super().execute_command(*call_args, **call_kwargs)
                finally:
                    self._deferred = []
            return await super().execute(*args, **kwargs)


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
        cluster = WaitingRedisCluster.from_url(
            url, max_connections=settings.redis_pool_size + WaitingRedisCluster.HEADROOM, **common)
        cluster._init_waiting(settings.redis_pool_size, settings.redis_pool_timeout_s)
        return cluster
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


_scripts: dict[tuple[int, str], Any] = {}


def script(client: RedisClient, source: str) -> Any:
    """`source` registered on `client` once (redis-py sends EVALSHA, loading it if needed)."""
    key = (id(client), source)
    found = _scripts.get(key)
    if found is None:
        found = _scripts[key] = client.register_script(source)
    return found


def pool_stats(client: RedisClient) -> dict[str, int]:
    """In-use and idle connection counts (and Redis nodes), for /readyz and the gauges."""
    if isinstance(client, RedisCluster):
        in_use = idle = 0
        for node in client.get_nodes():
            in_use += len(node._connections) - len(node._free)
            idle += len(node._free)
        limit = getattr(client, "pool_size", None)
        if limit is None:  # a plain RedisCluster: its limit is per node
            limit = sum(node.max_connections for node in client.get_nodes())
        return {"in_use": in_use, "idle": idle, "max": limit, "nodes": len(client.get_nodes())}
    pool = client.connection_pool
    return {
        "in_use": len(pool._in_use_connections),
        "idle": len(pool._available_connections),
        "max": pool.max_connections,
        "nodes": 1,
    }


async def ping(client: RedisClient, timeout: float = 1.0) -> bool:
    try:
        return bool(await asyncio.wait_for(client.ping(), timeout))
    except Exception:
        return False

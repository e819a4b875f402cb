"""The Ray Serve application: a FastAPI ingress with every route of the HTTP API.

`serve run serve.app:app` or `serve deploy configs/serve.yaml`. Replicas are stateless
apart from their caches (`serve/runtime.py`).
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from starlette.middleware.gzip import GZipMiddleware

from eventpulse.redis import ping, pool_stats
from eventpulse.settings import get_settings
from serve import errors, side
from serve.autoscaling import SIDE_ONGOING
from serve.responses import json
from serve.routes import admin, events, pages, purchases, queue, tickets
from serve.middleware import Guard
from serve.runtime import get_runtime

api = FastAPI(title="Event-Pulse", version="0.1.0",
              description="A fair, exact and fast ticket-sale waiting room on Ray.")
errors.install(api)
# Hottest first: see `_hot_first` below.
ROUTERS = (tickets, events, queue, purchases, admin, pages)
for module in ROUTERS:
    api.include_router(module.router)


@api.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """Liveness: the replica answers."""
    return json({"status": "ok"})


@api.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
async def readyz() -> dict:
    """Readiness: Redis answers through this replica's pool."""
    rt = get_runtime()
    redis_ok = await ping(rt.redis)
    body = {"status": "ready" if redis_ok else "not_ready", "redis": redis_ok,
            "redis_pool": pool_stats(rt.redis), "serve": True}
    return json(body, status=200 if redis_ok else 503,
                headers=None if redis_ok else {"Retry-After": "1"})


def _hot_first(route) -> int:
    """Health checks, then the routers in `ROUTERS` order, then the docs.

    Serve names every request's route for its metrics by trying this list in order, and
    FastAPI routes what the fast path does not serve by the same walk: hottest first, the
    five `seed-mix` GETs are named in ~18 µs on average (`/healthz` behind the docs and
    24 API routes took 44 µs). No two of our paths overlap, so the order decides nothing
    but the cost.
    """
    if getattr(route, "path", None) in ("/healthz", "/readyz"):
        return 0
    inner = getattr(route, "original_router", None)
    for rank, module in enumerate(ROUTERS, start=1):
        if inner is module.router:
            return rank
    return len(ROUTERS) + 1


api.router.routes.sort(key=_hot_first)

# Guard outermost (admission: cheap refusals first), then gzip for larger bodies.
api.add_middleware(GZipMiddleware, minimum_size=1024)
api.add_middleware(Guard)


# max_ongoing_requests is high because handlers mostly await Redis or an actor and SSE
# streams stay open for minutes; admission sheds load before latency piles up.
# A quarter CPU a replica, as configs/serve.yaml deploys it: on a 2-core machine replicas,
# actors and the job must all fit (tests/test_app_routes.py keeps the two equal).
REPLICA_CPUS = 0.25


@serve.deployment(name="Ingress", max_ongoing_requests=10_000,
                  ray_actor_options={"num_cpus": REPLICA_CPUS})
@serve.ingress(api)
class Ingress:
    async def __init__(self) -> None:
        get_runtime().start()
        port = get_settings().side_port
        # the hot routes, beside Serve's ingress (why: serve/side.py)
        self._side = await side.start(port, api) if port else None

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The side server's requests for Serve's autoscaling, which counts only its own
        path (`serve/autoscaling.py`)."""
        return {SIDE_ONGOING: get_runtime().side_in_flight}


app = Ingress.bind()

"""The route table's order: Serve names every request by walking it, hottest first."""

from __future__ import annotations

import pytest
from ray.serve._private.thirdparty.get_asgi_route_name import get_asgi_route_name
from starlette.routing import Match

from serve.app import api


def _scope(path: str, method: str = "GET") -> dict:
    return {"type": "http", "path": path, "method": method, "root_path": "",
            "headers": [], "query_string": b""}


def _checked_before_naming(path: str, method: str = "GET") -> int:
    """How many top-level entries Serve's walk tries before the one that names `path`."""
    for i, route in enumerate(api.routes):
        inner = getattr(route, "original_router", None)
        candidates = inner.routes if inner is not None else [route]
        if any(r.matches(_scope(path, method))[0] == Match.FULL for r in candidates):
            return i
    raise AssertionError(f"{method} {path} matches no route")


@pytest.mark.parametrize("path, name", [
    ("/healthz", "/healthz"),
    ("/api/events/e1", "/api/events/{event_id}"),
    ("/api/events/e1/availability", "/api/events/{event_id}/availability"),
    ("/api/queue/position", "/api/queue/position"),
    ("/api/users/u1/tickets", "/api/users/{user_id}/tickets"),
    ("/api/events/e1/queue/me/stream", "/api/events/{event_id}/queue/me/stream"),
    ("/api/admin/stats", "/api/admin/stats"),
    ("/docs", "/docs"),
])
def test_every_route_keeps_its_name_after_reordering(path, name):
    assert get_asgi_route_name(api, _scope(path)) == name


def test_the_seed_mix_routes_come_before_the_docs_and_admin():
    docs = _checked_before_naming("/docs")
    admin = _checked_before_naming("/api/admin/stats")
    assert _checked_before_naming("/healthz") == 0
    for path in ("/api/events/e1", "/api/events/e1/availability", "/api/queue/position",
                 "/api/users/u1/tickets"):
        assert _checked_before_naming(path) < min(docs, admin), path


def test_no_two_routes_claim_the_same_request():
    """Reordering is only safe while paths do not overlap: each probe matches once."""
    probes = [("/api/events", "GET"), ("/api/events/e1", "GET"), ("/api/events/e1/queue", "POST"),
              ("/api/events/e1/queue/me", "GET"), ("/api/events/e1/purchases", "POST"),
              ("/api/purchases/p1", "GET"), ("/api/tickets/t1", "GET"),
              ("/api/admin/events/e1/queue", "PATCH"), ("/events/e1/waiting-room", "GET")]
    flat = [r for top in api.routes for r in getattr(getattr(top, "original_router", None),
                                                     "routes", [top])]
    for path, method in probes:
        full = [r.path for r in flat if r.matches(_scope(path, method))[0] == Match.FULL]
        assert len(full) == 1, (path, method, full)


def test_a_replica_asks_for_the_cpus_the_serve_config_deploys_it_with():
    import yaml

    from eventpulse.resources import config_path
    from serve.app import REPLICA_CPUS, Ingress

    config = yaml.safe_load(config_path("serve.yaml").read_text())
    (ingress,) = config["applications"][0]["deployments"]
    assert ingress["ray_actor_options"]["num_cpus"] == REPLICA_CPUS
    assert Ingress.ray_actor_options["num_cpus"] == REPLICA_CPUS

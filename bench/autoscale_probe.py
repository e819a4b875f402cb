"""Driver for the autoscaling test: a 2-node Ray cluster on this machine, the Serve app with
short autoscaling delays and the autoscaling policy `configs/serve.yaml` ships, a load step on
a route the replicas' side server serves, then quiet. Prints one JSON line of what it saw.

Run by tests/test_autoscaling.py in a subprocess (the test session already has its own
`ray.init()`); also usable by hand: `python -m bench.autoscale_probe`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from cluster.launcher import free_port


def replica_count(serve) -> tuple[int, dict]:
    status = serve.status().applications["eventpulse"].deployments["Ingress"]
    return status.replica_states.get("RUNNING", 0), dict(status.replica_states)


async def load(url: str, token: str, seconds: float, connections: int) -> int:
    import aiohttp

    done = 0
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"}
    # the user's tickets: a route HAProxy sends to the replicas' side server, whose requests Serve
    # does not count (`serve/autoscaling.py`)
    path = f"{url}/api/users/org/tickets"

    async def worker(session):
        nonlocal done
        while time.monotonic() < deadline:
            async with session.get(path, headers=headers) as r:
                await r.read()
                assert r.status == 200, (r.status, await r.text())
                done += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return done


def side_requests(url: str, token: str, replicas: int) -> int:
    """Requests the replicas' side servers have served, summed over the replicas (asked through
    Serve, which picks one per request, until all `replicas` have answered)."""
    import httpx

    seen: dict[str, int] = {}
    for _ in range(200):
        stats = httpx.get(f"{url}/api/admin/stats", timeout=10,
                          headers={"Authorization": f"Bearer {token}"}).json()
        seen[stats["replica"]] = stats["side"]["requests"]
        if len(seen) >= replicas:
            break
    assert len(seen) >= replicas, f"only {len(seen)} of {replicas} replicas answered"
    return sum(seen.values())


def wait_side_up(url: str, token: str, seconds: float) -> None:
    """Until HAProxy sends the side server's routes to the side server: it does once its health check
    passes, and through Serve before that."""
    import httpx

    deadline = time.monotonic() + seconds
    while side_requests(url, token, 1) == 0:
        assert time.monotonic() < deadline, "HAProxy never sent a request to the side server"
        httpx.get(f"{url}/api/users/org/tickets", timeout=10,
                  headers={"Authorization": f"Bearer {token}"})
        time.sleep(0.25)


def shipped_policy() -> dict:
    """The autoscaling policy `configs/serve.yaml` deploys the Ingress with."""
    import yaml

    from cluster.launcher import SERVE_CONFIG

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    deployment = next(d for d in config["applications"][0]["deployments"]
                      if d["name"] == "Ingress")
    return deployment["autoscaling_config"]["policy"]


def main() -> None:
    # `--default-policy`: Serve's own policy instead of the shipped one, to see the difference
    policy = {} if "--default-policy" in sys.argv else {"policy": shipped_policy()}
    tmp = tempfile.mkdtemp(prefix="ep-autoscale-")
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--dir", tmp, "--save", ""],
                             stdout=subprocess.DEVNULL)
    secret = secrets.token_urlsafe(32)
    os.environ.update({"EVENTPULSE_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
                       "EVENTPULSE_DATA_DIR": tmp, "EVENTPULSE_TOKEN_SECRET": secret,
                       "RAY_USAGE_STATS_ENABLED": "0",
                       # its replicas' side server apart from the session's (SO_REUSEPORT would
                       # let the session's HAProxy reach this cluster's replicas)
                       "EVENTPULSE_SIDE_PORT": str(free_port())})
    from pathlib import Path

    from cluster.haproxy import side_checks
    from cluster.launcher import RAY_ENV, haproxy_base, haproxy_env

    # Serve's HAProxy ingress, as `eventpulse up` runs it (run by hand, too): the side server's
    # routes reach the side server only through it
    os.environ.update({k: v for k, v in RAY_ENV.items() if k.startswith("RAY_SERVE_")})
    os.environ.update(haproxy_env(Path(tmp)))  # never share HAProxy ports with another Ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    import httpx
    import ray
    from ray import serve

    from eventpulse.auth import mint_token
    from serve.app import Ingress

    ray.init(address=cluster.address, namespace="eventpulse", logging_level="ERROR",
             log_to_driver=False)
    seen: list[dict] = []
    try:
        port = free_port()
        # One proxy, on the head: with a proxy on every node that has a replica, the one that
        # starts on the worker for a replica placed there makes Serve reload the head's
        # HAProxy, at a moment of its own, often inside the load; each reload sent a share
        # of it through Serve's path (in one CI run 59 %), which Serve's default policy then
        # counts. The head's HAProxy reaches the replicas of both nodes.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        app = Ingress.options(
            ray_actor_options={"num_cpus": 0.1},
            autoscaling_config={"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                "target_ongoing_requests": 2, "upscale_delay_s": 1,
                                "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                                "look_back_period_s": 2, **policy}).bind()
        serve.run(app, name="eventpulse", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        org = mint_token("org", ["organizer"], secret=secret)
        deadline = time.monotonic() + 60
        while True:  # the proxy may not route to the new app for a moment after serve.run
            r = httpx.post(f"{url}/api/events", headers={"Authorization": f"Bearer {org}"}, json={
                "name": "autoscale", "event_date": "2027-01-01T00:00:00Z", "price": 1,
                "total_tickets": 10}, timeout=30)
            if r.status_code == 201 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 201, (r.status_code, r.text)
        wait_side_up(url, org, 60)  # with one replica: its count is the whole count
        side_before = side_requests(url, org, 1)
        checks_before = side_checks(haproxy_base(Path(tmp)))
        start = time.monotonic()
        pool = ThreadPoolExecutor(1)
        task = pool.submit(lambda: asyncio.run(load(url, org, 25, 48)))
        up_at = None
        while not task.done() and time.monotonic() - start < 30:
            running, states = replica_count(serve)
            seen.append({"t": round(time.monotonic() - start, 1), "running": running, "phase": "load",
                         "haproxy": side_checks(haproxy_base(Path(tmp)))})
            if running > 1 and up_at is None:
                up_at = time.monotonic() - start
            time.sleep(1)
        served = task.result()
        checks = side_checks(haproxy_base(Path(tmp)))
        pool.shutdown()
        # at once: a replica that scales down takes its count with it
        side_served = side_requests(url, org, replica_count(serve)[0]) - side_before
        quiet_at = time.monotonic()
        down_at = None
        while time.monotonic() - quiet_at < 60:
            running, _ = replica_count(serve)
            seen.append({"t": round(time.monotonic() - start, 1), "running": running, "phase": "quiet"})
            if running == 1:
                down_at = time.monotonic() - quiet_at
                break
            time.sleep(1)
        # GCS's own actor table (the state API would need the dashboard on the head).
        nodes = {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                 if a.get("ClassName", "").startswith("ServeReplica") and a.get("State") == "ALIVE"}
        print(json.dumps({"max_running": max(s["running"] for s in seen),
                          "seconds_to_scale_up": up_at, "seconds_to_scale_down": down_at,
                          "requests": served, "side_requests": side_served,
                          "policy": policy.get("policy", "serve's default"), "side_checks": checks,
                          # HAProxy took the side server down during the load this often
                          "side_went_down": sum(int(c.get("went_down", 0)) for c in checks)
                          - sum(int(c.get("went_down", 0)) for c in checks_before),
                          "haproxy_reloaded": {c["pid"] for c in checks}
                          != {c["pid"] for c in checks_before},
                          "timeline": seen, "replica_nodes": len(nodes)}))
    finally:
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()
        cluster.shutdown()
        from cluster.launcher import stop_haproxy

        stop_haproxy(Path(tmp))  # and its config directory
        redis.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Driver for the autoscaling test: a 2-node Ray cluster on this machine, the Serve app with
short autoscaling delays, a load step, then quiet. Prints one JSON line of what it saw.

Run by tests/test_autoscaling.py in a subprocess (the test session already has its own
`ray.init()`); also usable by hand: `python -m tests.autoscale_probe`.
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

from cluster.launcher import free_port


def replica_count(serve) -> tuple[int, dict]:
    status = serve.status().applications["eventpulse"].deployments["Ingress"]
    return status.replica_states.get("RUNNING", 0), dict(status.replica_states)


async def load(url: str, token: str, event_id: str, seconds: float, connections: int) -> int:
    import aiohttp

    done = 0
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {token}"}

    # A query string keeps these reads off HAProxy's edge cache and the replicas' lane,
    # which Serve's autoscaling does not see (it counts the requests on Serve's own path).
    path = f"{url}/api/events/{event_id}/availability?via=serve"

    async def worker(session):
        nonlocal done
        while time.monotonic() < deadline:
            async with session.get(path, headers=headers) as r:
                await r.read()
                done += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return done


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="ep-autoscale-")
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--dir", tmp, "--save", ""],
                             stdout=subprocess.DEVNULL)
    secret = secrets.token_urlsafe(32)
    os.environ.update({"EVENTPULSE_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
                       "EVENTPULSE_DATA_DIR": tmp, "EVENTPULSE_TOKEN_SECRET": secret,
                       "RAY_USAGE_STATS_ENABLED": "0",
                       # its replicas' lane apart from the session's (SO_REUSEPORT would
                       # let the session's HAProxy reach this cluster's replicas)
                       "EVENTPULSE_LANE_PORT": str(free_port())})
    from pathlib import Path

    from cluster.launcher import haproxy_env

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
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = Ingress.options(
            ray_actor_options={"num_cpus": 0.1},
            autoscaling_config={"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                "target_ongoing_requests": 2, "upscale_delay_s": 1,
                                "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                                "look_back_period_s": 2}).bind()
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
        event = r.json()
        start = time.monotonic()
        loop = asyncio.new_event_loop()
        task = loop.run_in_executor(None, lambda: asyncio.run(
            load(url, org, event["id"], 25, 48)))
        up_at = None
        while time.monotonic() - start < 30:
            running, states = replica_count(serve)
            seen.append({"t": round(time.monotonic() - start, 1), "running": running, "phase": "load"})
            if running > 1 and up_at is None:
                up_at = time.monotonic() - start
            time.sleep(1)
        served = loop.run_until_complete(task)
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
                          "requests": served, "timeline": seen, "replica_nodes": len(nodes)}))
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

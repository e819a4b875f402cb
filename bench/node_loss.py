"""Driven by tests/test_faults_node.py in its own process (the session has a ray.init()).

Starts a 2-node Ray cluster on this machine (head + one worker), creates a few events
whose actors SPREAD over both nodes, fills their lines, removes the worker node and checks
that Ray recreated the worker's actors (only the head is left) with their lines intact,
rebuilt from Redis. Prints one JSON line with what it measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time


async def scenario(cluster, worker) -> dict:
    import ray

    from actors.directory import get_queue
    from eventpulse import ledger
    from eventpulse.redis import create_client

    r = create_client()
    users = [f"n{i:04d}" for i in range(200)]
    lines = {}
    for _ in range(6):  # SPREAD places event actors across both nodes
        doc = await ledger.create_event(r, {
            "name": "node loss", "description": "", "location": "", "event_date": "2027-01-01",
            "price": 1.0, "total_tickets": 5, "max_per_user": 1, "organizer_id": "o",
            "ticket_types": [{"name": "general", "price": 1.0, "quantity": 5}]})
        q = get_queue(doc["id"])
        for i in range(0, len(users), 50):
            await q.join_many.remote([(u, 1, None, None) for u in users[i:i + 50]])
        lines[doc["id"]] = [r[2] for r in await q.read_many.remote(users)]
    placed = {eid: _actor_node(eid) for eid in lines}
    on_worker = [eid for eid, node in placed.items() if node == worker.node_id]
    lost_at = time.monotonic()
    cluster.remove_node(worker, allow_graceful=False)
    same = []
    for eid in on_worker:
        after = None
        while time.monotonic() - lost_at < 120:
            try:
                read = await asyncio.wait_for(get_queue(eid).read_many.remote(users), 30)
                after = [r[2] for r in read]
                break
            except (ray.exceptions.RayError, asyncio.TimeoutError):
                await asyncio.sleep(0.5)
        same.append(after == lines[eid])
    recovered_s = time.monotonic() - lost_at
    await r.aclose()
    return {"events": len(lines), "on_worker": len(on_worker),
            "all_same_line": all(same), "recovered_s": round(recovered_s, 1),
            "users": len(users),
            # where each actor was (None: the state API never showed it alive), for a failure
            "placed": ["worker" if n == worker.node_id else "head" if n else None
                       for n in placed.values()]}


def _actor_node(event_id: str) -> str | None:
    """The node of the event's live actor, as the state API reports it (which can lag
    behind the GCS on a busy machine: asked again for up to 20 s)."""
    import ray.util.state

    from actors.directory import actor_name

    deadline = time.monotonic() + 20
    while True:
        for a in ray.util.state.list_actors(filters=[("name", "=", actor_name(event_id))],
                                            address=os.environ["EP_DASHBOARD"], limit=10):
            if a.state == "ALIVE":
                return a.node_id
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def main() -> int:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": int(sys.argv[1])})
    worker = cluster.add_node(num_cpus=1, resources={"ep_worker": 1})
    ray.init(address=cluster.address, namespace="eventpulse", log_to_driver=False,
             logging_level="ERROR")
    cluster.wait_for_nodes()
    os.environ["EP_DASHBOARD"] = f"http://127.0.0.1:{sys.argv[1]}"
    try:
        print(json.dumps(asyncio.run(scenario(cluster, worker))), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

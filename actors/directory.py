"""Finding (or creating) the `EventQueue` actor of an event.

One named, detached actor per event in the `eventpulse` namespace. `get_if_exists=True`
makes creation race-free across replicas; `max_restarts=-1` has Ray recreate the actor
(on a surviving node after a node loss), and the new instance rebuilds its line from Redis.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from actors.event_queue import EventQueue

NAMESPACE = "eventpulse"

# Zero CPUs: an actor is mostly waiting on Redis and must schedule on a 2-core machine
# next to Serve replicas. Spread, so a cluster's event actors don't all pile on the head.
_ACTOR_OPTIONS: dict[str, Any] = dict(
    namespace=NAMESPACE,
    lifetime="detached",
    get_if_exists=True,
    max_restarts=-1,
    max_task_retries=-1,
    num_cpus=0,
    max_concurrency=10_000,
    scheduling_strategy="SPREAD",
)

_RemoteQueue = ray.remote(EventQueue)
_handles: dict[str, Any] = {}


def actor_name(event_id: str) -> str:
    return f"event-queue:{event_id}"


def _options(event_id: str) -> dict[str, Any]:
    opts = dict(_ACTOR_OPTIONS, name=actor_name(event_id))
    # Operators may pin hot events' actors onto nodes that advertise a custom resource.
    hot = os.environ.get("EVENTPULSE_HOT_EVENT_RESOURCE")
    hot_events = set(filter(None, os.environ.get("EVENTPULSE_HOT_EVENTS", "").split(",")))
    if hot and event_id in hot_events:
        opts["resources"] = {hot: 0.001}
        opts.pop("scheduling_strategy")
    # Pass the process's EventPulse settings on, so the actor reaches the same Redis.
    env = {k: v for k, v in os.environ.items() if k.startswith("EVENTPULSE_")}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def get_queue(event_id: str) -> Any:
    """The actor handle of `event_id`'s line, created on first use (cached per process)."""
    handle = _handles.get(event_id)
    if handle is None:
        handle = _handles[event_id] = _RemoteQueue.options(**_options(event_id)).remote(event_id)
    return handle


def forget(event_id: str) -> None:
    """Drop a cached handle (after the actor was killed for good)."""
    _handles.pop(event_id, None)


async def call(event_id: str, method: str, *args: Any) -> Any:
    """`method(*args)` on the event's actor. An actor that left for good (an idle line,
    `line_idle_exit_s`) answers ActorDiedError on the handle cached here: the call goes
    once more, to the actor created again under the same name."""
    try:
        return await getattr(get_queue(event_id), method).remote(*args)
    except ActorDiedError:
        forget(event_id)
        return await getattr(get_queue(event_id), method).remote(*args)

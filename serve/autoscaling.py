"""Serve's autoscaling, counting the requests the replicas' side server serves too.

Serve scales a deployment on its ongoing requests: those on Serve's own request path,
counted by each replica. The side server (`serve/side.py`) serves the hottest routes beside that
path, so Serve never counts them, and under a sale most of the load is theirs: position
reads, my entry, the user's tickets, joins and the edge cache's misses. Each replica
reports how many side-server requests it is answering (`Ingress.record_autoscaling_stats`; Serve
samples it with its own count and averages both over `look_back_period_s`), and this
policy adds them to Serve's count before Serve's own rule: as many replicas as the ongoing
requests divided by `target_ongoing_requests`. Serve applies `min_replicas`,
`max_replicas` and the up- and downscale delays to the answer, as for its default policy.

Open SSE streams are not counted, on either path's behalf: a stream waits for the hub to
push its changes (`serve/sse.py`) and does no work of its own between pushes.

`configs/serve.yaml` names this policy (`autoscaling_config.policy.policy_function`).
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

SIDE_ONGOING = "eventpulse_side_ongoing_requests"


def side_ongoing(ctx: AutoscalingContext) -> float:
    """The side server requests the running replicas reported, averaged over the look-back."""
    return sum((ctx.aggregated_metrics or {}).get(SIDE_ONGOING, {}).values())


def side_aware_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Replicas for Serve's ongoing requests and the side server's together, at the target each."""
    if ctx.current_num_replicas == 0:  # Serve's cold start: its wrapper answers first
        return ctx.target_num_replicas, {}
    ongoing = ctx.total_num_requests + side_ongoing(ctx)
    return ongoing / ctx.config.get_target_ongoing_requests(), {}

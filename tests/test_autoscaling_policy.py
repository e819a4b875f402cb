"""The autoscaling policy (`serve/autoscaling.py`) on Serve's own context objects: the side server's
ongoing requests count as Serve's do, and Serve's wrapper takes the answer."""

from __future__ import annotations

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serve.autoscaling import SIDE_ONGOING, side_aware_policy

DEPLOYMENT = DeploymentID(name="Ingress", app_name="eventpulse")
CONFIG = AutoscalingConfig(min_replicas=2, max_replicas=4, target_ongoing_requests=400,
                           upscale_delay_s=0, downscale_delay_s=0)


def context(serve_ongoing: float, side: list[float] | None, replicas: int = 2
            ) -> AutoscalingContext:
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(replicas)]
    metrics = None if side is None else {SIDE_ONGOING: dict(zip(ids, side))}
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name="Ingress", app_name="eventpulse",
        current_num_replicas=replicas, target_num_replicas=replicas, running_replicas=ids,
        total_num_requests=serve_ongoing, total_queued_requests=0,
        aggregated_metrics=metrics, raw_metrics=None,
        capacity_adjusted_min_replicas=2, capacity_adjusted_max_replicas=4,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=None, config=CONFIG)


def test_side_server_requests_count_as_serves_own():
    desired, _ = side_aware_policy(context(100, [500, 600]))
    assert desired == (100 + 500 + 600) / 400


def test_without_lane_reports_it_is_serves_rule():
    assert side_aware_policy(context(1200, None))[0] == 1200 / 400
    assert side_aware_policy(context(1200, []))[0] == 1200 / 400


def test_serves_wrapper_takes_the_answer_as_it_takes_its_own_policys():
    policy = _apply_autoscaling_config(side_aware_policy)  # as the controller wraps it
    assert policy(context(0, [700, 500]))[0] == 3      # 1,200 ongoing at 400 each
    assert policy(context(500, [0, 0, 0], replicas=3))[0] == 2  # 500 at 400 each

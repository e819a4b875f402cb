"""ray-cluster.yaml passes Ray's own cluster-launcher checks, and says what we rely on.

The checks are the ones `ray up` runs before touching a cloud: `prepare_config` (fills
defaults from ray/autoscaler/<provider>/defaults.yaml, merges setup commands) and
`validate_config` (jsonschema against ray/autoscaler/ray-schema.json, plus the
head-node-type and min/max-workers rules). Also: cluster/deploy.py's idempotent
purchase-job submission, against a stand-in for JobSubmissionClient.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray-cluster.yaml"
SERVE_ENV = ("RAY_SERVE_ENABLE_HA_PROXY=1", "RAY_SERVE_THROUGHPUT_OPTIMIZED=1", "RAY_AUTH_MODE=token",
             'RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response"',
             "RAY_SERVE_HAPROXY_METRICS_ENABLED=0",
             # every node's HAProxy through our wrapper, and the replicas' side server (cluster/haproxy.py)
             "RAY_SERVE_HAPROXY_BINARY_PATH=$(python -m cluster.haproxy install ",
             "EVENTPULSE_SIDE_PORT=8100")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_raw_file_matches_ray_schema(raw: dict[str, Any]) -> None:
    # The file as written, before defaults are merged in: no unknown or misspelt keys.
    jsonschema.validate(raw, _schema())


def test_prepared_config_passes_validate_config(prepared: dict[str, Any]) -> None:
    assert prepared["cluster_name"] == "eventpulse"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"


def test_schema_check_is_not_vacuous(raw: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["ray.worker.default"]["max_worker"] = 3  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    missing_head = copy.deepcopy(raw)
    missing_head["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(missing_head))


def test_node_types_and_autoscaling(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert head in types
    assert types[head]["max_workers"] == 0
    workers = types["ray.worker.default"]
    assert workers["min_workers"] == 0
    assert workers["max_workers"] == 10
    assert workers["resources"]["CPU"] > 0
    assert types[head]["resources"]["CPU"] > 0
    assert prepared["max_workers"] >= sum(
        t.get("max_workers", 0) for name, t in types.items() if name != head
    )
    assert prepared["idle_timeout_minutes"] > 0
    # The optional hot-event nodes carry the custom resource EventQueue actors can ask for.
    assert types["ray.worker.hot"]["resources"]["eventpulse_hot_events"] > 0
    assert types["ray.worker.hot"]["min_workers"] == 0


def test_project_is_mounted_and_installed(prepared: dict[str, Any]) -> None:
    mounts = prepared["file_mounts"]
    assert mounts["/home/ray/eventpulse"] == "."
    assert "/home/ray/.ray/auth_token" in mounts  # workers need the head's token to join
    assert "/home/ray/eventpulse.env" in mounts
    for cmds in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert "pip install -e /home/ray/eventpulse" in cmds
    assert any(".venv" in p for p in prepared["rsync_exclude"])


def _joined(cmds: list[str]) -> str:
    return "\n".join(cmds)


def test_head_start_command(prepared: dict[str, Any]) -> None:
    start = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert len(start) == 1
    cmd = start[0]
    # The Serve/auth variables are in the environment of `ray start` itself.
    before_start = cmd.split("ray start")[0]
    for assignment in SERVE_ENV:
        assert assignment in before_start, assignment
    args = shlex.split(cmd.split("ray start", 1)[1])
    assert "--head" in args
    assert "--dashboard-host=0.0.0.0" in args
    assert "--metrics-export-port=8080" in args
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in args
    assert ". /home/ray/eventpulse.env" in before_start


def test_worker_start_command(prepared: dict[str, Any]) -> None:
    cmds = _joined(prepared["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in cmds
    before_start = cmds.split("ray start")[0]
    for assignment in SERVE_ENV:  # replicas on workers read the HAProxy flag too
        assert assignment in before_start, assignment


def test_usage_is_documented_at_the_top() -> None:
    head = CLUSTER_YAML.read_text().split("cluster_name:")[0]
    for text in (
        "ray up ray-cluster.yaml",
        "ray submit ray-cluster.yaml cluster/deploy.py",
        "serve deploy",
        "configs/serve.yaml",
        "ray job submit --no-wait",
        "python -m cluster.purchase_job",
    ):
        assert text in head, text


# --- cluster/deploy.py: the idempotent purchase-job submission ---------------------------


class FakeJobs:
    """Just enough of ray.job_submission.JobSubmissionClient."""

    def __init__(self, jobs: list[tuple[str | None, str]]) -> None:
        self.jobs = [SimpleNamespace(submission_id=s, status=st) for s, st in jobs]
        self.submitted: list[dict[str, Any]] = []

    def list_jobs(self) -> list[SimpleNamespace]:
        return list(self.jobs)

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        self.jobs.append(SimpleNamespace(submission_id=kwargs["submission_id"], status="PENDING"))
        return kwargs["submission_id"]


@pytest.fixture(scope="module")
def deploy() -> Iterator[Any]:
    # Importing cluster.deploy sets RAY_AUTH_MODE=token if unset; keep that from leaking
    # into other test modules of the same run.
    before = os.environ.get("RAY_AUTH_MODE")
    from cluster import deploy as module

    yield module
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


@pytest.mark.parametrize("status", ["RUNNING", "PENDING"])
def test_live_purchase_job_is_left_alone(deploy: Any, status: str) -> None:
    client = FakeJobs([("eventpulse-purchase-job-old", "FAILED"), ("eventpulse-purchase-job", status)])
    assert deploy.ensure_purchase_job(client, "x", {}) == "eventpulse-purchase-job"
    assert client.submitted == []


def test_finished_or_foreign_jobs_lead_to_a_fresh_submission(deploy: Any) -> None:
    client = FakeJobs(
        [
            ("eventpulse-purchase-job", "SUCCEEDED"),
            ("eventpulse-purchase-job-20250101-000000-aaaa", "STOPPED"),
            ("eventpulse-purchase-jobber", "RUNNING"),  # not ours: prefix must end at '-'
            (None, "RUNNING"),  # driver jobs have no submission id
        ]
    )
    job_id = deploy.ensure_purchase_job(client, None, {"EVENTPULSE_REDIS_URL": "redis://r:6379/0"})
    assert job_id.startswith("eventpulse-purchase-job-")
    (call,) = client.submitted
    assert call["submission_id"] == job_id
    assert call["entrypoint"] == f"{shlex.quote(sys.executable)} -m cluster.purchase_job"
    assert call["runtime_env"] == {"env_vars": {"EVENTPULSE_REDIS_URL": "redis://r:6379/0"}}
    # Running it again finds the job it just submitted.
    assert deploy.ensure_purchase_job(client, None, {}) == job_id
    assert len(client.submitted) == 1


def test_serve_config_loads_as_serve_deploy_would(deploy: Any) -> None:
    path = ROOT / "configs" / "serve.yaml"
    if not path.is_file():
        pytest.skip("configs/serve.yaml not written yet")
    config = deploy.load_serve_config(path, http_host="0.0.0.0")
    assert config["http_options"]["host"] == "0.0.0.0"
    assert any(app["import_path"] == "serve.app:app" for app in config["applications"])


def test_default_env_forwards_eventpulse_variables_only(deploy: Any) -> None:
    env = deploy.forwarded_env({"EVENTPULSE_MODE": "production", "HOME": "/root", "PATH": "/bin"})
    assert env == {"EVENTPULSE_MODE": "production"}


def test_token_auth_is_turned_on_unless_a_mode_was_chosen(
    deploy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    deploy.ensure_token_auth_env()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    deploy.ensure_token_auth_env()
    assert os.environ["RAY_AUTH_MODE"] == "token"

"""Deploy Event-Pulse onto a running Ray cluster: the Serve app and the purchase job.

Run it on the head node, e.g. ``ray submit ray-cluster.yaml cluster/deploy.py``, or
anywhere that reaches the dashboard (``--address http://<head>:8265``). It does what
``serve deploy configs/serve.yaml`` and ``ray job submit --no-wait -- python -m
cluster.purchase_job`` do, and is safe to rerun:

* the Serve config is sent the way ``serve deploy`` sends it (ray/serve/scripts.py:
  ``ServeDeploySchema`` validation, then ``ServeSubmissionClient.deploy_applications``,
  a PUT to the dashboard's Serve REST API); Serve itself leaves unchanged applications
  alone;
* the purchase job is submitted only if no job whose submission id starts with
  ``eventpulse-purchase-job`` is PENDING or RUNNING.

The local launcher reuses :func:`deploy_serve` and :func:`ensure_purchase_job`.

Ray 2.60's clients present the cluster token only when ``RAY_AUTH_MODE=token`` is in
their environment, so this module sets it (if unset) before Ray reads its config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobSubmissionClient

PURCHASE_JOB_PREFIX = "eventpulse-purchase-job"
PURCHASE_JOB_MODULE = "cluster.purchase_job"
DEFAULT_DASHBOARD_ADDRESS = "http://127.0.0.1:8265"
# Where ray-cluster.yaml mounts the project on every node.
CLUSTER_PROJECT_DIR = Path("/home/ray/eventpulse")
# Environment passed on to the purchase job when the caller gives none.
FORWARDED_ENV_PREFIXES = ("EVENTPULSE_",)


def ensure_token_auth_env() -> None:
    """Make this process's Ray clients present the cluster token (``RAY_AUTH_MODE=token``).

    An explicit ``RAY_AUTH_MODE`` (e.g. ``disabled`` for a cluster without auth) is kept.
    If Ray already read its config in this process, it is re-read, as Ray's own
    ``_enable_token_auth`` does.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config  # type: ignore[attr-defined]

        Config.initialize("")


ensure_token_auth_env()


# --- Serve ------------------------------------------------------------------------------


def load_serve_config(
    config_path: str | os.PathLike[str], *, http_host: str | None = None
) -> dict[str, Any]:
    """Read and validate a Serve config file exactly as ``serve deploy`` does.

    ``http_host`` overrides ``http_options.host`` (configs/serve.yaml binds 127.0.0.1 for
    one machine; a cluster behind a load balancer needs 0.0.0.0).
    """
    import yaml
    from ray.serve.schema import ServeDeploySchema

    with open(config_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if http_host is not None:
        raw.setdefault("http_options", {})["host"] = http_host
    config = ServeDeploySchema.model_validate(raw)
    return config.model_dump(exclude_unset=True)


def deploy_serve(
    address: str, config_path: str | os.PathLike[str], *, http_host: str | None = None
) -> list[str]:
    """Send ``config_path`` to the Serve REST API at dashboard ``address``.

    Returns the names of the applications in the config. Raises ``RuntimeError`` with
    the dashboard's message if the request is refused.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    config = load_serve_config(config_path, http_host=http_host)
    ServeSubmissionClient(address).deploy_applications(config)
    return [app.get("name", "default") for app in config.get("applications", [])]


def serve_status(address: str) -> dict[str, str]:
    """Application name -> status (``DEPLOYING``, ``RUNNING``, ``DEPLOY_FAILED``, ...)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(address).get_serve_details()
    apps = details.get("applications") or {}
    return {name: str(app.get("status")) for name, app in apps.items()}


def wait_serve_running(
    address: str, app_names: Iterable[str], timeout_s: float, poll_s: float = 2.0
) -> dict[str, str]:
    """Wait until every named application is RUNNING; raise if one fails or time runs out."""
    names = list(app_names)
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve_status(address)
        failed = {n: s for n, s in statuses.items() if n in names and s == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve applications failed to deploy: {failed}")
        if all(statuses.get(n) == "RUNNING" for n in names):
            return statuses
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Serve applications not RUNNING after {timeout_s}s: {statuses}")
        time.sleep(poll_s)


def default_serve_config() -> Path:
    """``configs/serve.yaml`` of the installed project, or of the project on the cluster.

    ``ray submit`` copies this file alone to the head's home directory, so the path next
    to it is not enough there: the installed project's package data is looked up first.
    """
    candidates = []
    if importlib.util.find_spec("configs") is not None:
        from eventpulse.resources import config_path

        try:
            return config_path("serve.yaml")
        except FileNotFoundError as e:
            candidates.append(str(e))
    path = CLUSTER_PROJECT_DIR / "configs" / "serve.yaml"
    if path.is_file():
        return path
    raise FileNotFoundError("configs/serve.yaml not found; pass --config. Looked in: "
                            + ", ".join([*candidates, str(path)]))


# --- purchase job -----------------------------------------------------------------------


def default_entrypoint() -> str:
    """This interpreter, explicitly: ``ray job submit -- python`` would use the raylet's PATH."""
    return f"{shlex.quote(sys.executable)} -m {PURCHASE_JOB_MODULE}"


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``EVENTPULSE_*`` variables of ``environ`` (default: this process)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def _is_ours(submission_id: str | None, prefix: str) -> bool:
    if not submission_id:
        return False
    return submission_id == prefix or submission_id.startswith(prefix + "-")


def find_live_purchase_job(
    client: JobSubmissionClient, prefix: str = PURCHASE_JOB_PREFIX
) -> str | None:
    """Submission id of a PENDING or RUNNING purchase job, or ``None``."""
    from ray.job_submission import JobStatus

    live = {JobStatus.PENDING, JobStatus.RUNNING}
    for job in client.list_jobs():
        if _is_ours(job.submission_id, prefix) and JobStatus(job.status) in live:
            return job.submission_id
    return None


def new_submission_id(prefix: str = PURCHASE_JOB_PREFIX) -> str:
    """Fresh, sortable and unique: ``<prefix>-YYYYmmdd-HHMMSS-<8 hex>``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def ensure_purchase_job(
    client: JobSubmissionClient,
    entrypoint: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    prefix: str = PURCHASE_JOB_PREFIX,
    entrypoint_num_cpus: float | None = None,
) -> str:
    """Return the submission id of the live purchase job, submitting one if none is live.

    A job whose submission id is ``prefix`` or starts with ``prefix-`` and is PENDING or
    RUNNING is left alone; otherwise a new one is submitted under a fresh id (ids of
    finished jobs cannot be reused). ``env`` becomes the job's ``runtime_env.env_vars``
    (default: this process's ``EVENTPULSE_*`` variables; on a cluster the job also
    inherits the environment ``ray start`` was given). Two deployers racing can both
    submit; the purchase job's consumer groups make a second copy share the work, not
    repeat it.
    """
    live = find_live_purchase_job(client, prefix)
    if live is not None:
        return live
    env_vars = forwarded_env() if env is None else dict(env)
    runtime_env: dict[str, Any] | None = {"env_vars": env_vars} if env_vars else None
    return client.submit_job(
        entrypoint=entrypoint or default_entrypoint(),
        submission_id=new_submission_id(prefix),
        runtime_env=runtime_env,
        metadata={"app": "eventpulse", "role": "purchase-job"},
        entrypoint_num_cpus=entrypoint_num_cpus,
    )


# --- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cluster/deploy.py",
        description="Deploy configs/serve.yaml and make sure the purchase job runs.",
    )
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_DASHBOARD_ADDRESS", DEFAULT_DASHBOARD_ADDRESS),
        help="Ray dashboard address (default: $RAY_DASHBOARD_ADDRESS or %(default)s).",
    )
    p.add_argument("--config", type=Path, default=None, help="Serve config (configs/serve.yaml).")
    p.add_argument(
        "--http-host",
        default=os.environ.get("EVENTPULSE_SERVE_HTTP_HOST"),
        help="Override http_options.host of the Serve config (0.0.0.0 on a cluster; "
        "default: $EVENTPULSE_SERVE_HTTP_HOST, else as in the file).",
    )
    p.add_argument("--entrypoint", default=None, help="Purchase job command (default: "
                   "<this python> -m cluster.purchase_job).")
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                   help="Wait this long for the Serve apps to be RUNNING; 0 to not wait.")
    p.add_argument("--skip-serve", action="store_true", help="Only ensure the purchase job.")
    p.add_argument("--skip-job", action="store_true", help="Only deploy Serve.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: dict[str, Any] = {"address": args.address}
    if not args.skip_serve:
        config_path = args.config or default_serve_config()
        apps = deploy_serve(args.address, config_path, http_host=args.http_host)
        result["serve_config"] = str(config_path)
        result["applications"] = apps
        if args.wait > 0:
            result["serve_status"] = wait_serve_running(args.address, apps, args.wait)
    if not args.skip_job:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(args.address)
        result["purchase_job"] = ensure_purchase_job(client, args.entrypoint)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

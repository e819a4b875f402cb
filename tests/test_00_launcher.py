"""`eventpulse up | down | status | token` as a new user runs them.

Runs first (file name) so the full `up` starts its own Ray before the session's Ray.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent / "eventpulse"


def run(args, env_extra, timeout=400):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTPULSE_", "RAY_"))}
    env.update(env_extra)
    return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_token_prints_only_the_token(tmp_path):
    out = run(["token", "alice", "--role", "organizer"], {"EVENTPULSE_DATA_DIR": str(tmp_path)})
    assert out.returncode == 0
    token = out.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    from eventpulse.auth import token_secret, verify_token
    from eventpulse.settings import Settings

    # Explicit arguments win over any EVENTPULSE_* a test session put in this process.
    p = verify_token(token, secret=token_secret(Settings(_env_file=None, data_dir=tmp_path,
                                                           token_secret=None)))
    assert p.user_id == "alice" and p.is_organizer
    bad = run(["token", "alice", "--role", "king"], {"EVENTPULSE_DATA_DIR": str(tmp_path)})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_up_refuses_a_taken_port_clearly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run(["up"], {"EVENTPULSE_DATA_DIR": str(tmp_path), "EVENTPULSE_PORT": str(port)})
    assert out.returncode == 1
    assert f"port {port} is already in use" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_up_says_what_to_do_without_redis_server(tmp_path):
    env = {"EVENTPULSE_DATA_DIR": str(tmp_path), "EVENTPULSE_PORT": str(free_port()),
           "PATH": str(Path(sys.executable).parent)}  # no redis-server on this PATH
    out = run(["up"], env)
    assert out.returncode == 1
    assert "redis-server is not installed" in out.stderr and "apt-get install" in out.stderr
    assert "Traceback" not in out.stderr


def test_up_reports_ray_that_cannot_start_and_down_cleans_up(tmp_path):
    with socket.socket() as s:  # the Ray dashboard's port is taken
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 8265))
        except OSError:
            pytest.fail("port 8265 is in use before the test: another Ray is running")
        s.listen()
        env = {"EVENTPULSE_DATA_DIR": str(tmp_path), "EVENTPULSE_PORT": str(free_port())}
        out = run(["up"], env)
    assert out.returncode == 1
    assert "Ray dashboard" in out.stderr and "Traceback" not in out.stderr
    state = (tmp_path / "launcher.json").read_text()
    assert '"redis_pid"' in state
    assert run(["down"], env).returncode == 0
    assert run(["down"], env).returncode == 0  # safe twice
    assert not (tmp_path / "launcher.json").exists()


@pytest.mark.slow
def test_up_demo_serves_the_api_and_down_leaves_nothing_running(tmp_path):
    port = free_port()
    env = {"EVENTPULSE_DATA_DIR": str(tmp_path), "EVENTPULSE_PORT": str(port)}
    try:
        out = run(["up", "--demo"], env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "demo user token" in out.stderr and "Ray dashboard" in out.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        apps = httpx.get("http://127.0.0.1:8265/api/serve/applications/", timeout=10,
                         headers=_ray_auth()).json()
        assert apps["applications"]["eventpulse"]["status"] == "RUNNING"
        jobs = httpx.get("http://127.0.0.1:8265/api/jobs/", timeout=10, headers=_ray_auth()).json()
        assert any(j.get("submission_id", "").startswith("eventpulse-purchase-job") for j in jobs)
        status = run(["status"], env)
        assert status.returncode == 0 and "up" in status.stderr + status.stdout
        assert "HAProxy" in status.stderr
        state = json.loads((tmp_path / "launcher.json").read_text())
    finally:
        down = run(["down"], env, timeout=300)
    assert down.returncode == 0, down.stderr
    # Nothing of this instance is left: its Redis, every process of its Ray (named by
    # its GCS port, and their children) and its HAProxy. Other Rays on the machine are
    # not ours to judge.
    assert not psutil.pid_exists(state["redis_pid"])
    gcs = state["gcs_port"]
    leftovers = [p.info["cmdline"][:2] for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and any(
                     t == f"--gcs_server_port={gcs}" or (t.startswith("--gcs-address=")
                                                         and t.endswith(f":{gcs}"))
                     for t in p.info["cmdline"])]
    assert leftovers == []
    from cluster.launcher import _haproxy_base

    base = _haproxy_base(tmp_path).name
    assert not [p for p in psutil.process_iter(["cmdline"])
                if base in " ".join(p.info["cmdline"] or ())]


def test_up_with_serves_own_proxy_answers_through_it_and_starts_no_haproxy(tmp_path):
    """`up --ingress serve`: Serve's default Python proxy takes every request (no HAProxy,
    no edge, no lane); a join and its position read answer on Serve's path."""
    from cluster.launcher import _haproxy_base

    port = free_port()
    env = {"EVENTPULSE_DATA_DIR": str(tmp_path), "EVENTPULSE_PORT": str(port)}
    base = _haproxy_base(tmp_path).name
    try:
        out = run(["up", "--demo", "--ingress", "serve"], env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        state = json.loads((tmp_path / "launcher.json").read_text())
        assert state["ingress"] == "serve"
        assert "Serve's proxy" in run(["status"], env).stderr
        assert not [p for p in psutil.process_iter(["cmdline"])
                    if "haproxy" in " ".join(p.info["cmdline"] or ())
                    and base in " ".join(p.info["cmdline"] or ())]
        api = f"http://127.0.0.1:{port}"
        token = run(["token", "proxy-user"], env).stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        event_id = state["urls"]["demo event"].rsplit("/", 1)[1]
        joined = httpx.post(f"{api}/api/events/{event_id}/queue", json={"quantity": 1},
                            headers=auth, timeout=30)
        assert joined.status_code in (200, 201), joined.text
        pos = httpx.get(f"{api}/api/queue/position", params={"eventId": event_id,
                                                             "userId": "proxy-user"},
                        headers=auth, timeout=30)
        assert pos.status_code == 200 and pos.json()["user_id"] == "proxy-user", pos.text
        assert pos.json()["status"] in ("waiting", "offered"), pos.text
        assert httpx.get(f"{api}/api/queue/position", params={"eventId": event_id,
                                                               "userId": "proxy-user"},
                         timeout=30).status_code == 401
    finally:
        down = run(["down"], env, timeout=300)
    assert down.returncode == 0, down.stderr


def test_an_unknown_ingress_is_refused_before_anything_starts(tmp_path):
    out = run(["up", "--ingress", "nginx"], {"EVENTPULSE_DATA_DIR": str(tmp_path),
                                              "EVENTPULSE_PORT": str(free_port())})
    assert out.returncode == 2 and "haproxy" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "launcher.json").exists()


def test_serves_own_proxy_turns_haproxy_off():
    from cluster.launcher import LaunchError, ray_env

    default, serve = ray_env({}), ray_env({}, None, "serve")
    assert default["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert serve["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert serve["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    with pytest.raises(LaunchError):
        ray_env({}, None, "nginx")


def _ray_auth() -> dict:
    token_file = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}


def test_one_machine_runs_no_more_replicas_than_cores(tmp_path):
    import yaml

    from cluster.launcher import SERVE_CONFIG, serve_config_for

    def bounds(cpus):
        path = serve_config_for("127.0.0.1", 8123, tmp_path, cpus=cpus)
        config = yaml.safe_load(path.read_text())
        assert config["http_options"]["port"] == 8123
        auto = config["applications"][0]["deployments"][0]["autoscaling_config"]
        return auto["min_replicas"], auto["max_replicas"]

    shipped = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["deployments"][0]
    low, high = shipped["autoscaling_config"]["min_replicas"], shipped["autoscaling_config"]["max_replicas"]
    assert bounds(2) == (low, max(low, 2))
    assert bounds(1) == (low, low)  # never below the floor
    assert bounds(64) == (low, high)  # a big machine keeps the file's bounds


def test_streams_are_bounded_within_the_ingress_connections(monkeypatch):
    """`eventpulse up` bounds each replica's streams so that all of them together stay
    within 90 % of HAProxy's connections; a value the operator set is kept."""
    from cluster.launcher import RAY_ENV, most_replicas, ray_env

    monkeypatch.delenv("EVENTPULSE_MAX_STREAMS", raising=False)
    budget = int(RAY_ENV["RAY_SERVE_HAPROXY_MAXCONN"]) * 0.9
    per_replica = int(ray_env({})["EVENTPULSE_MAX_STREAMS"])
    assert 0 < per_replica * most_replicas() <= budget
    # One core still runs the deployment's minimum of two replicas: both share the budget.
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert most_replicas() == 2
    assert 0 < int(ray_env({})["EVENTPULSE_MAX_STREAMS"]) * 2 <= budget
    assert ray_env({"EVENTPULSE_MAX_STREAMS": "123"})["EVENTPULSE_MAX_STREAMS"] == "123"

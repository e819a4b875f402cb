"""`eventpulse up | down | status | token` as a new user runs them.

Every command runs with a `HOME` of its own (nothing in `~` from before, no `~/.ray`) and
from a directory of its own, so nothing the project silently takes from this machine or
from the checkout is hidden, and with a Ray temporary root of the test's own
(`RAY_TMPDIR`, the `ray_tmpdir` fixture): `ray start` writes the machine's current-cluster
file and Prometheus' discovery file there, so an instance started here never points the
test session's Ray, or anything that looks for it, at a cluster that is gone. So these
tests run in any order with the others.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent / "eventpulse"


@pytest.fixture
def home(tmp_path_factory) -> Path:
    """A fresh, empty HOME."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def elsewhere(tmp_path_factory) -> Path:
    """A working directory that is neither the checkout nor the data directory."""
    return tmp_path_factory.mktemp("cwd")


# The running test's Ray temporary root (`_own_ray_root`): every command of the test uses it.
_ray_root: Path | None = None


@pytest.fixture(autouse=True)
def _own_ray_root(ray_tmpdir: Path) -> Iterator[Path]:
    global _ray_root
    _ray_root = ray_tmpdir
    yield ray_tmpdir
    _ray_root = None


def run(args, env_extra, timeout=400, *, home=None, cwd=None):
    assert _ray_root is not None, "run() needs the _own_ray_root fixture"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTPULSE_", "RAY_"))}
    env["RAY_TMPDIR"] = str(_ray_root)
    env.update(env_extra)
    # never the real HOME; a fresh one under the test's root, removed with it
    env["HOME"] = str(home or tempfile.mkdtemp(prefix="home-", dir=_ray_root))
    return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _secret_of(data_dir: Path) -> str:
    from eventpulse.auth import token_secret
    from eventpulse.settings import Settings

    # Explicit arguments win over any EVENTPULSE_* a test session put in this process.
    return token_secret(Settings(_env_file=None, data_dir=data_dir, token_secret=None))


def test_token_prints_only_the_token_of_the_instance(tmp_path, home, elsewhere):
    from eventpulse.auth import token_secret, verify_token
    from eventpulse.settings import Settings

    token_secret(Settings(_env_file=None, data_dir=tmp_path, token_secret=None), create=True)
    out = run(["--data-dir", str(tmp_path), "token", "alice", "--role", "organizer"], {},
              home=home, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    p = verify_token(token, secret=_secret_of(tmp_path))
    assert p.user_id == "alice" and p.is_organizer
    bad = run(["token", "alice", "--role", "king"], {"EVENTPULSE_DATA_DIR": str(tmp_path)},
              home=home)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_without_an_instance_the_cli_says_so_and_creates_nothing(home, elsewhere):
    """Only `up` makes a token secret: `token`, `status` and `down` with no instance to
    talk to name where they looked and exit non-zero."""
    for args in (["token", "alice"], ["status"], ["down"]):
        out = run(args, {}, home=home, cwd=elsewhere)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stdout == "" and "Traceback" not in out.stderr
        said = " ".join(out.stderr.split())  # rich wraps long lines
        assert "no Event-Pulse instance" in said and "eventpulse up" in said
    assert list(home.rglob("*")) == [] and list(elsewhere.iterdir()) == []
    # a configured secret (one shared with an identity provider) needs no instance
    out = run(["token", "alice"], {"EVENTPULSE_TOKEN_SECRET": "-shared-with-the-idp-"},
              home=home, cwd=elsewhere)
    assert out.returncode == 0 and out.stdout.count(".") == 2


def test_the_data_directory_is_found_from_anywhere(tmp_path, monkeypatch):
    """No configured data directory: a `./.eventpulse` that holds an instance of an
    earlier release wins, else the user's state directory, the same from every working
    directory."""
    from eventpulse.settings import Settings, default_data_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("EVENTPULSE_DATA_DIR", raising=False)
    state_dir = tmp_path / "home" / ".local" / "state" / "eventpulse"
    (tmp_path / "a").mkdir()
    assert default_data_dir(tmp_path / "a") == state_dir
    (tmp_path / "b" / ".eventpulse").mkdir(parents=True)
    assert default_data_dir(tmp_path / "b") == state_dir  # an empty folder is no instance
    (tmp_path / "b" / ".eventpulse" / "token_secret").write_text("kept")
    assert default_data_dir(tmp_path / "b") == tmp_path / "b" / ".eventpulse"
    monkeypatch.chdir(tmp_path / "a")
    assert Settings(_env_file=None).data_dir == state_dir
    monkeypatch.setenv("EVENTPULSE_DATA_DIR", str(tmp_path / "c"))
    assert Settings(_env_file=None).data_dir == tmp_path / "c"


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


def _processes_of(data_dir: Path) -> list:
    """Processes whose command line names the instance's data directory or its HAProxy
    folder (its Redis runs with `--dir <data_dir>/redis`)."""
    from cluster.launcher import haproxy_base

    marks = (str(data_dir), haproxy_base(data_dir).name)
    return [p.info["cmdline"][:3] for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.pid != os.getpid()
            and any(m in " ".join(p.info["cmdline"]) for m in marks)]


def _ray_processes(gcs_port: int) -> list:
    return [p.info["cmdline"][:2] for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and any(
                t == f"--gcs_server_port={gcs_port}" or (t.startswith("--gcs-address=")
                                                         and t.endswith(f":{gcs_port}"))
                for t in p.info["cmdline"])]


def _take_dashboard_port() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", 8265))
    except OSError:
        s.close()
        pytest.fail("port 8265 is in use before the test: another Ray is running")
    s.listen()
    return s


def test_a_failed_up_stops_what_it_started(tmp_path, home, elsewhere):
    """Ray cannot start (its dashboard port is taken) after Redis has: `up` says why,
    stops its Redis again and leaves no state; `down` then has nothing to stop."""
    env = {"EVENTPULSE_DATA_DIR": str(tmp_path), "EVENTPULSE_PORT": str(free_port())}
    with _take_dashboard_port():
        out = run(["up"], env, home=home, cwd=elsewhere)
    assert out.returncode == 1
    assert "Ray dashboard" in out.stderr and "Traceback" not in out.stderr
    assert "Redis started" in out.stderr and "stopped what was started" in out.stderr
    assert not (tmp_path / "launcher.json").exists()
    assert _processes_of(tmp_path) == []
    assert run(["down"], env, home=home).returncode == 1


@pytest.mark.slow
def test_up_demo_on_a_fresh_home_from_anywhere(home, elsewhere, tmp_path_factory):
    """`eventpulse up --demo` as on a fresh machine: an empty HOME (no `~/.ray`), no data
    directory configured, started from one directory and used from another. A failed
    `up` just before leaves nothing in the way; a second `up --demo` reuses the demo
    event and the demo user's place; `down` leaves nothing of the instance running."""
    port = free_port()
    env = {"EVENTPULSE_PORT": str(port)}
    there = tmp_path_factory.mktemp("other-cwd")
    data_dir = home / ".local" / "state" / "eventpulse"
    with _take_dashboard_port():
        assert run(["up", "--demo"], env, home=home, cwd=elsewhere).returncode == 1
    try:
        out = run(["up", "--demo"], env, timeout=600, home=home, cwd=elsewhere)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "demo user token" in out.stderr and "Ray dashboard" in out.stderr
        assert str(data_dir) in out.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        assert not (home / ".ray").exists()  # Ray's token is the instance's own
        apps = httpx.get("http://127.0.0.1:8265/api/serve/applications/", timeout=10,
                         headers=_ray_auth(data_dir)).json()
        assert apps["applications"]["eventpulse"]["status"] == "RUNNING"
        jobs = httpx.get("http://127.0.0.1:8265/api/jobs/", timeout=10,
                         headers=_ray_auth(data_dir)).json()
        assert any(j.get("submission_id", "").startswith("eventpulse-purchase-job") for j in jobs)
        assert httpx.get("http://127.0.0.1:8265/api/jobs/", timeout=10).status_code == 401
        status = run(["status"], env, home=home, cwd=there)
        assert status.returncode == 0 and "up" in status.stderr + status.stdout
        assert "HAProxy" in status.stderr
        state = json.loads((data_dir / "launcher.json").read_text())
        event_id = state["urls"]["demo event"].rsplit("/", 1)[1]
        token = run(["token", "carol"], env, home=home, cwd=there).stdout.strip()
        mine = httpx.get(f"http://127.0.0.1:{port}/api/events/{event_id}",
                         headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert mine.status_code == 200, mine.text
        # a restart seeds nothing new: the demo event and the demo user's place are kept
        assert run(["down"], env, home=home, cwd=there).returncode == 0
        again = run(["up", "--demo"], env, timeout=600, home=home, cwd=there)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "keeps their place" in again.stderr and event_id in again.stderr
        state = json.loads((data_dir / "launcher.json").read_text())
    finally:
        down = run(["down"], env, timeout=300, home=home, cwd=there)
    assert down.returncode == 0, down.stderr
    # Nothing of this instance is left: its Redis, every process of its Ray (named by
    # its GCS port, and their children) and its HAProxy. Other Rays on the machine are
    # not ours to judge.
    assert not psutil.pid_exists(state["redis_pid"])
    assert _ray_processes(state["gcs_port"]) == []
    assert _processes_of(data_dir) == []


def test_up_with_serves_own_proxy_answers_through_it_and_starts_no_haproxy(tmp_path):
    """`up --ingress serve`: Serve's default Python proxy takes every request (no HAProxy,
    no edge, no lane); a join and its position read answer on Serve's path."""
    from cluster.launcher import haproxy_base

    port = free_port()
    env = {"EVENTPULSE_DATA_DIR": str(tmp_path), "EVENTPULSE_PORT": str(port)}
    base = haproxy_base(tmp_path).name
    try:
        out = run(["up", "--demo", "--ingress", "serve"], env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        state = json.loads((tmp_path / "launcher.json").read_text())
        assert state["ingress"] == "serve"
        # `ray start` took the Ray temporary root it was given, not the session's
        current = _ray_root / "ray" / "ray_current_cluster"
        assert current.read_text().endswith(f":{state['gcs_port']}")
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


def _ray_auth(data_dir: Path) -> dict:
    from cluster.launcher import RAY_TOKEN_FILE

    return {"Authorization": f"Bearer {(data_dir / RAY_TOKEN_FILE).read_text().strip()}"}


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


def test_prometheus_finds_ray_under_the_temp_directory_ray_uses(tmp_path, monkeypatch):
    """Ray keeps its sessions under RAY_TMPDIR or TMPDIR when set (not always /tmp/ray):
    `up --monitoring` points Prometheus at the discovery file where Ray writes it."""
    from cluster.monitoring import DISCOVERY_FILE_NAME, discovery_file

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert discovery_file() == tmp_path / "ray" / DISCOVERY_FILE_NAME
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "r"))
    assert discovery_file() == tmp_path / "r" / "ray" / DISCOVERY_FILE_NAME

"""The local launcher behind `eventpulse up | down | status`.

`up` starts a private Redis (AOF on) unless a Redis URL is configured, a local Ray head
(dashboard and metrics on; token authentication on, with a token of the instance's own),
deploys `configs/serve.yaml` with the HAProxy ingress (or Serve's own proxy, `--ingress
serve`), submits the purchase job, and returns once the API is ready. What it started is
written to `<data_dir>/launcher.json` before each step, so `down` — and `up` itself when
a step fails — stops exactly that (`teardown`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

from eventpulse.resources import config_path

SERVE_CONFIG = config_path("serve.yaml")
RAY_TOKEN_FILE = "ray_auth_token"
DASHBOARD_PORT = 8265
METRICS_PORT = 8080

# The Serve controller reads these from the environment of `ray start`.
RAY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Two file descriptors a connection (client and replica side) once splicing is off
    # (`haproxy_env`); a process may hold 20,000 here, so 9,900 streams plus headroom.
    "RAY_SERVE_HAPROXY_MAXCONN": "9900",
    # A request in flight on a replica that dies gets no answer: HAProxy sends it to
    # another replica instead of answering 500. Safe here because every write route
    # is idempotent (joins per user, purchases per Idempotency-Key, leave/release/admin
    # set states, events per Idempotency-Key when given).
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    # HAProxy's per-request log lines parsed into Serve's HTTP metrics cost ~9 % of the
    # machine at 2,000 req/s; the app's own eventpulse_http_* metrics count every request.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class LaunchError(Exception):
    """A clear, user-facing reason why `up` cannot go on."""


@dataclass
class State:
    data_dir: str
    ingress: str = "haproxy"
    redis_url: str = ""
    redis_pid: int | None = None
    ray_started: bool = False
    ray_address: str = ""
    gcs_port: int | None = None
    api_url: str = ""
    job_id: str | None = None
    prometheus_pid: int | None = None
    urls: dict[str, str] = field(default_factory=dict)

    @classmethod
    def path(cls, data_dir: Path) -> Path:
        return data_dir / "launcher.json"

    def save(self) -> None:
        self.path(Path(self.data_dir)).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, data_dir: Path) -> "State | None":
        p = cls.path(data_dir)
        return cls(**json.loads(p.read_text())) if p.exists() else None


def teardown(state: State, on_step: Callable[[str], Any] | None = None) -> None:
    """Stop everything `state` records, in the reverse order of `up`, and forget it.

    Safe on a half-started instance: each part is stopped only if it was recorded as
    started, and a part that is gone already is skipped. `on_step(name)` is told each
    part as it stops (the CLI shows progress with it).
    """
    data_dir = Path(state.data_dir)
    note = on_step or (lambda name: None)
    if state.prometheus_pid:
        note("Prometheus")
        stop_pid(state.prometheus_pid)
    if state.ray_started and state.gcs_port:
        note("Ray (the Serve app and the purchase job with it)")
        stop_ray(state.gcs_port)
    stop_haproxy(data_dir)
    if state.redis_pid:
        note("Redis")
        stop_pid(state.redis_pid)
    State.path(data_dir).unlink(missing_ok=True)


def ray_token(data_dir: Path) -> Path:
    """The instance's own Ray auth token file, made once (mode 0600).

    Ray 2.60 with `RAY_AUTH_MODE=token` refuses to start a head that finds no token, and
    its clients present the token only from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
    `~/.ray/auth_token`. The launcher hands this file to Ray and to every client it
    starts through `RAY_AUTH_TOKEN_PATH` (`ray_env`), so nothing depends on `~/.ray`.
    """
    path = data_dir.resolve() / RAY_TOKEN_FILE
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` makes
    return path


# Ports Ray takes by default on every node (dashboard agent's HTTP and gRPC, runtime-env
# agent, metrics, client server, dashboard, GCS): a free port handed to another component
# must not be one of them (a run once drew 52365 for the metrics export and Ray refused).
RAY_DEFAULT_PORTS = frozenset({52365, 52366, 52367, 44217, 10001, 8265, 6379})


def free_port() -> int:
    """A port free now on 127.0.0.1, and not one Ray takes by default."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _wait(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise LaunchError(f"{what} did not become ready within {timeout:.0f} s")


# Redis ------------------------------------------------------------------------------
def start_redis(data_dir: Path, port: int = 0) -> tuple[str, int]:
    """A private redis-server with AOF (fsync every second) under the data directory."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError("redis-server is not installed: run `apt-get install -y redis-server` "
                          "(Debian/Ubuntu) or set EVENTPULSE_REDIS_URL to an existing Redis")
    port = port or free_port()
    if port_in_use(port):
        raise LaunchError(f"port {port} for the embedded Redis is already in use")
    rdir = data_dir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    pidfile = rdir / "redis.pid"
    subprocess.run([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir),
                    "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "yes",
                    "--pidfile", str(pidfile), "--logfile", str(rdir / "redis.log"),
                    "--save", "", "--protected-mode", "yes"], check=True, capture_output=True)
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: _redis_ping(port), 15, "redis-server")
    return url, int(pidfile.read_text().strip())


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def stop_pid(pid: int | None, timeout: float = 15) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# Ray --------------------------------------------------------------------------------
# Serve's own settings for the other ingress, its Python proxy (`up --ingress serve`).
SERVE_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
INGRESSES = ("haproxy", "serve")


def ray_env(settings_env: dict[str, str], data_dir: Path | None = None,
            ingress: str = "haproxy") -> dict[str, str]:
    """The environment of `ray start`. `ingress="serve"` keeps Serve's default Python
    proxy: no HAProxy, so no edge cache and no side server; every request takes Serve's path."""
    if ingress not in INGRESSES:
        raise LaunchError(f"unknown ingress {ingress!r}: one of {', '.join(INGRESSES)}")
    env = {**os.environ, **RAY_ENV, **settings_env}
    if data_dir is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(ray_token(data_dir))
    if ingress == "serve":
        env.update(SERVE_PROXY_ENV)
        data_dir = None  # no HAProxy paths
    # Streams share the node's HAProxy connections: 90 % of them, split among the most
    # replicas one machine runs (serve_config_for), the rest left for other requests.
    env.setdefault("EVENTPULSE_MAX_STREAMS",
                   str(int(env["RAY_SERVE_HAPROXY_MAXCONN"]) * 9 // 10 // most_replicas()))
    # the replicas' side server for the hottest per-user routes (serve/side.py)
    env.setdefault("EVENTPULSE_SIDE_PORT", str(free_port()))
    if data_dir is not None:
        env.update(haproxy_env(data_dir))
    venv_bin = str(Path(sys.executable).parent)  # jobs run with the raylet's PATH
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    return env


def start_ray(env: dict[str, str], gcs_port: int) -> None:
    """`ray start --head` with its GCS on `gcs_port` (chosen by the caller and recorded
    first, so a head that half-started is still found and stopped by `teardown`)."""
    ray_bin = Path(sys.executable).parent / "ray"
    if port_in_use(DASHBOARD_PORT):
        raise LaunchError(f"port {DASHBOARD_PORT} (Ray dashboard) is already in use: is another "
                          "Ray running? Stop it with `ray stop` or `eventpulse down`")
    cmd = [str(ray_bin), "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={DASHBOARD_PORT}", f"--metrics-export-port={METRICS_PORT}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise LaunchError(f"Ray could not start:\n{tail}")


def stop_ray(gcs_port: int, timeout: float = 20) -> int:
    """Stop the processes of *our* Ray instance only (not `ray stop`, which stops every
    Ray on the machine): those naming our GCS address, and their children. Swept again
    until none is left: a raylet that is being stopped can still start a worker (to
    restart an actor), which the first sweep did not see."""
    import psutil

    def ours(cmdline: list[str]) -> bool:
        return any(t == f"--gcs_server_port={gcs_port}"
                   or (t.startswith(("--gcs-address=", "--gcs_address=", "--address="))
                       and t.endswith(f":{gcs_port}")) for t in cmdline)

    stopped = 0
    for _ in range(5):
        roots = [p for p in psutil.process_iter(["cmdline"])
                 if p.pid != os.getpid() and ours(p.info.get("cmdline") or [])]
        if not roots:
            break
        victims = {p.pid: p for p in roots}
        for p in roots:
            try:
                victims.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        procs = list(victims.values())
        stop_processes(procs, timeout)
        stopped += len(procs)
    return stopped


def stop_processes(procs: list, grace: float) -> None:
    """SIGTERM `procs` (psutil processes), then SIGKILL those still running after `grace` s."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def haproxy_base(data_dir: Path) -> Path:
    # HAProxy limits its admin socket path to 97 bytes and Serve adds a 56-character
    # directory, so the base must be short: /tmp/ep-<hash of the data directory>.
    import hashlib

    digest = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=4).hexdigest()
    return Path(tempfile.gettempdir()) / f"ep-{digest}"


def haproxy_env(data_dir: Path) -> dict[str, str]:
    """Per-instance HAProxy paths and metrics port, so two local instances never collide,
    and HAProxy started through our wrapper (`_haproxy_wrapper`)."""
    base = haproxy_base(data_dir)
    base.mkdir(parents=True, exist_ok=True)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": _haproxy_wrapper(base),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}


def _haproxy_wrapper(base: Path) -> str:
    from cluster.haproxy import write_wrapper

    return write_wrapper(base)


def stop_haproxy(data_dir: Path) -> int:
    """HAProxy outlives a Ray shutdown when the Serve controller can't stop it in time:
    stop the HAProxy processes that use this instance's config directory, and remove the
    directory (configs, sockets, the wrapper: `up` writes them again)."""
    import psutil

    base = haproxy_base(data_dir)
    marker = base.name
    procs = [p for p in psutil.process_iter(["cmdline"])
             if "haproxy" in " ".join(p.info.get("cmdline") or ())
             and marker in " ".join(p.info.get("cmdline") or ())]
    stop_processes(procs, 0)  # nothing of theirs to finish: the instance is going
    shutil.rmtree(base, ignore_errors=True)
    return len(procs)


def serve_config_for(host: str, port: int, data_dir: Path, cpus: int | None = None) -> Path:
    """`configs/serve.yaml` for this one machine: our host and port, and no more replicas
    than cores.

    A replica is one Python process, so on one node replicas past the cores add no CPU;
    they only split the coalesced actor calls into smaller ones. Measured on 2 cores with
    4 replicas against 2: queue position 826 against 1,174 req/s (`wrk`), and `ramp`
    held 200 users against 400 (`docs/benchmarks.md`). A cluster (`cluster/deploy.py`,
    KubeRay) keeps the file's own bounds.
    """
    config = _capped_to_cores(yaml.safe_load(SERVE_CONFIG.read_text()), cpus)
    config["http_options"]["host"] = host
    config["http_options"]["port"] = port
    path = data_dir / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _capped_to_cores(config: dict[str, Any], cpus: int | None = None) -> dict[str, Any]:
    """Serve's config with no deployment scaling past the cores (never below its minimum)."""
    cores = cpus or os.cpu_count() or 1
    for app in config["applications"]:
        for deployment in app["deployments"]:
            auto = deployment.get("autoscaling_config")
            if auto:
                auto["max_replicas"] = max(auto["min_replicas"], min(auto["max_replicas"], cores))
    return config


def most_replicas(cpus: int | None = None) -> int:
    """The most replicas a deployment of `serve_config_for` runs on this machine."""
    config = _capped_to_cores(yaml.safe_load(SERVE_CONFIG.read_text()), cpus)
    return max((d.get("autoscaling_config") or {}).get("max_replicas", d.get("num_replicas", 1))
               for app in config["applications"] for d in app["deployments"])


def wait_http(url: str, timeout: float) -> None:
    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(ok, timeout, url, interval=0.5)

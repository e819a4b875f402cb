"""Session-wide real services: one redis-server, one local Ray, one deployed Serve app.

Started once per test session (not per test) and stopped at the end. Nothing is faked:
tests talk to the real Redis over TCP and to the app over real HTTP.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    from cluster.launcher import free_port as free

    return free()


class RedisServer:
    """A real redis-server on a free port with AOF on; can be stopped and restarted."""

    def __init__(self, data_dir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is missing: apt-get install -y redis-server")
        self.port = free_port()
        self.dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--maxclients", "20000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(7).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, hard: bool = False) -> None:
        if self.proc is not None:
            (self.proc.kill if hard else self.proc.terminate)()
            self.proc.wait(timeout=20)
            self.proc = None


def cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free and below 65536 too."""
    while True:
        port = random.randint(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


class RedisClusterServers:
    def __init__(self, root: Path, masters: int = 3) -> None:
        self.root = root
        self.ports = [cluster_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for port in self.ports:
            d = self.root / str(port)
            d.mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--appendonly", "no", "--save", ""],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            self._cli(port, "PING", retries=100)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in self._cli(p, "CLUSTER", "INFO") for p in self.ports):
                return
            time.sleep(0.2)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def _cli(self, port: int, *args: str, retries: int = 1) -> str:
        for _ in range(retries):
            out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                                 text=True, timeout=10)
            if out.returncode == 0 and "Could not connect" not in out.stdout + out.stderr:
                return out.stdout
            time.sleep(0.05)
        raise RuntimeError(f"redis-cli {' '.join(args)} on {port}: {out.stdout}{out.stderr}")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="eventpulse-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A Ray temporary root (`RAY_TMPDIR`) of the test's own, for a Ray it starts in a
    subprocess (`eventpulse up`, `ray.cluster_utils.Cluster`).

    `ray start` and `Cluster` write the machine's current-cluster file (what `ray.init()`
    and `ray.init(address="auto")` connect to) and Prometheus' discovery file into Ray's
    temporary root: under one of its own, such a Ray never points the session's Ray, or
    anything that looks for it, at a cluster that is gone, so the test runs in any order.
    Short, because Ray's unix socket paths under it must stay within 107 characters.
    Removed after the test, with any process still running under it (a test that
    failed or timed out before its Ray was stopped).
    """
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    try:
        yield root
    finally:
        import psutil

        from cluster.launcher import stop_processes

        stop_processes([p for p in psutil.process_iter(["cmdline"])
                        if p.pid != os.getpid() and str(root) in " ".join(p.info["cmdline"] or ())],
                       15)
        shutil.rmtree(root, ignore_errors=True)


CLUSTER = os.environ.get("EVENTPULSE_TEST_REDIS", "single") == "cluster"


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer | RedisClusterServers]:
    """The session's Redis: one server, or with EVENTPULSE_TEST_REDIS=cluster a real
    3-master Redis Cluster that the whole app (Serve, actors, purchase job) then uses."""
    server: RedisServer | RedisClusterServers
    server = RedisClusterServers(workdir / "cluster") if CLUSTER else RedisServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def test_secret() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="session")
def app_env(redis_server: RedisServer | RedisClusterServers, workdir: Path, test_secret: str) -> dict[str, str]:
    """The environment every Ray process of the session inherits."""
    env = {
        "EVENTPULSE_REDIS_URL": redis_server.url,
        "EVENTPULSE_DATA_DIR": str(workdir / "data"),
        "EVENTPULSE_TOKEN_SECRET": test_secret,
        "EVENTPULSE_JOIN_RATE_LIMIT": "1000",  # the rate-limit test sets its own user up
        "EVENTPULSE_PURCHASE_RECLAIM_IDLE_MS": "3000",
        "EVENTPULSE_REDIS_CLUSTER": "1" if CLUSTER else "0",
        "EVENTPULSE_SIDE_PORT": str(free_port()),  # the side server's routes take it (serve/side.py)
    }
    from cluster.launcher import RAY_ENV, haproxy_env, ray_token

    env.update({k: v for k, v in RAY_ENV.items() if k.startswith("RAY_SERVE_")})
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's token authentication on, as `eventpulse up` runs it, with a token of the
    # session's own: `ray.init` would otherwise make one in ~/.ray and leave it there.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(ray_token(workdir))
    env.update(haproxy_env(workdir))
    os.environ.update(env)
    if "ray._raylet" in sys.modules:  # Ray read its config (auth mode, token) already
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    from eventpulse.settings import get_settings

    get_settings.cache_clear()
    return env


@pytest.fixture(scope="session")
def ray_session(app_env: dict[str, str], workdir: Path) -> Iterator[dict]:
    """One local Ray for the whole run (dashboard and metrics export on)."""
    import ray

    metrics_port = free_port()
    info = ray.init(address="local", namespace="eventpulse", num_cpus=4, include_dashboard=True,
                    dashboard_port=free_port(), _metrics_export_port=metrics_port,
                    log_to_driver=False, logging_level="ERROR")
    yield {"info": info, "metrics_port": metrics_port,
           "session_dir": Path(info.address_info["session_dir"])}
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001
        pass
    ray.shutdown()
    from cluster.launcher import stop_haproxy

    stop_haproxy(Path(app_env["EVENTPULSE_DATA_DIR"]).parent)


@pytest.fixture(scope="session")
def ray_session_dir(ray_session: dict) -> Path:
    return ray_session["session_dir"]


@pytest.fixture(scope="session")
def serve_url(ray_session: dict) -> Iterator[str]:
    """The Serve app deployed with the HAProxy ingress on a free port."""
    from ray import serve

    from serve.app import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="eventpulse", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError("the Serve app did not become ready")
    yield url


@pytest.fixture(scope="session")
def purchase_job(serve_url: str) -> Iterator[list]:
    """The purchase job's partition consumers, running as Ray actors for the session."""
    import ray

    from cluster.purchase_job import ConsumerActor
    from eventpulse.settings import get_settings

    import threading

    from cluster.purchase_job import keep_running

    actors = [ConsumerActor.remote(p) for p in range(get_settings().purchase_partitions)]
    ray.get([a.ensure_running.remote() for a in actors])
    # As the job's driver does: a consumer killed by a test is restarted by Ray, and this
    # restarts its loop, so later tests still have their purchases committed.
    stop = threading.Event()
    keeper = threading.Thread(target=keep_running, args=(actors, 0.5, stop), daemon=True)
    keeper.start()
    yield actors
    stop.set()
    keeper.join(timeout=40)
    for a in actors:
        ray.kill(a, no_restart=True)


@pytest.fixture(scope="session")
def token_for(test_secret: str) -> Callable[..., str]:
    from eventpulse.auth import mint_token

    def make(user: str, role: str | None = None) -> str:
        return mint_token(user, [role] if role else [], secret=test_secret)

    return make


@pytest.fixture(scope="session")
def auth_headers(token_for) -> Callable[..., dict[str, str]]:
    def make(user: str, role: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(user, role)}"}

    return make


@pytest.fixture
async def http(serve_url: str) -> aiohttp.ClientSession:
    async with aiohttp.ClientSession(base_url=serve_url,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def replica_stats(http, auth_headers) -> list[dict]:
    """`/api/admin/stats` of every running Ingress replica. Each replica answers for itself
    and Serve picks which one answers: asked until every running replica has."""
    from ray import serve

    status = serve.status().applications["eventpulse"].deployments["Ingress"]
    running = status.replica_states.get("RUNNING", 0)
    seen: dict[str, dict] = {}
    for _ in range(100):
        async with http.get("/api/admin/stats", headers=auth_headers(unique(), "organizer")) as r:
            stats = await r.json()
        seen[stats["replica"]] = stats
        if len(seen) >= running:
            return list(seen.values())
    raise AssertionError(f"{len(seen)} of {running} replicas answered: {sorted(seen)}")


EVENT_BODY = {"name": "Test Night", "description": "d", "location": "Hall",
              "event_date": "2027-01-01T20:00:00Z", "price": 10.0, "total_tickets": 10,
              "max_per_user": 4}


@pytest.fixture
def make_event(http, auth_headers):
    async def create(**overrides) -> dict:
        body = {**EVENT_BODY, **overrides}
        async with http.post("/api/events", json=body,
                             headers=auth_headers("organizer-1", "organizer")) as r:
            assert r.status == 201, await r.text()
            return await r.json()

    return create


@pytest.fixture
async def demo_event(make_event) -> str:
    return (await make_event(total_tickets=100))["id"]


@pytest.fixture
async def redis(redis_server: RedisServer | RedisClusterServers, app_env):
    """A client of the session's Redis through the project's own pool."""
    from eventpulse.redis import create_client
    from eventpulse.settings import Settings

    client = create_client(Settings(redis_url=redis_server.url, redis_cluster=CLUSTER))
    yield client
    await client.aclose()

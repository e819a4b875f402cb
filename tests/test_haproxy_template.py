"""`cluster/haproxy.py`'s edits on the HAProxy config the installed Ray Serve really writes.

The config is rendered by Serve's own code (`HAProxyApi._generate_config_file_internal`,
the template in `ray/serve/_private/haproxy_templates.py`) without starting Ray, for one
app `eventpulse` as Serve's HAProxy manager describes it. If a Ray upgrade moves those
internals, these tests fail on the import or the call: that is the warning they exist for.
A config without what the edits anchor on must stop the wrapper, not start HAProxy on a
config with only some of the edits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

APP = "eventpulse"


def _render(tmp_path: Path, apps: dict[str, int] | None, *, fallback: bool = True) -> str:
    """Serve's config for `apps` (name: running ingress replicas; None: nothing deployed
    yet, as when Serve starts HAProxy), rendered and written by Serve's own code."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import RAY_SERVE_FALLBACK_PROXY_HTTP_PORT
    from ray.serve._private.haproxy import (BackendConfig, HAProxyApi, HAProxyConfig,
                                            HAProxyManager, ServerConfig)
    from ray.serve.config import HTTPOptions

    base = tmp_path / "serve-haproxy"
    cfg = HAProxyConfig(  # as `eventpulse up` runs it (`cluster.launcher.RAY_ENV`)
        socket_path=str(base / "admin.sock"), server_state_base=str(base),
        server_state_file=str(base / "server-state"), maxconn=9900,
        retry_on="conn-failure empty-response", metrics_enabled=False,
        metrics_port=free_port(), stats_port=free_port(), is_head=True,
        http_options=HTTPOptions(host="0.0.0.0", port=free_port()))
    name = HAProxyManager.get_safe_name  # how the manager names backends and servers
    backends = {}
    for i, (app, replicas) in enumerate((apps or {}).items()):
        backend = BackendConfig(
            name=name(f"{RequestProtocol.HTTP.value.lower()}-{app}"),
            path_prefix="/" if i == 0 else f"/{app}", app_name=app,
            ingress_deployment_name="Ingress", protocol=RequestProtocol.HTTP,
            servers=[ServerConfig(name=name(f"SERVE_REPLICA::{app}#Ingress#r{n}"),
                                  host="127.0.0.1", port=30000 + n,
                                  replica_id=f"SERVE_REPLICA::{app}#Ingress#r{n}")
                     for n in range(replicas)],
            fallback_server=ServerConfig(name=name("SERVE_PROXY_ACTOR-node1"), host="127.0.0.1",
                                         port=RAY_SERVE_FALLBACK_PROXY_HTTP_PORT)
            if fallback else None)
        backends[backend.name] = backend
    api = HAProxyApi(cfg, config_file_path=str(base / "haproxy.cfg"))  # writes Serve's 500 page
    if apps is not None:
        api.set_backend_configs(backends)
    api._generate_config_file_internal()
    return (base / "haproxy.cfg").read_text()


@pytest.fixture
def unavailable(tmp_path: Path) -> Path:
    from cluster.haproxy import write_wrapper

    write_wrapper(tmp_path / "ep")  # our 503 answer, as `eventpulse up` writes it
    return tmp_path / "ep" / "unavailable.http"


@pytest.fixture
def deployed(tmp_path: Path) -> str:
    return _render(tmp_path, {APP: 2})


def test_the_edits_land_on_the_installed_serves_own_config(tmp_path, unavailable, deployed):
    from cluster.haproxy import EDGE_CACHE, PROOF_ENV, SECRET_ENV, edit, haproxy_binary

    side = free_port()
    assert f"backend http-{APP}\n" in deployed and "option splice-request" in deployed
    edited = edit(deployed, unavailable=unavailable, edge=True, side_port=side)
    assert "# Event-Pulse edge" in edited and f"cache {EDGE_CACHE}" in edited
    assert "backend ep_side" in edited and f"server side 127.0.0.1:{side} check" in edited
    assert "option splice-" not in edited and "option httplog" not in edited
    errorfiles = re.findall(r"^\s*errorfile (50[234]) (\S+)$", edited, re.M)
    assert [code for code, _ in errorfiles] == ["502", "503", "504"]
    assert {path for _, path in errorfiles} == {str(unavailable)}
    lines = edited.splitlines()
    at = lines.index(f"backend http-{APP}")
    restore = next(i for i, x in enumerate(lines) if i > at and "set-header authorization" in x)
    assert lines[restore + 1].strip().startswith("server ")
    assert f"nbsrv(http-{APP}) ge 1" in edited
    # and the real HAProxy takes it
    path = tmp_path / "edited.cfg"
    path.write_text(edited)
    out = subprocess.run([haproxy_binary(), "-c", "-f", str(path)], capture_output=True,
                         text=True, timeout=30, check=False,
                         env={"PATH": "/usr/bin:/bin", SECRET_ENV: "s" * 40, PROOF_ENV: "p" * 64})
    assert out.returncode == 0, out.stdout + out.stderr


def test_serves_config_before_the_app_exists_is_accepted(tmp_path, unavailable):
    """Serve starts HAProxy before any app is deployed: no app backend, no edge yet."""
    from cluster.haproxy import edit

    config = _render(tmp_path, None)
    assert "backend http-" not in config
    edited = edit(config, unavailable=unavailable, edge=True, side_port=free_port())
    assert "# Event-Pulse edge" not in edited and "option splice-" not in edited
    assert f"errorfile 503 {unavailable}" in edited


def test_an_app_without_running_replicas_is_accepted(tmp_path, unavailable):
    """Serve writes the app's backend with no `server` line while no ingress replica runs
    and no fallback proxy is healthy; nothing is sent there, so no token is put back."""
    from cluster.haproxy import edit

    config = _render(tmp_path, {APP: 0}, fallback=False)
    assert f"backend http-{APP}\n" in config
    assert not re.search(r"^\s*server ", config.split(f"backend http-{APP}\n")[1], re.M)
    edited = edit(config, unavailable=unavailable, edge=True, side_port=free_port())
    assert "# Event-Pulse edge" in edited and "backend ep_side" in edited


def _without(pattern: str):
    return lambda config: re.sub(pattern, "", config, flags=re.M)


ANCHORS = {
    "frontend": (lambda config: config.replace("frontend http_frontend\n", "frontend web\n"),
                 "no `frontend http_frontend` section"),
    "routing": (_without(r"^\s*(use_backend|default_backend)\b.*\n"),
                "no `use_backend`/`default_backend` line"),
    "errorfile 503": (_without(r"^\s*errorfile 503 .*\n"), "no `errorfile 503` line"),
}


@pytest.mark.parametrize("anchor", list(ANCHORS))
def test_a_config_without_an_anchor_is_refused(unavailable, deployed, anchor):
    from cluster.haproxy import SERVE_PIN, TemplateChanged, edit

    mutate, missing = ANCHORS[anchor]
    broken = mutate(deployed)
    assert broken != deployed
    with pytest.raises(TemplateChanged) as raised:
        edit(broken, unavailable=unavailable, edge=True, side_port=free_port())
    _assert_explains(str(raised.value), missing)
    assert SERVE_PIN in str(raised.value)


def test_two_app_backends_are_refused(tmp_path, unavailable):
    from cluster.haproxy import TemplateChanged, edit

    config = _render(tmp_path, {APP: 1, "other": 1})
    with pytest.raises(TemplateChanged) as raised:
        edit(config, unavailable=unavailable, edge=False)
    _assert_explains(str(raised.value), f"2 `http-` app backends (http-other, http-{APP})")


def _assert_explains(message: str, missing: str) -> None:
    import ray

    from cluster.haproxy import SERVE_PIN, SERVE_SERIES

    assert missing in message, message
    assert f"Ray Serve {SERVE_SERIES}" in message and ray.__version__ in message, message
    assert SERVE_PIN in message, message


def _wrapper(tmp_path: Path, unavailable: Path, config: str) -> subprocess.CompletedProcess:
    """The wrapper Serve starts as its HAProxy, with `/bin/true` as the binary it execs."""
    source = tmp_path / "haproxy.cfg"
    source.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTPULSE_")} | {
        "EVENTPULSE_TOKEN_SECRET": "t" * 40, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cluster.haproxy", "/bin/true",
                           str(unavailable), "-db", "-f", str(source)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_wrapper_fails_loudly_instead_of_starting_haproxy(tmp_path, unavailable, deployed):
    ok = _wrapper(tmp_path, unavailable, deployed)
    assert ok.returncode == 0, ok.stderr
    assert "# Event-Pulse edge" in (tmp_path / "haproxy.cfg.ep").read_text()
    (tmp_path / "haproxy.cfg.ep").unlink()

    mutate, missing = ANCHORS["frontend"]
    out = _wrapper(tmp_path, unavailable, mutate(deployed))
    assert out.returncode != 0
    _assert_explains(out.stderr, missing)
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "haproxy.cfg.ep").exists()

"""The project as users install it: a wheel, not the checkout.

The wheel is built from the checkout, installed with the lock (`constraints.txt`) into a
fresh virtual environment outside it, and run from another directory under a fresh HOME:
`up --demo --monitoring`, `dashboards push` and `bench.joins` must find every file they
need in the installed package, nothing relative to the source tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.test_dashboards_push import GOOD, grafana  # noqa: F401 — the stand-in Grafana

SHIPPED = ("configs/serve.yaml", "configs/prometheus/prometheus.yml",
           "configs/prometheus/alerts.yml", "configs/grafana/overview.json",
           "configs/kuberay/rayservice.yaml", "bench/wrk/join.lua",
           "serve/static/waiting_room.html")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("eventpulse-*.whl")
    return built


def test_the_wheel_carries_the_files_the_code_opens(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(SHIPPED) <= names, sorted(set(SHIPPED) - names)
    assert not [n for n in names if n.startswith("tests/")]


@pytest.mark.slow
def test_the_installed_wheel_runs_the_system_outside_the_checkout(wheel, grafana,  # noqa: F811
                                                                  tmp_path_factory, ray_tmpdir):
    venv = tmp_path_factory.mktemp("venv")
    home, cwd = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("cwd")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "eventpulse"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c",
                              str(ROOT / "constraints.txt"), f"{wheel}[bench]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EVENTPULSE_", "RAY_", "PYTHON"))}
    # a Ray temporary root of its own, apart from the test session's (conftest.ray_tmpdir)
    env.update(HOME=str(home), EVENTPULSE_PORT=str(port), RAY_TMPDIR=str(ray_tmpdir))

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*args], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    where = run(str(py), "-c", "import cluster, configs; print(cluster.__file__, configs.__file__)")
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout, where
    api = f"http://127.0.0.1:{port}"
    try:
        up = run(str(cli), "up", "--demo", "--monitoring")
        assert up.returncode == 0, up.stderr[-3000:]
        assert httpx.get(f"{api}/readyz", timeout=10).status_code == 200
        assert httpx.get("http://127.0.0.1:9090/-/ready", timeout=10).status_code == 200
        pushed = run(str(cli), "dashboards", "push", "--url", grafana.url, "--token", GOOD,
                     timeout=60)
        assert pushed.returncode == 0, pushed.stderr
        assert len(grafana.dashboards) == len(list((ROOT / "configs" / "grafana").glob("*.json")))
        joins = run(str(py), "-m", "bench.joins", "--url", api, "--users", "3000",
                    "--connections", "8", "--seconds", "2", timeout=300)
        assert joins.returncode == 0, joins.stderr[-3000:]
        report = json.loads(joins.stdout.strip().splitlines()[-1])
        assert report["joins_per_s"] > 0 and set(report["statuses"]) <= {"200", "201"}
    finally:
        down = run(str(cli), "down", timeout=300)
    assert down.returncode == 0, down.stderr


def test_the_image_the_manifests_name_is_the_one_the_dockerfile_builds():
    """The Dockerfile builds on the Ray image of the pinned Ray, installs the wheel from
    the lock, and every KubeRay manifest names its tag: the project's version."""
    import tomllib

    import ray
    import yaml

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    docker = (ROOT / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-cpu" in docker
    assert "constraints.txt" in docker and "eventpulse-*.whl" in docker
    images = set()
    for path in (ROOT / "configs" / "kuberay").glob("*.yaml"):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            images.update(_images(doc))
    assert images == {f"ghcr.io/eventpulse/eventpulse:{version}"}, images


def _images(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from _images(v)
    elif isinstance(node, list):
        for v in node:
            yield from _images(v)

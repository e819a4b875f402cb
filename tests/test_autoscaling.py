"""Serve replicas scale out under load and back in when it stops, on a 2-node cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def probe(ray_tmpdir: Path, *args: str) -> dict:
    """The probe's 2-node cluster, under a Ray temporary root of its own (conftest.ray_tmpdir)."""
    out = subprocess.run([sys.executable, "-m", "bench.autoscale_probe", *args], cwd=ROOT,
                         env={**os.environ, "RAY_TMPDIR": str(ray_tmpdir)},
                         capture_output=True, text=True, timeout=420)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.cluster
@pytest.mark.slow
def test_replicas_rise_under_side_server_load_and_fall_after_it(ray_tmpdir):
    seen = probe(ray_tmpdir)  # the policy configs/serve.yaml ships (serve/autoscaling.py)
    # the load is the user's tickets, which HAProxy sends to the replicas' side server; while the
    # replicas come up HAProxy reloads, and a few requests go through Serve meanwhile
    assert seen["requests"] > 0 and seen["side_requests"] >= 0.75 * seen["requests"], seen
    assert seen["max_running"] >= 2, seen
    assert seen["seconds_to_scale_up"] is not None and seen["seconds_to_scale_up"] < 30, seen
    assert seen["seconds_to_scale_down"] is not None, seen


@pytest.mark.cluster
@pytest.mark.slow
def test_serves_own_policy_does_not_see_the_side_server(ray_tmpdir):
    """The control for the test above: the same load under Serve's default policy, which
    counts only the requests on Serve's own path, leaves one replica to carry it."""
    seen = probe(ray_tmpdir, "--default-policy")
    # on failure, what HAProxy said each second: its process (a reload starts a new one) and
    # the requests it sent to the side server and to Serve's path
    haproxy = [(s["t"], s["haproxy"]) for s in seen["timeline"] if "haproxy" in s]
    assert seen["requests"] > 0 and seen["side_requests"] >= 0.99 * seen["requests"], haproxy
    assert seen["max_running"] == 1, (seen["timeline"], haproxy)

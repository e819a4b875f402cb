"""Serve replicas scale out under load and back in when it stops, on a 2-node cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.cluster
@pytest.mark.slow
def test_replicas_rise_under_load_and_fall_after_it():
    out = subprocess.run([sys.executable, "-m", "tests.autoscale_probe"], cwd=ROOT,
                         capture_output=True, text=True, timeout=420)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    seen = json.loads(lines[-1])
    assert seen["max_running"] >= 2, seen
    assert seen["seconds_to_scale_up"] is not None and seen["seconds_to_scale_up"] < 30, seen
    assert seen["seconds_to_scale_down"] is not None, seen

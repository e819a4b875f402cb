"""A Ray worker node lost in a 2-node cluster: its event actor is recreated on the
surviving node and rebuilds its line from Redis (run in a subprocess: the session
already has its own ray.init())."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port
from bench.reliability import record

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.cluster]


def test_lost_worker_node_moves_its_event_actor_with_the_line_intact(redis_server, tmp_path,
                                                                     ray_tmpdir):
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTPULSE_", "RAY_"))}
    env.update({"EVENTPULSE_REDIS_URL": redis_server.url, "EVENTPULSE_TOKEN_SECRET": "x" * 32,
                "EVENTPULSE_DATA_DIR": str(tmp_path), "RAY_TMPDIR": str(ray_tmpdir),
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    run = subprocess.run([sys.executable, "-m", "bench.node_loss", str(free_port())], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=400)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["on_worker"] >= 1, result  # SPREAD put some event actors on the worker
    assert result["all_same_line"], result  # answered, so recreated on the head: only node left
    record("node-loss", order=50, fault="Ray worker node removed (2-node cluster on one machine)",
           load=f"{result['on_worker']} of {result['events']} event actors on the lost node, "
                f"{result['users']} users in each line",
           saw=f"actors recreated on the head node; lines answered again after "
               f"{result['recovered_s']} s (calls meanwhile retried or failed over)",
           lost="nothing: every entry, status and position identical after the move",
           seconds=time.monotonic() - started)

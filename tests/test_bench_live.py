"""A short run of each load scenario against the deployed app (the session's Serve app,
Redis and purchase job over real HTTP): zero errors and a well-formed report. Speed is
not asserted here: that is what `docs/benchmarks.md` is for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.smoke import run_smoke

pytestmark = pytest.mark.usefixtures("purchase_job")


def well_formed(rep: dict, out: Path) -> None:
    assert rep["totals"]["requests"] > 0 and rep["totals"]["errors"] == 0, rep["totals"]
    for route, r in rep["routes"].items():
        assert r["errors"] == 0, (route, r)
        assert 0 <= r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["max"]
    assert json.loads((out / "report.json").read_text())["scenario"] == rep["scenario"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert rep["server"]["available"] is True  # /api/admin/stats was read


def test_seed_mix_against_the_app(serve_url, test_secret, tmp_path):
    rep = run_smoke(serve_url, test_secret, "seed-mix", out=tmp_path)
    well_formed(rep, tmp_path)
    for r in ("healthz", "availability", "queue_position", "event", "user_tickets"):
        assert rep["routes"][r]["count"] >= 1, r


def test_flash_sale_against_the_app_sells_exactly_capacity(serve_url, test_secret, tmp_path):
    rep = run_smoke(serve_url, test_secret, "flash-sale", out=tmp_path)
    well_formed(rep, tmp_path)
    res = rep["result"]
    assert res["oversell"]["ok"] is True
    assert res["purchased"] == res["oversell"]["sold"] == res["oversell"]["tickets_held_by_users"] == 3


def test_waiting_crowd_against_the_app_hears_every_change(serve_url, test_secret, tmp_path):
    rep = run_smoke(serve_url, test_secret, "waiting-crowd", out=tmp_path)
    well_formed(rep, tmp_path)
    res = rep["result"]
    assert res["open_streams_max"] == 5
    assert res["missed_pushes"] == 0 and res["push_delay_ms"]["count"] == res["expected_pushes"] > 0


def test_ramp_against_the_app_reports_its_steps(serve_url, test_secret, tmp_path):
    rep = run_smoke(serve_url, test_secret, "ramp", out=tmp_path)
    well_formed(rep, tmp_path)
    steps = rep["result"]["steps"]
    assert steps and steps[0]["users"] == 2 and all(s["errors"] == 0 for s in steps)
    assert rep["result"]["stop_reason"]


def test_joins_with_wrk_each_answer_a_new_users_join(serve_url, test_secret, capsys):
    from bench.joins import main

    assert main(["--url", serve_url, f"--secret={test_secret}", "--users", "20000",
                 "--connections", "8", "--seconds", "1"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run["requests"] > 0 and run["not_2xx"] == 0 and run["joins_per_s"] > 0, run
    assert set(run["statuses"]) == {"200"} and run["statuses"]["200"] == run["requests"], run
    import httpx

    from eventpulse.auth import mint_token

    admin = mint_token("bench-check", ["admin"], secret=test_secret)
    line = httpx.get(f"{serve_url}/api/admin/events/{run['event_id']}/queue", timeout=10,
                     headers={"Authorization": f"Bearer {admin}"}).json()
    # the warm-up join, then one join by a user never seen before per answer (wrk may
    # have sent a few more that it did not wait for)
    assert line["joins_total"] >= run["requests"] + 1, (line, run)

"""bench.report and bench.serverstats: report.json schema, report.png, stats scraping."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench.report import SCHEMA, build_report, write_report
from bench.serverstats import ServerStats, extract, hit_rate_series, overall_hit_rate
from bench.stats import Stats


def sample_stats(t0: float) -> Stats:
    s = Stats()
    for i in range(300):
        s.record("availability", 0.005 + (i % 10) / 1000, 200, t0 + i / 100)
        s.record("queue_position", 0.004, 200 if i % 50 else 503, t0 + i / 100)
    s.observe("offer_to_ticket", 0.2)
    s.count("purchased", 3)
    return s


def check_schema(rep: dict) -> None:
    assert rep["schema"] == SCHEMA
    for key in ("scenario", "base_url", "started_at", "elapsed_s", "config", "totals",
                "routes", "metrics", "counters", "timeline", "server", "result"):
        assert key in rep, key
    for route in rep["routes"].values():
        assert set(route) >= {"count", "ok", "errors", "error_rate", "errors_by_status", "rps",
                              "latency_ms"}
        assert set(route["latency_ms"]) >= {"count", "mean", "p50", "p95", "p99", "max"}
    for row in rep["timeline"]:
        assert set(row) >= {"t", "requests", "errors", "p95_ms"}
    assert set(rep["server"]) >= {"available", "samples"}


def test_report_json_and_png(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0
    server = ServerStats()
    server.add(1.0, {"cache": {"events": {"hits": 10, "misses": 10}}, "replicas": 1})
    server.add(3.0, {"cache": {"events": {"hits": 100, "misses": 10}}, "replicas": 2})
    rep = build_report(scenario="seed-mix", base_url="http://127.0.0.1:8000",
                       config={"users": 3}, stats=sample_stats(t0), started_at=t0,
                       elapsed_s=3.0, server=server.to_report(), result={"held_users": 3})
    json_path, png_path = write_report(rep, tmp_path / "out")
    loaded = orjson.loads(json_path.read_bytes())
    check_schema(loaded)
    assert loaded["totals"]["requests"] == 600
    assert loaded["routes"]["queue_position"]["errors_by_status"] == {"503": 6}
    assert loaded["metrics"]["offer_to_ticket"]["count"] == 1
    assert loaded["counters"] == {"purchased": 3}
    assert [r["t"] for r in loaded["timeline"]] == [0, 1, 2]
    assert loaded["server"]["available"] is True
    assert loaded["server"]["cache_hit_rate"] == round(90 / 90, 4)
    assert loaded["server"]["samples"][1]["replicas"] == 2
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_path.stat().st_size > 5000


def test_report_without_server_stats_or_requests(tmp_path: Path) -> None:
    rep = build_report(scenario="ramp", base_url="http://127.0.0.1:8000", config={},
                       stats=Stats(), started_at=1.0, elapsed_s=0.0)
    json_path, png_path = write_report(rep, tmp_path)
    check_schema(orjson.loads(json_path.read_bytes()))
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_extract_tolerates_shapes() -> None:
    assert extract({"cache": {"hits": 3, "misses": 1}, "replicas": 2}) == {
        "cache_hits": 3.0, "cache_misses": 1.0, "replicas": 2.0,
        "server_hit_rate": None, "sse_open": None, "replica": None}
    e = extract({"cache": {"events": {"hits": 1, "misses": 2, "size": 5},
                           "tickets": {"hits": 4, "misses": 0}},
                 "replicas": {"api": 2, "other": [1, 2, 3]}, "cache_hit_rate": 0.5,
                 "sse_open": 7})
    assert (e["cache_hits"], e["cache_misses"], e["replicas"]) == (5.0, 2.0, 5.0)
    assert e["server_hit_rate"] == 0.5 and e["sse_open"] == 7.0
    assert extract({"replicas": None})["replicas"] is None
    assert extract("nonsense")["cache_hits"] is None
    assert extract({"cache": "x", "replicas": True})["replicas"] is None


def test_hit_rate_series_is_per_interval() -> None:
    rows = hit_rate_series([{"t": 0, "cache_hits": 0, "cache_misses": 0},
                            {"t": 1, "cache_hits": 9, "cache_misses": 1},
                            {"t": 2, "cache_hits": 5, "cache_misses": 1},   # other replica
                            {"t": 3, "cache_hits": None, "cache_misses": None}])
    assert [r["cache_hit_rate"] for r in rows] == [None, 0.9, None, None]


def test_hit_rates_never_subtract_one_replicas_counters_from_anothers() -> None:
    a = lambda t, h, m: {"t": t, "replica": "a", "cache_hits": h, "cache_misses": m}  # noqa: E731
    b = lambda t, h, m: {"t": t, "replica": "b", "cache_hits": h, "cache_misses": m}  # noqa: E731
    samples = [a(0, 100, 10), b(1, 5, 5), a(2, 190, 20), b(3, 25, 5)]
    assert [r["cache_hit_rate"] for r in hit_rate_series(samples)] == [None, None, 0.9, 1.0]
    # a: 90 hits, 10 misses; b: 20 hits, 0 misses -> 110 / 120
    assert overall_hit_rate(samples) == round(110 / 120, 4)
    assert overall_hit_rate([b(0, 50, 0), a(1, 10, 0)]) is None  # one sample each: no interval
    assert extract({"replica": "host:1", "cache": {"hits": 1, "misses": 0}})["replica"] == "host:1"

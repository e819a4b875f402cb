"""Every PromQL expression of the dashboards and alert rules, evaluated by a real
Prometheus scraping the test session's Ray.

A real Prometheus (Debian's, started by `cluster.monitoring`) reads Ray's metrics
service-discovery file; a short load of real HTTP requests runs against the deployed
app until the application's metrics have been scraped (bounded wait: Ray exports every
few seconds); then every expression found in every dashboard panel target, every
dashboard query variable and every alert rule is sent to `/api/v1/query`. Each must
evaluate without error. Each whose metrics the short load produces must return data;
the ones that legitimately have no samples after such a load are listed in TOLERATED
with the reason. An expression naming a metric in neither list fails the test, so a
new panel has to be classified here.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from cluster.launcher import free_port
from cluster.monitoring import (
    DISCOVERY_FILE_NAME,
    alert_expressions,
    dashboard_expressions,
    start_prometheus,
    stop_prometheus,
    substitute,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/bin/prometheus").exists(), reason="prometheus missing: apt-get install prometheus"),
]

WAIT_S = 150  # Ray exports metrics every ~5-10 s, Prometheus scrapes every 5 s

# Metrics (exported names) the short load must produce.
REQUIRED = {
    "ray_eventpulse_http_requests_total": "every request",
    "ray_eventpulse_http_request_duration_seconds": "every non-streaming request",
    "ray_eventpulse_cache_requests_total": "event and availability reads go through the caches",
    "ray_eventpulse_redis_pool_connections": "replicas publish their Redis pool state",
    "ray_eventpulse_line_waiting": "the line actor publishes its gauges",
    "ray_eventpulse_line_live_offers": "the line actor publishes its gauges",
    "ray_eventpulse_line_remaining": "the line actor publishes its gauges",
    "ray_eventpulse_line_eta_seconds": "the line actor publishes its gauges",
    "ray_eventpulse_line_offers_per_minute": "the line actor publishes its gauges",
    "ray_eventpulse_line_joins_total": "the load joins the line",
    "ray_eventpulse_line_offers_total": "the sale is open and tickets remain, so joiners get offers",
    "ray_eventpulse_journal_flush_duration_seconds": "every join is journaled",
    "ray_serve_deployment_replica_healthy": "the Serve controller reports replica health",
}

# Metrics that may legitimately have no samples after the short load, and why.
TOLERATED = {
    "ray_eventpulse_line_expired_total": "no offer expires within the short run (offers last minutes)",
    "ray_eventpulse_line_abandoned_total": "nobody is abandoned within the short run",
    "ray_eventpulse_snapshot_bytes": "a snapshot is written only every N mutations / T seconds",
    "ray_eventpulse_snapshot_duration_seconds": "a snapshot is written only every N mutations / T seconds",
    "ray_eventpulse_actor_restarts_total": "no actor restarts in this test",
    "ray_eventpulse_overload_rejections_total": "the short load does not overload a replica",
    "ray_eventpulse_sse_connections": "the load opens no SSE stream (the gauge is set when one opens/closes)",
    "ray_eventpulse_redis_errors_total": "Redis stays healthy",
    "ray_eventpulse_purchase_stream_lag": "the purchase job is not started by this test",
    "ray_eventpulse_purchase_batch_size": "the load makes no purchase",
    "ray_eventpulse_purchases_total": "the load makes no purchase",
    "ray_eventpulse_purchase_dead_letters_total": "the load makes no purchase (and dead letters are rare anyway)",
    "ray_eventpulse_purchase_commit_duration_seconds": "the load makes no purchase",
    "ray_eventpulse_purchase_stage_duration_seconds": "the load makes no purchase",
    "ray_serve_replica_processing_queries": "Serve may not export it from replicas in this mode within the run",
    "ray_serve_autoscaling_target_replicas": "only for autoscaling deployments; the test app has fixed replicas",
}


def base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in {**REQUIRED, **TOLERATED}:
            return name[: -len(suffix)]
    return name


def metrics_of(expr: str) -> set[str]:
    return {base_name(n) for n in re.findall(r"\bray_[a-z0-9_]+", expr)}



async def query(session: aiohttp.ClientSession, prom: str, expr: str) -> dict:
    async with session.get(f"{prom}/api/v1/query", params={"query": expr, "time": str(time.time())}) as r:
        body = await r.json(content_type=None)
        if r.status != 200 or body.get("status") != "success":
            return {"error": f"{r.status} {body.get('errorType')}: {body.get('error')}"}
        return body["data"]


async def load_round(http: aiohttp.ClientSession, event_id: str, auth_headers, statuses: dict) -> None:
    async def hit(method: str, path: str, **kw) -> None:
        async with http.request(method, path, **kw) as r:
            await r.read()
            statuses.setdefault(path.replace(event_id, "{id}"), []).append(r.status)

    await hit("GET", "/healthz")
    reader = auth_headers("mon-reader")  # event reads need a signed-in user
    for _ in range(3):
        await hit("GET", f"/api/events/{event_id}", headers=reader)
        await hit("GET", f"/api/events/{event_id}/availability", headers=reader)
    for _ in range(2):
        headers = auth_headers(f"mon-{uuid.uuid4().hex[:10]}")
        await hit("POST", f"/api/events/{event_id}/queue", json={"quantity": 1}, headers=headers)
        await hit("GET", f"/api/events/{event_id}/queue/me", headers=headers)


async def test_every_dashboard_and_alert_expression_evaluates(serve_url, ray_session_dir, auth_headers, demo_event, tmp_path):
    exprs = dashboard_expressions() + alert_expressions()
    unclassified = {(where, m) for where, e in exprs for m in metrics_of(e) if m not in REQUIRED and m not in TOLERATED}
    assert not unclassified, f"classify these metrics in REQUIRED or TOLERATED: {sorted(unclassified)}"

    session_file = Path(ray_session_dir) / DISCOVERY_FILE_NAME
    # Ray writes the file into the session dir and symlinks /tmp/ray/<name> to it.
    session_dir = ray_session_dir if session_file.exists() else None
    prom = await asyncio.to_thread(start_prometheus, tmp_path / "prometheus", free_port(), ray_session_dir=session_dir)
    statuses: dict[str, list[int]] = {}
    try:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(base_url=serve_url, timeout=timeout) as http, \
                aiohttp.ClientSession(timeout=timeout) as pq:
            # ---- drive load until every required metric has been scraped, rates included
            checks = [f'count({{__name__=~"{m}(_bucket)?"}})' for m in REQUIRED] + [
                "sum(rate(ray_eventpulse_http_requests_total[1m])) > 0",
                "sum(rate(ray_eventpulse_line_joins_total[1m])) > 0",
                "sum(rate(ray_eventpulse_http_request_duration_seconds_bucket[1m])) > 0",
            ]
            deadline = time.monotonic() + WAIT_S
            missing = checks
            while True:
                await load_round(http, demo_event, auth_headers, statuses)
                results = [await query(pq, prom.url, c) for c in missing]
                missing = [c for c, r in zip(missing, results) if not r.get("result")]
                if not missing:
                    break
                if time.monotonic() > deadline:
                    async with pq.get(f"{prom.url}/api/v1/targets") as r:
                        targets = await r.text()
                    pytest.fail(f"after {WAIT_S}s still no data for {missing}; targets: {targets[:1500]}; "
                                f"load statuses: { {k: sorted(set(v)) for k, v in statuses.items()} }")
                await asyncio.sleep(2)
            for _ in range(3):  # a few more rounds so every rate() window has increments
                await load_round(http, demo_event, auth_headers, statuses)
                await asyncio.sleep(2)

            # the load really reached the app
            for path in ("/healthz", "/api/events/{id}", "/api/events/{id}/availability",
                         "/api/events/{id}/queue", "/api/events/{id}/queue/me"):
                assert any(200 <= s < 300 for s in statuses[path]), (path, statuses[path])

            # ---- evaluate every expression
            errors, empty = [], []
            for where, expr in exprs:
                promql = substitute(expr, {"event_id": demo_event}, rate_interval="1m")
                data = await query(pq, prom.url, promql)
                if "error" in data:
                    errors.append((where, promql, data["error"]))
                    continue
                if where.startswith("alerts.yml"):
                    continue  # an alert condition is empty while all is well; required metrics checked above
                if not data["result"] and not (metrics_of(expr) & TOLERATED.keys()):
                    empty.append((where, promql))
            assert not errors, errors
            assert not empty, f"no data for expressions whose metrics the load produces: {empty}"

            # the status label holds the numeric code the 5xx/4xx matchers expect
            data = await query(pq, prom.url, "sum by (status) (ray_eventpulse_http_requests_total)")
            codes = {r["metric"].get("status") for r in data["result"]}
            assert codes and all(re.fullmatch(r"\d{3}", c or "") for c in codes), codes
            # the event variable of the event-line dashboard offers the demo event
            data = await query(pq, prom.url, "group by (event_id) (ray_eventpulse_line_waiting)")
            assert demo_event in {r["metric"].get("event_id") for r in data["result"]}
            # the per-event panels see the event's joins
            data = await query(pq, prom.url, f'sum(ray_eventpulse_line_joins_total{{event_id="{demo_event}"}})')
            assert data["result"] and float(data["result"][0]["value"][1]) >= 1
            # Prometheus loaded every alert rule
            async with pq.get(f"{prom.url}/api/v1/rules") as r:
                rules = (await r.json())["data"]["groups"]
            loaded = {rule["name"] for g in rules for rule in g["rules"]}
            assert loaded == {where.rsplit(" / ", 1)[1] for where, _ in alert_expressions()}
            assert all(rule.get("health") != "err" for g in rules for rule in g["rules"]), rules
    finally:
        await asyncio.to_thread(stop_prometheus, prom)

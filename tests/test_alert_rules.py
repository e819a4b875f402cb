"""Static checks of the monitoring config: Prometheus config and alert rules pass
`promtool`, every dashboard and alert PromQL expression parses, names only metrics that
exist (as exported through Ray's Prometheus endpoint), and the dashboards follow the
house rules (stable uid, `${datasource}` variable used by every panel).

Live evaluation against a real Prometheus scraping Ray is in test_monitoring_live.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.monitoring import (
    CONFIG_DIR,
    DASHBOARD_DIR,
    alert_expressions,
    dashboard_expressions,
    substitute,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent
ALERTS = CONFIG_DIR / "alerts.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool missing: apt-get install prometheus")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool():
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_prometheus_config_passes_promtool(tmp_path):
    # as shipped (copied with its rule file, so the relative rule path resolves) ...
    shutil.copy(CONFIG_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    proc = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and as cluster/monitoring.py rewrites it for a Ray session dir
    session = tmp_path / "session_x"
    session.mkdir()
    (session / "prom_metrics_service_discovery.json").write_text(
        json.dumps([{"labels": {"job": "ray"}, "targets": ["127.0.0.1:8080"]}]))
    data = tmp_path / "data"
    data.mkdir()
    config = write_config(data, CONFIG_DIR, session / "prom_metrics_service_discovery.json")
    proc = promtool("check", "config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = yaml.safe_load(config.read_text())
    assert written["global"]["scrape_interval"] == "5s"
    assert written["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(session / "prom_metrics_service_discovery.json")]
    assert written["rule_files"] == [str(data / "alerts.yml")]


def test_shipped_config_scrapes_ray_discovery_file():
    config = yaml.safe_load((CONFIG_DIR / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    assert config["rule_files"] == ["alerts.yml"]
    files = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    from ray._private import ray_constants

    assert [Path(f).name for f in files] == [ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE]


def test_every_alert_has_severity_and_explains_what_to_do():
    rules = yaml.safe_load(ALERTS.read_text())
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            names.append(rule["alert"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert len(rule["annotations"]["summary"]) > 10, rule["alert"]
            assert len(rule["annotations"]["description"]) > 80, rule["alert"]
    for wanted in ("EventPulseHighErrorRate", "EventPulseHighLatency", "EventPulseLineStalled", "EventPulsePurchaseLagGrowing",
                   "EventPulseRedisPoolExhausted", "EventPulseRedisErrors", "EventPulseActorRestarted"):
        assert wanted in names


def test_dashboards_have_stable_uids_and_use_the_datasource_variable():
    files = sorted(DASHBOARD_DIR.glob("*.json"))
    assert {f.stem for f in files} >= {"overview", "event-line", "purchases", "infrastructure"}
    uids = set()
    for path in files:
        dash = json.loads(path.read_text())
        assert re.fullmatch(r"[a-z0-9-]{1,40}", dash["uid"]), path
        uids.add(dash["uid"])
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        panels = [p for p in dash["panels"] if p["type"] != "row"]
        assert panels, path
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (path, panel["title"])
            assert panel["targets"], (path, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", (path, panel["title"])
        for var in variables.values():
            if var["type"] == "query":
                assert var["datasource"]["uid"] == "${datasource}"
        if path.stem == "event-line":
            assert "event_id" in variables
            assert all("$event_id" in t["expr"] for p in panels for t in p["targets"] if "ray_eventpulse_line_" in t["expr"])
    assert len(uids) == len(files)


def test_every_promql_expression_parses(tmp_path):
    """promtool parses every expression of every panel and rule (as recording rules)."""
    exprs = dashboard_expressions() + alert_expressions()
    assert len(exprs) > 40
    rules = {"groups": [{"name": "all", "rules": [
        {"record": f"check:expr_{i}", "expr": substitute(expr, {"event_id": "ev1"})} for i, (_, expr) in enumerate(exprs)]}]}
    leftover = [e for e in rules["groups"][0]["rules"] if "$" in e["expr"]]
    assert not leftover, leftover
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _known_metric_names() -> set[str]:
    """Names as Ray exports them: `ray_` + name; histograms as _bucket/_sum/_count."""
    from ray.util import metrics as m

    from eventpulse.metrics import _SPECS

    known = set()
    for cls, name, _tags, _buckets in _SPECS.values():
        base = f"ray_{name}"
        if cls is m.Histogram:
            known |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        else:
            known.add(base)
    # latency histograms aggregated in process and exported as _bucket/_sum/_count gauges
    for source in [*ROOT.glob("serve/**/*.py"), *ROOT.glob("actors/**/*.py"), *ROOT.glob("cluster/**/*.py"),
                   *ROOT.glob("eventpulse/**/*.py")]:
        for name in re.findall(r'aggregate\.observe\(\s*"(eventpulse_[a-z0-9_]+)"', source.read_text(errors="replace")):
            known |= {f"ray_{name}_bucket", f"ray_{name}_sum", f"ray_{name}_count"}
    # Ray Serve's own metrics, from the installed source
    import ray.serve

    serve_dir = Path(ray.serve.__file__).parent
    for source in serve_dir.rglob("*.py"):
        for name in re.findall(r'"(serve_[a-z0-9_]+)"', source.read_text(errors="replace")):
            known |= {f"ray_{name}", f"ray_{name}_bucket", f"ray_{name}_sum", f"ray_{name}_count"}
    return known


def test_expressions_only_name_exported_metrics():
    known = _known_metric_names()
    unknown = []
    for where, expr in dashboard_expressions() + alert_expressions():
        for name in re.findall(r"\bray_[a-z0-9_]+", expr):
            if name not in known:
                unknown.append((where, name))
    assert not unknown, unknown


def test_substitute_replaces_grafana_variables():
    assert substitute('rate(x{event_id=~"$event_id"}[$__rate_interval])', {"event_id": "e1"}) == 'rate(x{event_id=~"e1"}[1m])'
    assert substitute("label_values(ray_eventpulse_line_waiting, event_id)") == "ray_eventpulse_line_waiting"

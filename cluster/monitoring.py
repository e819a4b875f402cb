"""A local Prometheus that scrapes Ray (and through it every Event-Pulse metric).

`start_prometheus` runs Debian's `/usr/bin/prometheus` with `configs/prometheus/`:
the scrape config is rewritten into the data dir so that its file_sd entry names the
running Ray session's discovery file, and `alerts.yml` is copied next to it. Ray 2.60
writes the discovery file into the session directory
(`<session_dir>/prom_metrics_service_discovery.json`) and keeps a symlink to it at
`<Ray's temp root>/ray/prom_metrics_service_discovery.json`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from eventpulse.resources import config_path

CONFIG_DIR = config_path("prometheus")
DISCOVERY_FILE_NAME = "prom_metrics_service_discovery.json"  # ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
PROMETHEUS_BINARY = "/usr/bin/prometheus"
_CHILDREN: dict[int, subprocess.Popen] = {}  # started by this process, so we can reap them


class MonitoringError(Exception):
    """A clear, user-facing reason why Prometheus cannot be started or stopped."""


@dataclass
class PrometheusProcess:
    pid: int
    port: int
    url: str
    data_dir: str
    config_path: str
    log_path: str
    discovery_file: str

    def to_dict(self) -> dict:
        return asdict(self)


def find_binary() -> str:
    for candidate in (PROMETHEUS_BINARY, shutil.which("prometheus")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MonitoringError(
        "the prometheus binary was not found (looked at /usr/bin/prometheus and PATH); "
        "install it with: apt-get install prometheus"
    )


def discovery_file(ray_session_dir: str | os.PathLike | None = None) -> Path:
    """The Ray metrics service-discovery file to scrape from.

    The session directory's own file when a session dir is given (Ray may still be
    about to write it: Prometheus picks it up when it appears), else the one Ray keeps
    in its temporary root (`/tmp/ray`, or under `RAY_TMPDIR`/`TMPDIR` when set).
    """
    if ray_session_dir is not None:
        return Path(ray_session_dir) / DISCOVERY_FILE_NAME
    from ray._common.utils import get_default_system_temp_dir

    return Path(get_default_system_temp_dir()) / "ray" / DISCOVERY_FILE_NAME


def write_config(data_dir: Path, config_dir: Path, sd_file: Path) -> Path:
    """Copy the config into data_dir with absolute rule paths and the given sd file."""
    src = config_dir / "prometheus.yml"
    if not src.is_file():
        raise MonitoringError(f"Prometheus config not found: {src}")
    config = yaml.safe_load(src.read_text()) or {}
    rule_files = []
    for rule in config.get("rule_files") or []:
        rule_src = Path(rule) if Path(rule).is_absolute() else config_dir / rule
        if not rule_src.is_file():
            raise MonitoringError(f"alert rules not found: {rule_src}")
        dest = data_dir / rule_src.name
        shutil.copyfile(rule_src, dest)
        rule_files.append(str(dest))
    config["rule_files"] = rule_files
    for job in config.get("scrape_configs") or []:
        for sd in job.get("file_sd_configs") or []:
            sd["files"] = [str(sd_file)]
    dest = data_dir / "prometheus.yml"
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_prometheus(
    data_dir: str | os.PathLike,
    port: int = 9090,
    config_dir: str | os.PathLike = CONFIG_DIR,
    ray_session_dir: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> PrometheusProcess:
    """Start Prometheus on host:port with its TSDB in data_dir; return once it is ready."""
    binary = find_binary()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if not _port_free(host, port):
        raise MonitoringError(f"cannot start Prometheus: {host}:{port} is already in use")
    sd_file = discovery_file(ray_session_dir)
    config_path = write_config(data_dir, Path(config_dir), sd_file)
    log_path = data_dir / "prometheus.log"
    url = f"http://{host}:{port}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={data_dir / 'tsdb'}",
                f"--web.listen-address={host}:{port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=7d",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=data_dir,
            start_new_session=True,
        )
    info = PrometheusProcess(
        pid=proc.pid, port=port, url=url, data_dir=str(data_dir), config_path=str(config_path),
        log_path=str(log_path), discovery_file=str(sd_file),
    )
    _CHILDREN[proc.pid] = proc
    (data_dir / "prometheus.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MonitoringError(
                f"Prometheus exited with code {proc.returncode} at start; last log lines:\n"
                + _log_tail(log_path)
            )
        if _ready(url):
            return info
        time.sleep(0.2)
    stop_prometheus(info)
    raise MonitoringError(f"Prometheus did not become ready on {url} within {timeout:.0f}s; see {log_path}")


def _is_prometheus(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0].decode(errors="replace")) == "prometheus"


def stop_prometheus(target: PrometheusProcess | dict | int | str | os.PathLike, timeout: float = 10.0) -> bool:
    """Stop the Prometheus started by `start_prometheus`.

    `target` is its PrometheusProcess (or its dict), its pid, or its data dir (read
    from the pid file). Returns False when it was not running. Only a process that
    is a prometheus is signalled, so a recycled pid is never hit.
    """
    if isinstance(target, PrometheusProcess):
        pid = target.pid
    elif isinstance(target, dict):
        pid = int(target["pid"])
    elif isinstance(target, int):
        pid = target
    else:
        pid_file = Path(target) / "prometheus.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return False
    if not _is_prometheus(pid):
        _reap(pid)
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _reap(pid) or not _is_prometheus(pid):
            return True
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid, block=True)
    return True


def _reap(pid: int, block: bool = False) -> bool:
    """Collect the exit status if it is our child; True once it has exited."""
    child = _CHILDREN.get(pid)
    if child is not None:
        try:
            child.wait(timeout=None if block else 0)
        except subprocess.TimeoutExpired:
            return False
        _CHILDREN.pop(pid, None)
        return True
    try:
        done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()
    return done == pid


# ---------------------------------------------------------------- PromQL inventory
DASHBOARD_DIR = config_path("grafana")


def dashboard_expressions(directory: str | os.PathLike = DASHBOARD_DIR) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and query variable of every dashboard."""
    import json

    out: list[tuple[str, str]] = []
    for path in sorted(Path(directory).glob("*.json")):
        dash = json.loads(path.read_text())

        def walk(panels: list, prefix: str) -> None:
            for panel in panels or []:
                for target in panel.get("targets") or []:
                    if target.get("expr"):
                        out.append((f"{prefix} / {panel.get('title')} [{target.get('refId')}]", target["expr"]))
                walk(panel.get("panels") or [], prefix)

        walk(dash.get("panels") or [], path.name)
        for var in (dash.get("templating") or {}).get("list") or []:
            if var.get("type") == "query":
                query = var.get("query")
                query = query.get("query") if isinstance(query, dict) else query
                if query:
                    out.append((f"{path.name} / variable {var['name']}", query))
    return out


def alert_expressions(path: str | os.PathLike = CONFIG_DIR / "alerts.yml") -> list[tuple[str, str]]:
    """(where, expr) of every alerting/recording rule."""
    rules = yaml.safe_load(Path(path).read_text()) or {}
    return [
        (f"{Path(path).name} / {group['name']} / {rule.get('alert') or rule.get('record')}", rule["expr"].strip())
        for group in rules.get("groups") or []
        for rule in group.get("rules") or []
    ]


def substitute(expr: str, values: dict[str, str] | None = None, rate_interval: str = "1m") -> str:
    """Replace Grafana template variables so Prometheus can evaluate the expression.

    `label_values(metric, label)` (a Grafana variable query) becomes `metric`.
    """
    import re

    values = {"__rate_interval": rate_interval, "__interval": "15s", "__range": "1h", "datasource": "prometheus",
              **(values or {})}
    m = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", expr)
    if m:
        expr = m.group(1)
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr

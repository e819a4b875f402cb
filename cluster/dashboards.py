"""Push the Grafana dashboards in `configs/grafana/` to a Grafana, with `grafana-client`.

Every dashboard carries a stable `uid` and is posted with `overwrite=True`, so pushing
again updates the same dashboards (Grafana bumps their version) instead of adding
copies. They land in one folder (default "Event-Pulse", stable folder uid
`eventpulse`), which is created when missing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import typer
from grafana_client import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaUnauthorizedError,
)

from eventpulse.resources import config_path

DASHBOARD_DIR = config_path("grafana")
FOLDER_UID = "eventpulse"
TOKEN_ENV = "EVENTPULSE_GRAFANA_TOKEN"


class DashboardPushError(Exception):
    """A readable reason why the dashboards could not be pushed."""


@dataclass
class PushResult:
    file: str
    uid: str
    title: str
    status: str  # Grafana's answer, e.g. "success"
    version: int | None
    url: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_dashboards(directory: str | os.PathLike = DASHBOARD_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """Every `*.json` dashboard in directory, checked to have a uid and a title."""
    directory = Path(directory)
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DashboardPushError(f"no dashboard JSON files in {directory}")
    out = []
    for path in files:
        try:
            dash = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DashboardPushError(f"{path}: not a readable JSON dashboard ({e})") from e
        if not isinstance(dash, dict) or not dash.get("uid") or not dash.get("title"):
            raise DashboardPushError(f"{path}: a dashboard needs a stable 'uid' and a 'title'")
        out.append((path, dash))
    return out


def _describe(url: str, exc: Exception) -> str:
    """One line that says what went wrong, without the client's internals."""
    if isinstance(exc, GrafanaUnauthorizedError):
        return f"Grafana at {url} refused the token (401 Unauthorized): check the API/service-account token"
    if isinstance(exc, GrafanaClientError) and getattr(exc, "status_code", None) == 403:
        return (f"Grafana at {url} refused the token (403 Forbidden): the token needs the Editor or Admin role "
                "to create folders and dashboards")
    if isinstance(exc, GrafanaException):
        status = getattr(exc, "status_code", 0)
        message = getattr(exc, "message", "") or str(exc)
        if status:
            return f"Grafana at {url} answered {status}: {message}"
        return _describe(url, Exception(message))
    text = str(exc)
    reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if reason:
        return f"cannot reach Grafana at {url}: {reason.group(1).strip()}"
    unresolved = re.search(r"Failed to resolve '([^']+)'", text)
    if unresolved:
        return f"cannot reach Grafana at {url}: host {unresolved.group(1)!r} not found"
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return f"cannot reach Grafana at {url}: timed out"
    return f"cannot reach Grafana at {url}: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _api(url: str, token: str | None, timeout: float) -> GrafanaApi:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise DashboardPushError(f"not a Grafana URL: {url!r} (expected http(s)://host:port)")
    return GrafanaApi.from_url(url, credential=token or None, timeout=timeout)


def _ensure_folder(api: GrafanaApi, title: str) -> str:
    folders = api.folder.get_all_folders()
    for folder in folders or []:
        if folder.get("uid") == FOLDER_UID or folder.get("title") == title:
            return folder["uid"]
    created = api.folder.create_folder(title, uid=FOLDER_UID)
    return created["uid"]


def push_dashboards(
    url: str,
    token: str | None,
    folder: str = "Event-Pulse",
    directory: str | os.PathLike = DASHBOARD_DIR,
    *,
    timeout: float = 10.0,
) -> list[PushResult]:
    """Create/update every dashboard of `directory` in `folder` of the Grafana at `url`."""
    dashboards = load_dashboards(directory)
    api = _api(url, token, timeout)
    results: list[PushResult] = []
    try:
        folder_uid = _ensure_folder(api, folder)
        for path, dash in dashboards:
            body = dict(dash)
            body["id"] = None  # identify by uid: Grafana matches the existing dashboard by it
            answer = api.dashboard.update_dashboard(
                {
                    "dashboard": body,
                    "folderUid": folder_uid,
                    "overwrite": True,
                    "message": f"pushed by eventpulse from {path.name}",
                }
            )
            answer = answer if isinstance(answer, dict) else {}
            results.append(
                PushResult(
                    file=path.name,
                    uid=answer.get("uid", dash["uid"]),
                    title=dash["title"],
                    status=str(answer.get("status", "success")),
                    version=answer.get("version"),
                    url=answer.get("url", ""),
                )
            )
    except DashboardPushError:
        raise
    except Exception as e:  # noqa: BLE001 — grafana-client/niquests/OS errors become one readable line
        raise DashboardPushError(_describe(url, e)) from e
    return results


# ---------------------------------------------------------------- CLI
dashboards_app = typer.Typer(help="Grafana dashboards of Event-Pulse.", no_args_is_help=True, add_completion=False)


@dashboards_app.callback()
def _dashboards() -> None:
    """Grafana dashboards of Event-Pulse (configs/grafana/*.json)."""
    # A callback keeps `push` a sub-command even while it is the only one.


@dashboards_app.command("push")
def push_command(
    url: str = typer.Option("http://127.0.0.1:3000", "--url", help="Base URL of Grafana."),
    token: str = typer.Option(None, "--token", envvar=TOKEN_ENV, help=f"Grafana service-account token (or ${TOKEN_ENV})."),
    folder: str = typer.Option("Event-Pulse", "--folder", help="Grafana folder to put the dashboards in."),
    directory: Path = typer.Option(DASHBOARD_DIR, "--dir", help="Directory of dashboard JSON files."),
) -> None:
    """Create or update the Event-Pulse dashboards in Grafana (same uid: updated, not duplicated)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        results = push_dashboards(url, token, folder=folder, directory=directory)
    except DashboardPushError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    table = Table(title=f"Dashboards pushed to {url} (folder {folder!r})")
    for col in ("file", "uid", "title", "status", "version", "url"):
        table.add_column(col, no_wrap=col in ("uid", "file"))
    for r in results:
        table.add_row(r.file, r.uid, r.title, r.status, "" if r.version is None else str(r.version), r.url)
    console.print(table)

"""Pushing the dashboards of configs/grafana/ with `cluster.dashboards`.

Grafana itself has no package reachable from this machine, so these tests run against a
small stand-in: an HTTP server in a thread that speaks exactly the Grafana HTTP API
calls `grafana-client` makes for our push (`GET /api/folders`, `POST /api/folders`,
`POST /api/dashboards/db`, plus `GET /api/dashboards/uid/<uid>` for the assertions),
behaves like Grafana where it matters (Bearer token checked, 401/403 refusals,
dashboards identified by uid, `overwrite` required to replace one, version bumped on
every save) and records every request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.dashboards import (
    DASHBOARD_DIR,
    FOLDER_UID,
    DashboardPushError,
    dashboards_app,
    load_dashboards,
    push_dashboards,
)

ROOT = Path(__file__).resolve().parent.parent
GOOD = "glsa_good-token"
VIEWER = "glsa_viewer-token"


class FakeGrafana:
    """State of the stand-in Grafana; `requests` records (method, path, auth, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None, object]] = []
        self.folders: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard", "folderUid", "version", "id"}
        self.next_id = 1
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, auth: str | None, body: object) -> tuple[int, object]:
        with self.lock:
            self.requests.append((method, path, auth, body))
            if auth == f"Bearer {VIEWER}":
                if method == "GET":
                    pass
                else:
                    return 403, {"message": "You'll need additional permissions to perform this action. "
                                            "Permissions needed: folders:create"}
            elif auth != f"Bearer {GOOD}":
                return 401, {"message": "invalid API key", "messageId": "api-key.invalid", "statusCode": 401}
            if method == "GET" and path == "/api/folders":
                return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders.values()]
            if method == "POST" and path == "/api/folders":
                assert isinstance(body, dict)
                uid = body.get("uid") or f"gen{self.next_id}"
                if uid in self.folders or any(f["title"] == body["title"] for f in self.folders.values()):
                    return 409, {"message": "a folder with the same name already exists"}
                folder = {"id": self._id(), "uid": uid, "title": body["title"], "version": 1}
                self.folders[uid] = folder
                return 200, folder
            if method == "POST" and path == "/api/dashboards/db":
                assert isinstance(body, dict)
                dash = body["dashboard"]
                uid = dash.get("uid")
                if body.get("folderUid") and body["folderUid"] not in self.folders:
                    return 400, {"message": "folder not found"}
                existing = self.dashboards.get(uid)
                if existing is not None:
                    if not body.get("overwrite") and dash.get("version") != existing["version"]:
                        return 412, {"status": "version-mismatch", "message": "The dashboard has been changed by someone else"}
                    version, dash_id = existing["version"] + 1, existing["id"]
                else:
                    version, dash_id = 1, self._id()
                stored = {**dash, "id": dash_id, "version": version}
                self.dashboards[uid] = {"dashboard": stored, "folderUid": body.get("folderUid"), "version": version, "id": dash_id}
                slug = dash["title"].lower().replace(" / ", "-").replace(" ", "-")
                return 200, {"id": dash_id, "uid": uid, "url": f"/d/{uid}/{slug}", "status": "success",
                             "version": version, "slug": slug}
            if method == "GET" and path.startswith("/api/dashboards/uid/"):
                uid = path.rsplit("/", 1)[1]
                if uid not in self.dashboards:
                    return 404, {"message": "Dashboard not found"}
                d = self.dashboards[uid]
                return 200, {"dashboard": d["dashboard"], "meta": {"folderUid": d["folderUid"], "version": d["version"]}}
            return 404, {"message": "Not found"}

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def posts(self, path: str) -> list:
        return [r for r in self.requests if r[0] == "POST" and r[1] == path]


@pytest.fixture
def grafana():
    state = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            status, answer = state.handle(method, self.path.split("?", 1)[0], self.headers.get("Authorization"), body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._serve("GET")

        def do_POST(self):  # noqa: N802
            self._serve("POST")

        def log_message(self, *args):  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _files() -> dict[str, dict]:
    return {dash["uid"]: dash for _, dash in load_dashboards(DASHBOARD_DIR)}


def test_every_dashboard_arrives_whole_in_the_folder(grafana):
    files = _files()
    assert len(files) >= 4
    results = push_dashboards(grafana.url, GOOD)
    assert sorted(r.uid for r in results) == sorted(files)
    assert all(r.status == "success" and r.version == 1 for r in results)

    folder_posts = grafana.posts("/api/folders")
    assert len(folder_posts) == 1 and folder_posts[0][3] == {"title": "Event-Pulse", "uid": FOLDER_UID}
    posts = grafana.posts("/api/dashboards/db")
    assert len(posts) == len(files)
    for _, _, auth, body in posts:
        assert auth == f"Bearer {GOOD}"
        assert body["overwrite"] is True and body["folderUid"] == FOLDER_UID
        sent = body["dashboard"]
        original = files[sent["uid"]]
        # whole: every key of the file, panels and templating included, unchanged
        assert {k: v for k, v in sent.items() if k != "id"} == original
        assert sent["panels"] and sent["templating"]["list"][0]["name"] == "datasource"
    for uid, original in files.items():
        stored = grafana.dashboards[uid]
        assert stored["folderUid"] == FOLDER_UID
        assert stored["dashboard"]["panels"] == original["panels"]
        assert stored["dashboard"]["templating"] == original["templating"]


def test_second_push_updates_rather_than_duplicates(grafana):
    first = {r.uid: r for r in push_dashboards(grafana.url, GOOD)}
    ids = {uid: d["id"] for uid, d in grafana.dashboards.items()}
    second = {r.uid: r for r in push_dashboards(grafana.url, GOOD)}

    assert second.keys() == first.keys()
    assert len(grafana.dashboards) == len(first)  # no duplicates
    assert len(grafana.folders) == 1 and len(grafana.posts("/api/folders")) == 1  # folder reused
    for uid in first:
        assert second[uid].version == first[uid].version + 1
        assert grafana.dashboards[uid]["id"] == ids[uid]
    assert all(body["overwrite"] is True for *_, body in grafana.posts("/api/dashboards/db"))


def test_existing_folder_with_the_same_title_is_reused(grafana):
    grafana.folders["abc"] = {"id": 99, "uid": "abc", "title": "Event-Pulse", "version": 1}
    push_dashboards(grafana.url, GOOD)
    assert not grafana.posts("/api/folders")
    assert {d["folderUid"] for d in grafana.dashboards.values()} == {"abc"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_grafana_is_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(DashboardPushError) as info:
        push_dashboards(url, GOOD, timeout=3)
    message = str(info.value)
    assert message.startswith(f"cannot reach Grafana at {url}")
    assert "\n" not in message


def test_refused_token_is_a_clear_error(grafana):
    with pytest.raises(DashboardPushError) as info:
        push_dashboards(grafana.url, "wrong")
    assert "refused the token (401" in str(info.value)
    with pytest.raises(DashboardPushError) as info:
        push_dashboards(grafana.url, VIEWER)
    assert "refused the token (403" in str(info.value)
    assert not grafana.dashboards


def test_bad_url_and_empty_directory(tmp_path):
    with pytest.raises(DashboardPushError, match="not a Grafana URL"):
        push_dashboards("localhost:3000", GOOD)
    with pytest.raises(DashboardPushError, match="no dashboard JSON"):
        push_dashboards("http://127.0.0.1:1", GOOD, directory=tmp_path)


def test_cli_push_prints_results_with_token_from_env(grafana):
    result = CliRunner().invoke(dashboards_app, ["push", "--url", grafana.url], env={"EVENTPULSE_GRAFANA_TOKEN": GOOD, "COLUMNS": "250"},
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    for uid in _files():
        assert uid in result.output
    assert len(grafana.dashboards) == len(_files())


@pytest.mark.parametrize("case", ["refused", "unreachable"])
def test_cli_failure_exits_1_with_one_line_and_no_traceback(grafana, case):
    url = grafana.url if case == "refused" else f"http://127.0.0.1:{_free_port()}"
    code = "from cluster.dashboards import dashboards_app; dashboards_app(prog_name='eventpulse dashboards')"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EVENTPULSE_GRAFANA_TOKEN": "", "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-c", code, "push", "--url", url, "--token", "wrong"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert ("refused the token" if case == "refused" else "cannot reach Grafana") in lines[0]

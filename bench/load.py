"""`python -m bench.load SCENARIO [options]` — drive Event-Pulse with a scenario, write a report.

Scenarios: seed-mix, flash-sale, waiting-crowd, ramp (see bench/scenarios/). Only loopback
targets are accepted. The report (report.json, report.png) goes to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.kpi import Kpis, parse_range
from bench.runner import SCENARIOS, RunConfig, SetupError, run
from bench.safety import NonLoopbackTarget, require_loopback


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL (loopback only)")
    p.add_argument("--secret", default=None,
                   help="token secret (default: the instance's; EVENTPULSE_TOKEN_SECRET). "
                        "Write --secret=VALUE: a secret may start with '-'")
    p.add_argument("--users", type=int, default=50,
                   help="virtual users (seed-mix), buyers N (flash-sale), waiters M (crowd)")
    p.add_argument("--duration", type=float, default=60.0, help="hard time bound, seconds")
    p.add_argument("--max-requests", type=int, default=None, help="hard request-count bound")
    p.add_argument("--think", default="1-3", help="think time range LOW-HIGH seconds")
    p.add_argument("--event-id", default=None, help="use this event instead of creating one")
    p.add_argument("--tickets", type=int, default=100, help="flash-sale capacity C")
    p.add_argument("--quantity", type=int, default=1, help="tickets per user")
    p.add_argument("--concurrency", type=int, default=50, help="concurrent joins")
    p.add_argument("--max-live-offers", type=int, default=None)
    p.add_argument("--offers-per-minute", type=int, default=None)
    p.add_argument("--purchase-wait", type=float, default=5.0, help="?wait= for purchases")
    p.add_argument("--poll", type=float, default=1.0, help="poll period without SSE, s")
    p.add_argument("--changes", type=int, default=5, help="waiting-crowd: line moves")
    p.add_argument("--move", choices=("leave", "offers"), default="leave",
                   help="waiting-crowd: how the line is moved")
    p.add_argument("--push-timeout", type=float, default=10.0,
                   help="waiting-crowd: wait this long for every affected stream")
    p.add_argument("--start", type=int, default=50, help="ramp: first step's users")
    p.add_argument("--step", type=int, default=50, help="ramp: users added per step")
    p.add_argument("--step-seconds", type=float, default=30.0, help="ramp: step length")
    p.add_argument("--max-users", type=int, default=2000, help="ramp: upper bound")
    p.add_argument("--kpi-p95-ms", type=float, default=1000.0)
    p.add_argument("--kpi-error-rate", type=float, default=0.005)
    p.add_argument("--kpi-position-mean-ms", type=float, default=100.0)
    p.add_argument("--kpi-tickets-mean-ms", type=float, default=300.0)
    p.add_argument("--workers", type=int, default=1, help="client sessions to spread VUs over")
    p.add_argument("--connections", type=int, default=None,
                   help="total connection limit (default: sized to the scenario)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: bench-results/<scenario>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no live terminal table")
    return p


def config_from_args(a: argparse.Namespace) -> RunConfig:
    out = a.out or Path("bench-results") / f"{a.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    return RunConfig(
        scenario=a.scenario, base_url=a.url, secret=a.secret, users=a.users,
        duration_s=a.duration, max_requests=a.max_requests, think=parse_range(a.think),
        event_id=a.event_id, tickets=a.tickets, quantity=a.quantity,
        concurrency=a.concurrency, max_live_offers=a.max_live_offers,
        offers_per_minute=a.offers_per_minute, purchase_wait_s=a.purchase_wait,
        poll_s=a.poll, changes=a.changes, move=a.move, push_timeout_s=a.push_timeout,
        ramp_start=a.start, ramp_step=a.step, step_seconds=a.step_seconds,
        max_users=a.max_users,
        kpis=Kpis(p95_s=a.kpi_p95_ms / 1e3, error_rate=a.kpi_error_rate,
                  position_mean_s=a.kpi_position_mean_ms / 1e3,
                  tickets_mean_s=a.kpi_tickets_mean_ms / 1e3),
        workers=a.workers, connections=a.connections, request_timeout_s=a.timeout,
        seed=a.seed, out=out, progress=not a.no_progress,
    )


def summary_text(report: dict[str, Any]) -> str:
    t = report["totals"]
    lat = t["latency_ms"]
    lines = [f"{report['scenario']}: {t['requests']} requests in {report['elapsed_s']:.1f} s "
             f"({t['rps']:.0f} req/s), errors {t['errors']} ({t['error_rate']:.2%}), "
             f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms"]
    for name, r in report["routes"].items():
        lm = r["latency_ms"]
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors_by_status"].items())
        lines.append(f"  {name:<22} n={r['count']:<7} mean {lm['mean']:8.1f} ms  "
                     f"p95 {lm['p95']:8.1f} ms  p99 {lm['p99']:8.1f} ms"
                     + (f"  errors {errs}" if errs else ""))
    res = report.get("result") or {}
    for key in ("held_users", "stop_reason", "joins_per_s", "purchased", "offer_to_ticket_ms",
                "oversell", "open_streams_max", "push_delay_ms", "missed_pushes",
                "first_join_error", "first_purchase_error", "first_leave_error"):
        if key in res:
            lines.append(f"  {key}: {res[key]}")
    srv = report.get("server") or {}
    if srv.get("available"):
        lines.append(f"  server cache hit rate: {srv.get('cache_hit_rate')}")
    if "files" in report:
        lines.append(f"  report: {report['files']['json']}  {report['files']['png']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_loopback(args.url)
        cfg = config_from_args(args)
    except (NonLoopbackTarget, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = run(cfg)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(summary_text(report))
    oversell = (report.get("result") or {}).get("oversell")
    if isinstance(oversell, dict) and not oversell.get("ok"):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.joins` — joins a second with `wrk`, each by a user never seen before.

The join is the flash sale's hot write. `wrk` (C, one thread) drives it so that the
generator takes as little of the two cores as it can: the figure is the server's. The
command creates an event with room for every join, warms it with one join (the event's
actor starts on the first call), mints one token per request and runs
`wrk -s bench/wrk/join.lua` against `POST /api/events/{id}/queue`. Needs `wrk` on PATH
(`apt-get install wrk`); loopback targets only.
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import orjson

from bench.http import Tokens, default_secret
from bench.safety import NonLoopbackTarget, require_loopback

SCRIPT = Path(__file__).parent / "wrk" / "join.lua"


def prepare(base: str, tokens: Tokens, run_id: str, users: int) -> str:
    """A fresh event with room for `users` joins, its actor started by one join."""
    org = tokens.header(f"bench-{run_id}-org", ("organizer",))
    with httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/api/events", headers=org, json={
            "name": f"bench joins {run_id}", "event_date": "2099-01-01T20:00:00+00:00",
            "price": 1, "total_tickets": users + 10})
        r.raise_for_status()
        event_id = r.json()["id"]
        warm = http.post(f"/api/events/{event_id}/queue", json={"quantity": 1},
                         headers=tokens.header(f"bench-{run_id}-warm"))
        warm.raise_for_status()
    return event_id


def wrk_rate(output: str) -> tuple[int, float, int]:
    """(requests answered, requests a second, answers that were not 2xx) from wrk's report."""
    sent = re.search(r"(\d+) requests in ", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if sent is None or rate is None:
        raise ValueError(f"wrk printed no rate:\n{output}")
    return int(sent.group(1)), float(rate.group(1)), int(bad.group(1)) if bad else 0


def wrk_statuses(output: str) -> dict[int, int]:
    """Answers by status, from the line `bench/wrk/join.lua` prints when wrk is done."""
    line = re.search(r"^statuses:(.*)$", output, re.MULTILINE)
    if line is None:
        raise ValueError(f"wrk printed no statuses:\n{output}")
    return {int(status): int(n) for status, n in re.findall(r"(\d+)=(\d+)", line.group(1))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.joins", description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--secret", default=None,
                    help="token secret (default: the instance's; EVENTPULSE_TOKEN_SECRET). "
                         "Write --secret=VALUE: a secret may start with '-'")
    ap.add_argument("--users", type=int, default=40_000,
                    help="tokens minted, one per request; more than the run sends")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--event-id", default=None,
                    help="join this event instead of a fresh one (e.g. one sold out: every "
                         "answer is then a refusal, the bulk of a flash sale's join answers)")
    args = ap.parse_args(argv)
    try:
        base = require_loopback(args.url)
    except NonLoopbackTarget as e:
        print(e, file=sys.stderr)
        return 2
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    run_id = secrets.token_hex(4)
    tokens = Tokens(args.secret or default_secret())
    event_id = args.event_id or prepare(base, tokens, run_id, args.users)
    with tempfile.NamedTemporaryFile("w", suffix=".tokens") as f:
        for i in range(args.users):
            f.write(tokens.header(f"bench-{run_id}-u{i}")["Authorization"][7:] + "\n")
        f.flush()
        out = subprocess.run(
            [wrk, "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "-s", str(SCRIPT),
             f"{base}/api/events/{event_id}/queue", "--", f.name],
            capture_output=True, text=True, check=True).stdout
    answered, rate, not_2xx = wrk_rate(out)
    statuses = wrk_statuses(out)
    print(out, file=sys.stderr)
    print(orjson.dumps({"event_id": event_id, "joins_per_s": rate, "requests": answered,
                        "not_2xx": not_2xx, "statuses": {str(k): v for k, v in statuses.items()},
                        "users": args.users, "connections": args.connections,
                        "seconds": args.seconds}).decode())
    if answered > args.users:  # wrk went round the tokens: later joins were repeats
        print(f"{answered} requests for {args.users} users: some joined twice, pass more "
              "--users", file=sys.stderr)
        return 1
    # a fresh event: every answer a join; a given one (sold out): joins or refusals (409),
    # so a rate is never made of answers that refused the token or the request
    taken = (409,) if args.event_id else ()
    others = {k: v for k, v in statuses.items() if not (200 <= k < 300 or k in taken)}
    if others:
        print(f"answers that were neither joins nor refusals: {others}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

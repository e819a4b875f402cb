"""Figures for the pure waiting line (`actors/line.py`): joins, position reads, memory,
snapshot round trip and replay. No Ray, no Redis: this is the ceiling the actor works under.

    python -m bench.line_bench            # 1,000,000 entries
    python -m bench.line_bench --n 200000 # quicker
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import time
import tracemalloc

import msgpack

from actors.line import LineConfig, WaitingLine

BATCH = 1_000
T0 = 1_700_000_000.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(n: int, users: list[str]) -> tuple[WaitingLine, float]:
    """A line with n waiting entries (10% in the priority lane); returns it and joins/s."""
    line = WaitingLine(LineConfig(capacity={"general": 1_000}, abandon_after_s=None))
    started = time.perf_counter()
    for lo in range(0, n, BATCH):
        items = [(u, 2, None, 0 if i % 10 == 0 else None)
                 for i, u in enumerate(users[lo:lo + BATCH], lo)]
        line.join_many(items, T0 + lo / 1e4)
    return line, n / (time.perf_counter() - started)


def reads(line: WaitingLine, users: list[str], k: int) -> dict[str, float]:
    rng = random.Random(1)
    sample = [users[rng.randrange(len(users))] for _ in range(k)]
    now = T0 + 1e3
    out = {}
    started = time.perf_counter()
    for u in sample:
        line.position(u)
    out["position_per_s"] = k / (time.perf_counter() - started)
    started = time.perf_counter()
    for u in sample:
        line.view(u, now)
    out["view_per_s"] = k / (time.perf_counter() - started)
    started = time.perf_counter()
    for lo in range(0, k, BATCH):
        line.view_many(sample[lo:lo + BATCH], now)
    out["view_many_per_s"] = k / (time.perf_counter() - started)
    return out


def snapshot_roundtrip(line: WaitingLine) -> dict[str, float]:
    started = time.perf_counter()
    blob = msgpack.packb(line.to_snapshot(), use_bin_type=True)
    dumped = time.perf_counter()
    again = WaitingLine.from_snapshot(msgpack.unpackb(blob, raw=False, strict_map_key=False))
    loaded = time.perf_counter()
    assert again.stats(T0) == line.stats(T0)
    return {"snapshot_s": dumped - started, "restore_s": loaded - dumped, "snapshot_mb": len(blob) / 2**20}


def sale_facts(count: int) -> list[dict]:
    """A busy sale's journal: joins, offers, purchases, releases, expiries, until `count` facts."""
    rng = random.Random(7)
    line = WaitingLine(LineConfig(capacity={"general": 5_000, "vip": 500}, offer_seconds=20,
                                  offers_per_minute=2_000, abandon_after_s=None))
    facts: list[dict] = []
    now, n = T0, 0
    while len(facts) < count:
        now += 0.5
        items = [(f"u{n + i}", rng.randint(1, 4), "vip" if rng.random() < 0.1 else None,
                  0 if rng.random() < 0.05 else None) for i in range(200)]
        n += 200
        facts += line.join_many(items, now)[1]
        facts += line.tick(now)
        sample = list(dict.fromkeys(f"u{rng.randrange(n)}" for _ in range(300)))
        offered = [v.user for v in line.view_many(sample, now) if v is not None and v.status == "offered"]
        for u in offered:
            r = rng.random()
            if r < 0.5:
                facts += line.begin_purchase(u, 1, now)
                facts += (line.complete_purchase(u, now) if rng.random() < 0.9
                          else line.fail_purchase(u, now, declined=True))
            elif r < 0.6:
                facts += line.release(u, now)
    return msgpack.unpackb(msgpack.packb(facts[:count]), raw=False)  # as the journal returns them


def replay(facts: list[dict]) -> dict[str, float]:
    line = WaitingLine(LineConfig(capacity={"general": 5_000, "vip": 500}, offer_seconds=20,
                                  offers_per_minute=2_000, abandon_after_s=None))
    started = time.perf_counter()
    for fact in facts:
        line.apply(fact)
    took = time.perf_counter() - started
    return {"replay_s": took, "replay_facts_per_s": len(facts) / took}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="waiting entries")
    ap.add_argument("--reads", type=int, default=500_000)
    ap.add_argument("--facts", type=int, default=100_000)
    args = ap.parse_args()
    print(f"python {platform.python_version()} · {os.cpu_count()} cores · n={args.n:,}")
    probe = {str(i): i for i in range(1_000)}  # calibration: CPython speed of this machine
    started = time.perf_counter()
    for _ in range(1_000):
        for k in probe:
            probe.get(k)
    print(f"calibration: one dict lookup in a loop = {(time.perf_counter() - started) * 1e3:.0f} ns")

    users = [f"user-{i:09d}" for i in range(args.n)]  # ~ a 16-character id each
    gc.collect()
    base = rss_bytes()
    line, joins = fill(args.n, users)
    gc.collect()
    rss = rss_bytes() - base
    print(f"joins (join_many, batches of {BATCH:,}): {joins:,.0f}/s")
    print(f"memory, {args.n:,} waiting entries: RSS +{rss / 2**20:.0f} MiB "
          f"({rss / args.n:.0f} B/entry; user id strings not counted, they exist before)")
    del line
    gc.collect()

    tracemalloc.start()
    users2 = [f"user-{i:09d}" for i in range(args.n)]
    line, _ = fill(args.n, users2)
    gc.collect()
    traced, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"memory incl. user id strings (tracemalloc): {traced / 2**20:.0f} MiB "
          f"({traced / args.n:.0f} B/entry)")
    del users2

    for name, value in reads(line, users, args.reads).items():
        print(f"{name.replace('_per_s', '')} reads of random users: {value:,.0f}/s")
    for name, value in snapshot_roundtrip(line).items():
        print(f"{name}: {value:.3f}")
    del line
    gc.collect()

    facts = sale_facts(args.facts)
    kinds: dict[str, int] = {}
    for f in facts:
        kinds[f["k"]] = kinds.get(f["k"], 0) + 1
    r = replay(facts)
    print(f"replay of {len(facts):,} facts {kinds}: {r['replay_s']:.3f} s "
          f"({r['replay_facts_per_s']:,.0f} facts/s)")


if __name__ == "__main__":
    main()

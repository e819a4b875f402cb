"""Scrape `GET /api/admin/stats` (if the server has it) for cache hits and replica counts.

The shape is not fixed; `extract` takes what it recognises and ignores the rest:
`cache` as `{hits, misses}` or a mapping of named caches each with hits/misses, and
`replicas` as a number, a list, or a mapping of deployment -> number (or -> list).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _cache_totals(cache: Any) -> tuple[float, float] | None:
    if not isinstance(cache, dict):
        return None
    hits, misses = _num(cache.get("hits")), _num(cache.get("misses"))
    if hits is not None or misses is not None:
        return hits or 0.0, misses or 0.0
    h = m = 0.0
    found = False
    for sub in cache.values():
        t = _cache_totals(sub)
        if t is not None:
            found = True
            h, m = h + t[0], m + t[1]
    return (h, m) if found else None


def _replicas(v: Any) -> float | None:
    n = _num(v)
    if n is not None:
        return n
    if isinstance(v, list):
        return float(len(v))
    if isinstance(v, dict):
        parts = [_replicas(x) for x in v.values()]
        parts = [p for p in parts if p is not None]
        return float(sum(parts)) if parts else None
    return None


def extract(obj: Any) -> dict[str, float | None]:
    """cache hits/misses, replicas, the server's own hit rate and open SSE streams from one
    stats answer (None where absent). The numbers are one replica's (whichever answered)."""
    out: dict[str, Any] = {"cache_hits": None, "cache_misses": None, "replicas": None,
                           "server_hit_rate": None, "sse_open": None, "replica": None}
    if not isinstance(obj, dict):
        return out
    if isinstance(obj.get("replica"), str):
        out["replica"] = obj["replica"]
    out["server_hit_rate"] = _num(obj.get("cache_hit_rate"))
    out["sse_open"] = _num(obj.get("sse_open"))
    c = _cache_totals(obj.get("cache"))
    if c is not None:
        out["cache_hits"], out["cache_misses"] = c
    out["replicas"] = _replicas(obj.get("replicas"))
    return out


def _delta(prev: dict[str, Any] | None, s: dict[str, Any]) -> tuple[float, float] | None:
    """(hits, misses) between two samples of the same counters, None when not comparable."""
    if prev is None or prev.get("cache_hits") is None or s.get("cache_hits") is None:
        return None
    dh = s["cache_hits"] - prev["cache_hits"]
    dm = (s.get("cache_misses") or 0) - (prev.get("cache_misses") or 0)
    return (dh, dm) if dh >= 0 and dm >= 0 else None


def hit_rate_series(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `cache_hit_rate` to each sample: hits / lookups since the previous sample of the
    same replica (each answer carries one replica's counters, whichever answered)."""
    out = []
    prev_of: dict[Any, dict[str, Any]] = {}
    for s in samples:
        row = dict(s)
        d = _delta(prev_of.get(s.get("replica")), s)
        row["cache_hit_rate"] = round(d[0] / (d[0] + d[1]), 4) if d and d[0] + d[1] > 0 else None
        out.append(row)
        prev_of[s.get("replica")] = s
    return out


def overall_hit_rate(samples: list[dict[str, Any]]) -> float | None:
    """Hits / lookups over the run, summed over replicas from each one's first and last
    sample (counters of different replicas are never subtracted from each other)."""
    first: dict[Any, dict[str, Any]] = {}
    last: dict[Any, dict[str, Any]] = {}
    for s in samples:
        first.setdefault(s.get("replica"), s)
        last[s.get("replica")] = s
    hits = misses = 0.0
    for replica, f in first.items():
        d = _delta(f, last[replica])
        if d:
            hits, misses = hits + d[0], misses + d[1]
    return round(hits / (hits + misses), 4) if hits + misses > 0 else None


@dataclass
class ServerStats:
    available: bool | None = None           # None: not asked yet
    samples: list[dict[str, Any]] = field(default_factory=list)
    last_raw: Any = None

    def add(self, t: float, obj: Any) -> None:
        self.available = True
        self.last_raw = obj
        self.samples.append({"t": round(t, 3), **extract(obj)})

    def to_report(self) -> dict[str, Any]:
        return {"available": bool(self.available),
                "cache_hit_rate": overall_hit_rate(self.samples),
                "samples": hit_rate_series(self.samples)}


async def scrape_loop(worker: Any, headers: dict[str, str], start: float,
                      into: ServerStats, stop: Any, interval_s: float = 2.0) -> None:
    """Poll /api/admin/stats until `stop` (an asyncio.Event) is set; give up at the first
    404/405/401/403 (the server does not offer it to us)."""
    import asyncio
    while not stop.is_set():
        r = await worker.call("GET", "/api/admin/stats", "admin_stats", headers=headers,
                              budgeted=False, record=False)
        if r.status in (404, 405, 401, 403):
            into.available = False
            return
        if r.ok:
            into.add(time.time() - start, r.body)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass

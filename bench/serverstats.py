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
    out: dict[str, float | None] = {"cache_hits": None, "cache_misses": None, "replicas": None,
                                    "server_hit_rate": None, "sse_open": None}
    if not isinstance(obj, dict):
        return out
    out["server_hit_rate"] = _num(obj.get("cache_hit_rate"))
    out["sse_open"] = _num(obj.get("sse_open"))
    c = _cache_totals(obj.get("cache"))
    if c is not None:
        out["cache_hits"], out["cache_misses"] = c
    out["replicas"] = _replicas(obj.get("replicas"))
    return out


def hit_rate_series(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `cache_hit_rate` to each sample: hits / lookups since the previous sample."""
    out = []
    prev: dict[str, Any] | None = None
    for s in samples:
        row = dict(s)
        rate = None
        if prev is not None and s.get("cache_hits") is not None \
                and prev.get("cache_hits") is not None:
            dh = s["cache_hits"] - prev["cache_hits"]
            dm = (s.get("cache_misses") or 0) - (prev.get("cache_misses") or 0)
            if dh >= 0 and dm >= 0 and dh + dm > 0:
                rate = round(dh / (dh + dm), 4)
        row["cache_hit_rate"] = rate
        out.append(row)
        prev = s
    return out


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
        samples = hit_rate_series(self.samples)
        overall = None
        if len(self.samples) >= 2:
            first, last = self.samples[0], self.samples[-1]
            if first["cache_hits"] is not None and last["cache_hits"] is not None:
                dh = last["cache_hits"] - first["cache_hits"]
                dm = (last["cache_misses"] or 0) - (first["cache_misses"] or 0)
                if dh + dm > 0:
                    overall = round(dh / (dh + dm), 4)
        return {"available": bool(self.available), "cache_hit_rate": overall,
                "samples": samples}


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

"""Latency and throughput recording for the load generator. Pure: no I/O, no clock of its own.

* `Histogram` — a log-bucket histogram (HDR-like): constant memory, ~1% relative error on
  percentiles, exact count/sum/min/max, mergeable.
* `Stats` — per-route histograms, error counts by status, per-second timeline buckets and
  free-form scenario metrics/counters. Each worker owns one; `merge` combines them.

Times are recorded in seconds (floats) and reported in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Bucket growth factor: a bucket spans [G**i, G**(i+1)) microseconds; its representative
# value (geometric midpoint) is within sqrt(G)-1 ~ 1% of any value inside it.
GROWTH = 1.02
_LOG_G = math.log(GROWTH)
_MIN_US = 1.0


def _bucket(value_s: float) -> int:
    us = value_s * 1e6
    if us < _MIN_US:
        us = _MIN_US
    return int(math.log(us) / _LOG_G)


def _representative_s(index: int) -> float:
    return math.exp((index + 0.5) * _LOG_G) / 1e6


@dataclass(slots=True)
class Histogram:
    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0.0
    min: float = math.inf
    max: float = 0.0

    def record(self, value_s: float) -> None:
        if value_s < 0 or value_s != value_s:  # negative or NaN: clock skew, ignore
            value_s = 0.0
        b = _bucket(value_s)
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.count += 1
        self.total += value_s
        if value_s < self.min:
            self.min = value_s
        if value_s > self.max:
            self.max = value_s

    def merge(self, other: Histogram) -> Histogram:
        for b, n in other.buckets.items():
            self.buckets[b] = self.buckets.get(b, 0) + n
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (q in 0..100), clamped to the exact min/max."""
        if not self.count:
            return 0.0
        if q <= 0:
            return self.min
        if q >= 100:
            return self.max
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                return min(max(_representative_s(b), self.min), self.max)
        return self.max

    def summary_ms(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "mean": round(self.mean * 1e3, 3),
            "p50": round(self.percentile(50) * 1e3, 3),
            "p95": round(self.percentile(95) * 1e3, 3),
            "p99": round(self.percentile(99) * 1e3, 3),
            "max": round(self.max * 1e3, 3),
            "min": round((self.min if self.count else 0.0) * 1e3, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": {str(k): v for k, v in self.buckets.items()}, "count": self.count,
                "total": self.total, "min": self.min if self.count else None, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        h = cls({int(k): int(v) for k, v in d["buckets"].items()}, int(d["count"]),
                float(d["total"]), math.inf if d["min"] is None else float(d["min"]),
                float(d["max"]))
        return h


AS_DESIGNED = " as designed"


def is_error(status: int | str) -> bool:
    """Anything but a 1xx/2xx/3xx HTTP status (including transport failures) is an error,
    except a refusal the scenario expects, recorded as e.g. "409 as designed"."""
    if isinstance(status, str):
        return not status.endswith(AS_DESIGNED)
    return not 100 <= status < 400


@dataclass(slots=True)
class RouteStats:
    latency: Histogram = field(default_factory=Histogram)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    @property
    def count(self) -> int:
        return self.latency.count

    def record(self, latency_s: float, status: int | str) -> None:
        self.latency.record(latency_s)
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if is_error(status):
            self.errors += 1

    def merge(self, other: RouteStats) -> RouteStats:
        self.latency.merge(other.latency)
        for k, n in other.statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + n
        self.errors += other.errors
        return self

    def errors_by_status(self) -> dict[str, int]:
        return {k: n for k, n in sorted(self.statuses.items())
                if is_error(int(k) if k.isdigit() else k)}


@dataclass(slots=True)
class Second:
    """One per-second timeline bucket (all routes together)."""
    requests: int = 0
    errors: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def merge(self, other: Second) -> Second:
        self.requests += other.requests
        self.errors += other.errors
        self.latency.merge(other.latency)
        return self


@dataclass(slots=True)
class Stats:
    routes: dict[str, RouteStats] = field(default_factory=dict)
    timeline: dict[int, Second] = field(default_factory=dict)  # epoch second -> bucket
    metrics: dict[str, Histogram] = field(default_factory=dict)  # scenario latencies
    counters: dict[str, int] = field(default_factory=dict)

    # -- recording ---------------------------------------------------------------------
    def record(self, route: str, latency_s: float, status: int | str, at: float) -> None:
        """One request on `route` that finished at epoch time `at`."""
        rs = self.routes.get(route)
        if rs is None:
            rs = self.routes[route] = RouteStats()
        rs.record(latency_s, status)
        sec = int(at)
        bucket = self.timeline.get(sec)
        if bucket is None:
            bucket = self.timeline[sec] = Second()
        bucket.requests += 1
        bucket.latency.record(latency_s)
        if is_error(status):
            bucket.errors += 1

    def observe(self, metric: str, value_s: float) -> None:
        h = self.metrics.get(metric)
        if h is None:
            h = self.metrics[metric] = Histogram()
        h.record(value_s)

    def count(self, counter: str, n: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + n

    # -- combining ---------------------------------------------------------------------
    def merge(self, other: Stats) -> Stats:
        for name, rs in other.routes.items():
            self.routes.setdefault(name, RouteStats()).merge(rs)
        for sec, b in other.timeline.items():
            self.timeline.setdefault(sec, Second()).merge(b)
        for name, h in other.metrics.items():
            self.metrics.setdefault(name, Histogram()).merge(h)
        for name, n in other.counters.items():
            self.counters[name] = self.counters.get(name, 0) + n
        return self

    @classmethod
    def merged(cls, parts: list[Stats]) -> Stats:
        out = cls()
        for p in parts:
            out.merge(p)
        return out

    # -- reading -----------------------------------------------------------------------
    @property
    def requests(self) -> int:
        return sum(r.count for r in self.routes.values())

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.routes.values())

    def error_rate(self) -> float:
        n = self.requests
        return self.errors / n if n else 0.0

    def all_latency(self) -> Histogram:
        h = Histogram()
        for r in self.routes.values():
            h.merge(r.latency)
        return h

    def window(self, first_sec: int, last_sec: int) -> Second:
        """Timeline buckets first_sec..last_sec (inclusive) merged into one."""
        out = Second()
        for sec in range(first_sec, last_sec + 1):
            b = self.timeline.get(sec)
            if b is not None:
                out.merge(b)
        return out

    def timeline_rows(self, start: float) -> list[dict[str, float | int]]:
        """Per-second rows from the run start (t = seconds since start), gaps filled."""
        if not self.timeline:
            return []
        first, last = int(start), max(self.timeline)
        rows = []
        for sec in range(min(first, min(self.timeline)), last + 1):
            b = self.timeline.get(sec, Second())
            rows.append({"t": sec - first, "requests": b.requests, "errors": b.errors,
                         "p95_ms": round(b.latency.percentile(95) * 1e3, 3),
                         "mean_ms": round(b.latency.mean * 1e3, 3)})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Lossless form (for shipping between processes)."""
        return {
            "routes": {n: {"latency": r.latency.to_dict(), "statuses": r.statuses,
                           "errors": r.errors} for n, r in self.routes.items()},
            "timeline": {str(s): {"requests": b.requests, "errors": b.errors,
                                  "latency": b.latency.to_dict()}
                         for s, b in self.timeline.items()},
            "metrics": {n: h.to_dict() for n, h in self.metrics.items()},
            "counters": dict(self.counters),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        s = cls()
        for n, r in d["routes"].items():
            s.routes[n] = RouteStats(Histogram.from_dict(r["latency"]), dict(r["statuses"]),
                                     int(r["errors"]))
        for sec, b in d["timeline"].items():
            s.timeline[int(sec)] = Second(int(b["requests"]), int(b["errors"]),
                                          Histogram.from_dict(b["latency"]))
        for n, h in d["metrics"].items():
            s.metrics[n] = Histogram.from_dict(h)
        s.counters = {k: int(v) for k, v in d["counters"].items()}
        return s

    def route_summary(self, elapsed_s: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(self.routes):
            r = self.routes[name]
            out[name] = {
                "count": r.count,
                "ok": r.count - r.errors,
                "errors": r.errors,
                "error_rate": round(r.errors / r.count, 6) if r.count else 0.0,
                "errors_by_status": r.errors_by_status(),
                "statuses": dict(sorted(r.statuses.items())),
                "rps": round(r.count / elapsed_s, 3) if elapsed_s > 0 else 0.0,
                "latency_ms": r.latency.summary_ms(),
            }
        return out


class Sink:
    """What a worker records into: its running total plus any open windows.

    Windows let a controller (the ramp) read one step's numbers without resetting the
    total: `open_window(name)` starts one, `take_window(name)` returns it and starts afresh.
    """

    __slots__ = ("total", "_windows")

    def __init__(self) -> None:
        self.total = Stats()
        self._windows: dict[str, Stats] = {}

    def open_window(self, name: str) -> None:
        self._windows[name] = Stats()

    def take_window(self, name: str) -> Stats:
        w = self._windows.get(name, Stats())
        self._windows[name] = Stats()
        return w

    def record(self, route: str, latency_s: float, status: int | str, at: float) -> None:
        self.total.record(route, latency_s, status, at)
        for w in self._windows.values():
            w.record(route, latency_s, status, at)

    def observe(self, metric: str, value_s: float) -> None:
        self.total.observe(metric, value_s)
        for w in self._windows.values():
            w.observe(metric, value_s)

    def count(self, counter: str, n: int = 1) -> None:
        self.total.count(counter, n)
        for w in self._windows.values():
            w.count(counter, n)

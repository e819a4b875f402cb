"""The application's metrics, exported through Ray's Prometheus endpoint.

Created lazily, on first use inside a Ray process, so pure modules and the CLI can
import this without Ray running. Ray prefixes every name with `ray_` on export.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import ray
from ray.util import metrics as m

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
FLUSH_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1]
BATCH_BUCKETS = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]

_SPECS: dict[str, tuple[type, str, tuple[str, ...], list[float] | None]] = {
    # HTTP
    "http_requests": (m.Counter, "eventpulse_http_requests_total", ("route", "method", "status"), None),
    "sse_connections": (m.Gauge, "eventpulse_sse_connections", (), None),
    "overload": (m.Counter, "eventpulse_overload_rejections_total", ("route",), None),
    "cache": (m.Counter, "eventpulse_cache_requests_total", ("layer", "kind", "result"), None),
    "pool": (m.Gauge, "eventpulse_redis_pool_connections", ("state",), None),
    "redis_errors": (m.Counter, "eventpulse_redis_errors_total", (), None),
    # the line
    "line_waiting": (m.Gauge, "eventpulse_line_waiting", ("event_id",), None),
    "line_live_offers": (m.Gauge, "eventpulse_line_live_offers", ("event_id",), None),
    "line_remaining": (m.Gauge, "eventpulse_line_remaining", ("event_id",), None),
    "line_eta": (m.Gauge, "eventpulse_line_eta_seconds", ("event_id",), None),
    "line_opm": (m.Gauge, "eventpulse_line_offers_per_minute", ("event_id",), None),
    "line_joins": (m.Counter, "eventpulse_line_joins_total", ("event_id",), None),
    "line_offers": (m.Counter, "eventpulse_line_offers_total", ("event_id",), None),
    "line_expired": (m.Counter, "eventpulse_line_expired_total", ("event_id",), None),
    "line_abandoned": (m.Counter, "eventpulse_line_abandoned_total", ("event_id",), None),
    "journal_flush": (m.Histogram, "eventpulse_journal_flush_duration_seconds", ("event_id",), FLUSH_BUCKETS),
    "snapshot_bytes": (m.Gauge, "eventpulse_snapshot_bytes", ("event_id",), None),
    "snapshot_duration": (m.Histogram, "eventpulse_snapshot_duration_seconds", ("event_id",), LATENCY_BUCKETS),
    "actor_restarts": (m.Counter, "eventpulse_actor_restarts_total", ("event_id",), None),
    # purchases
    "purchase_lag": (m.Gauge, "eventpulse_purchase_stream_lag", ("partition",), None),
    "purchase_batch": (m.Histogram, "eventpulse_purchase_batch_size", (), BATCH_BUCKETS),
    "purchases": (m.Counter, "eventpulse_purchases_total", ("outcome",), None),
    "dead_letters": (m.Counter, "eventpulse_purchase_dead_letters_total", ("partition",), None),
    "commit_latency": (m.Histogram, "eventpulse_purchase_commit_duration_seconds", (), LATENCY_BUCKETS),
    "purchase_stage": (m.Histogram, "eventpulse_purchase_stage_duration_seconds", ("stage",),
                       LATENCY_BUCKETS),
}


class _Noop:
    def inc(self, *a: Any, **k: Any) -> None: ...
    def set(self, *a: Any, **k: Any) -> None: ...
    def observe(self, *a: Any, **k: Any) -> None: ...


@cache
def _make(key: str) -> Any:
    cls, name, tags, buckets = _SPECS[key]
    kwargs: dict[str, Any] = {"description": name.replace("_", " "), "tag_keys": tags}
    if buckets is not None:
        kwargs["boundaries"] = buckets
    return cls(name, **kwargs)


def get(key: str) -> Any:
    """The metric registered under `key`, or a no-op outside Ray."""
    if not ray.is_initialized():
        return _Noop()
    return _make(key)


class Aggregator:
    """Per-request metrics summed in process and handed to Ray every `FLUSH_S`.

    One Ray metric call costs ~10–20 µs here; at thousands of requests per second that is
    a real share of a request's CPU. Counters are flushed as increments. Latency
    histograms are kept as cumulative bucket counts and exported as gauges named like a
    Prometheus histogram (`_bucket{le=…}`, `_sum`, `_count`), so `histogram_quantile`
    over `rate(...)` works exactly as for a native histogram.
    """

    FLUSH_S = 2.0

    def __init__(self) -> None:
        self._counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hists: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
        self._gauges: dict[str, Any] = {}
        self._task = None
        self._hooks: list[Any] = []

    def on_flush(self, hook: Any) -> None:
        """Run `hook()` at every flush (gauges sampled from process state)."""
        self._hooks.append(hook)

    def count(self, key: str, tags: tuple[tuple[str, str], ...], n: float = 1) -> None:
        k = (key, tags)
        self._counts[k] = self._counts.get(k, 0) + n
        self._ensure_flusher()

    def observe(self, name: str, tags: tuple[tuple[str, str], ...], value: float,
                buckets: list[float] = LATENCY_BUCKETS) -> None:
        k = (name, tags)
        h = self._hists.get(k)
        if h is None:
            h = self._hists[k] = [0.0] * (len(buckets) + 3)  # buckets…, +Inf, sum, count
        for i, bound in enumerate(buckets):
            if value <= bound:
                h[i] += 1
                break
        else:
            h[len(buckets)] += 1
        h[-2] += value
        h[-1] += 1
        self._ensure_flusher()

    def _ensure_flusher(self) -> None:
        if self._task is None:
            import asyncio

            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self.FLUSH_S)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 — metrics must never break requests
                pass

    def flush(self) -> None:
        if not ray.is_initialized():
            return
        for hook in self._hooks:
            hook()
        counts, self._counts = self._counts, {}
        for (key, tags), n in counts.items():
            if n:
                get(key).inc(n, tags=dict(tags))
        for (name, tags), h in self._hists.items():
            tag_keys = tuple(k for k, _ in tags)
            bucket_g = self._gauge(name + "_bucket", tag_keys + ("le",))
            cumulative = 0.0
            for bound, n in zip(LATENCY_BUCKETS + [float("inf")], h[:-2]):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                bucket_g.set(cumulative, tags={**dict(tags), "le": le})
            self._gauge(name + "_sum", tag_keys).set(h[-2], tags=dict(tags))
            self._gauge(name + "_count", tag_keys).set(h[-1], tags=dict(tags))

    def _gauge(self, name: str, tag_keys: tuple[str, ...]) -> Any:
        g = self._gauges.get(name)
        if g is None:
            g = self._gauges[name] = m.Gauge(name, description=name.replace("_", " "),
                                             tag_keys=tag_keys)
        return g


aggregate = Aggregator()

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
    "http_latency": (m.Histogram, "eventpulse_http_request_duration_seconds", ("route", "method"), LATENCY_BUCKETS),
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

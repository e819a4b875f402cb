"""bench.stats: histogram percentiles, merging, windows, timeline."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bench.stats import Histogram, Sink, Stats, is_error


def exact_percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    import math
    return s[max(1, math.ceil(q / 100 * len(s))) - 1]


@pytest.mark.parametrize("q", [50, 90, 95, 99, 99.9])
def test_percentiles_within_two_percent(q: float) -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-4, 1.2) for _ in range(20_000)]  # ~18 ms median
    h = Histogram()
    for v in values:
        h.record(v)
    assert h.count == len(values)
    assert h.percentile(q) == pytest.approx(exact_percentile(values, q), rel=0.02)
    assert h.mean == pytest.approx(sum(values) / len(values))
    assert h.max == max(values) and h.min == min(values)
    assert h.percentile(100) == max(values) and h.percentile(0) == min(values)


def test_small_and_degenerate_inputs() -> None:
    h = Histogram()
    assert h.percentile(95) == 0.0 and h.mean == 0.0
    h.record(0.25)
    assert h.percentile(50) == 0.25 and h.percentile(99) == 0.25  # clamped to min/max
    h.record(0.0)
    h.record(-1.0)  # clock skew: treated as 0
    assert h.min == 0.0 and h.count == 3
    h3 = Histogram()
    for v in range(1, 101):
        h3.record(v / 1000)
    assert h3.percentile(50) == pytest.approx(0.050, rel=0.02)
    assert h3.percentile(95) == pytest.approx(0.095, rel=0.02)


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(1)
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(5000):
        v = rng.expovariate(50)
        (a if i % 3 else b).record(v)
        both.record(v)
    merged = Histogram().merge(a).merge(b)
    assert merged.buckets == both.buckets
    assert merged.count == both.count
    assert merged.total == pytest.approx(both.total)
    assert (merged.min, merged.max) == (both.min, both.max)
    for q in (50, 95, 99):
        assert merged.percentile(q) == both.percentile(q)


def test_stats_routes_errors_and_merge() -> None:
    w1, w2 = Stats(), Stats()
    t = 1_700_000_000.0
    w1.record("availability", 0.010, 200, t)
    w1.record("availability", 0.020, 503, t + 0.5)
    w2.record("availability", 0.030, 200, t + 1.2)
    w2.record("user_tickets", 0.100, "timeout", t + 1.3)
    w2.observe("push_delay", 0.05)
    w2.count("joined", 2)
    s = Stats.merged([w1, w2])
    assert s.requests == 4 and s.errors == 2
    assert s.error_rate() == 0.5
    av = s.routes["availability"]
    assert av.count == 3 and av.errors == 1
    assert av.errors_by_status() == {"503": 1}
    assert s.routes["user_tickets"].errors_by_status() == {"timeout": 1}
    assert s.counters == {"joined": 2}
    assert s.metrics["push_delay"].count == 1
    assert s.timeline[int(t)].requests == 2 and s.timeline[int(t)].errors == 1
    assert s.timeline[int(t) + 1].requests == 2
    rows = s.timeline_rows(t)
    assert [r["t"] for r in rows] == [0, 1]
    assert rows[0]["requests"] == 2 and rows[1]["errors"] == 1
    summary = s.route_summary(elapsed_s=2.0)
    assert summary["availability"]["rps"] == 1.5
    assert summary["availability"]["latency_ms"]["max"] == pytest.approx(30.0)
    # lossless round trip (for shipping between processes)
    again = Stats.from_dict(s.to_dict())
    assert again.to_dict() == s.to_dict()


def test_is_error() -> None:
    assert not is_error(200) and not is_error(201) and not is_error(304)
    assert is_error(404) and is_error(500) and is_error("conn") and is_error("timeout")


def test_sink_windows_are_separate_from_total() -> None:
    s = Sink()
    s.record("healthz", 0.001, 200, 10.0)
    s.open_window("step")
    s.record("healthz", 0.002, 200, 11.0)
    s.record("healthz", 0.003, 500, 11.0)
    w = s.take_window("step")
    assert w.requests == 2 and w.errors == 1
    assert s.take_window("step").requests == 0
    assert s.total.requests == 3


def test_timeline_window() -> None:
    s = Stats()
    for sec in range(10):
        for _ in range(sec):
            s.record("x", 0.001 * (sec + 1), 200, 100.0 + sec)
    win = s.window(107, 109)
    assert win.requests == 7 + 8 + 9
    assert win.latency.max == pytest.approx(0.010)


def test_sse_events_are_split_into_their_data():
    from bench.http import _sse_data

    assert _sse_data(b"id: 3\nevent: entry\ndata: {\"a\":1}") == b'{"a":1}'
    assert _sse_data(b": heartbeat") == b""
    assert _sse_data(b"retry: 2000") == b""
    assert _sse_data(b"data: [1,\ndata:2]") == b"[1,\n2]"


def _read(response: bytes, cut: int) -> tuple[Any, list[Any], bool]:
    """Feed `response` to an SseFollower in pieces of `cut` bytes; (status, events, ended)."""
    import asyncio

    from bench.http import SseFollower

    async def go() -> tuple[Any, list[Any], bool]:
        events: list[Any] = []
        f = SseFollower(b"GET / HTTP/1.1\r\n\r\n", events.append)
        for i in range(0, len(response), cut):
            f.data_received(response[i:i + cut])
        f.connection_lost(None)
        return f.status, events, f.complete

    return asyncio.run(go())


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64, 10_000])
def test_the_callback_reader_parses_chunked_sse_however_it_is_cut(cut: int) -> None:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    # Events across chunk borders, a chunk holding two events, CRLF line ends, a comment.
    body = _chunked(b'data: {"position": 3}\n', b"\n", b": heartbeat\n\n",
                    b'data: {"position": 2}\n\ndata: {"posi', b'tion": 1}\r\n\r\n')
    status, events, ended = _read(head + body, cut)
    assert status == 200 and ended
    assert events == [{"position": 3}, {"position": 2}, {"position": 1}]


def test_the_callback_reader_takes_a_close_delimited_body_and_a_refusal() -> None:
    status, events, ended = _read(b"HTTP/1.1 200 OK\r\n\r\ndata: [1]\n\ndata: [2]\n\n", 5)
    assert (status, events, ended) == (200, [[1], [2]], True)
    refusal = (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n") + _chunked(b'{"error": {}}')
    status, events, _ = _read(refusal, 9)
    assert status == 401 and events == []
    # Cut off inside a chunk: not complete (the caller records the stream as broken).
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, events, ended = _read(head + b"20\r\ndata: [1]\n\n", 4)
    assert status == 200 and not ended


def test_a_refusal_the_scenario_expects_is_not_an_error() -> None:
    s = Stats()
    s.record("join", 0.01, 200, 100.0)
    s.record("join", 0.01, "409 as designed", 100.0)
    s.record("join", 0.01, 409, 100.0)
    r = s.route_summary(1.0)["join"]
    assert r["errors"] == 1 and r["errors_by_status"] == {"409": 1}
    assert r["statuses"] == {"200": 1, "409": 1, "409 as designed": 1}
    assert s.errors == 1


def test_the_callback_reader_outlives_a_reader_that_gave_up() -> None:
    """The opener was cancelled while waiting for the head (a sold-out flash sale stops
    its waiters): the late head and events must not raise inside the event loop."""
    import asyncio

    from bench.http import SseFollower

    async def go() -> list:
        events: list = []
        f = SseFollower(b"GET / HTTP/1.1\r\n\r\n", events.append)
        f.head.cancel()
        f.data_received(b"HTTP/1.1 200 OK\r\n\r\ndata: [1]\n\n")
        f.connection_lost(None)
        return events

    assert asyncio.run(go()) == [[1]]

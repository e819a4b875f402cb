"""bench.kpi: the ramp's stop rule and KPI checks."""

from __future__ import annotations

import pytest

from bench.kpi import (Kpis, StepSummary, breaches, next_users, parse_range, ramp_verdict,
                       summarize_step)
from bench.stats import Stats

K = Kpis()


def step(users: int, *, p95: float = 0.2, errors: int = 0, requests: int = 1000,
         pos: float | None = 0.02, tix: float | None = 0.05) -> StepSummary:
    return StepSummary(users=users, seconds=30, requests=requests, errors=errors, p95_s=p95,
                       position_mean_s=pos, tickets_mean_s=tix)


def test_healthy_step_has_no_breaches() -> None:
    assert breaches(step(100), K) == []


@pytest.mark.parametrize("s, needle", [
    (step(100, p95=1.0), "p95"),
    (step(100, errors=5), "errors"),              # exactly 0.5 %
    (step(100, pos=0.1), "queue-position"),
    (step(100, tix=0.3), "user-tickets"),
    (step(100, requests=0), "requests completed"),
])
def test_each_kpi_breaks_at_its_threshold(s: StepSummary, needle: str) -> None:
    b = breaches(s, K)
    assert len(b) == 1 and needle in b[0]


def test_just_under_thresholds_holds() -> None:
    assert breaches(step(100, p95=0.999, errors=4, pos=0.0999, tix=0.2999), K) == []


def test_missing_route_means_are_not_judged() -> None:
    assert breaches(step(100, pos=None, tix=None), K) == []


def test_verdict_goes_on_while_steps_hold() -> None:
    v = ramp_verdict([step(50), step(100)], K, max_users=500)
    assert not v.stop and v.held_users == 100


def test_verdict_stops_at_first_broken_step_and_reports_previous() -> None:
    v = ramp_verdict([step(50), step(100), step(150, p95=1.5)], K, max_users=500)
    assert v.stop and v.held_users == 100 and "150 users broke" in v.reason


def test_verdict_when_first_step_breaks() -> None:
    v = ramp_verdict([step(50, errors=100)], K, max_users=500)
    assert v.stop and v.held_users == 0


def test_verdict_stops_at_max_users() -> None:
    v = ramp_verdict([step(50), step(100)], K, max_users=100)
    assert v.stop and v.held_users == 100 and "max-users" in v.reason


def test_custom_kpis() -> None:
    strict = Kpis(p95_s=0.1)
    assert breaches(step(10, p95=0.2), strict)
    assert ramp_verdict([step(10, p95=0.2)], strict, 100).stop


def test_next_users_and_range() -> None:
    assert next_users(50, 50, 2000) == 100
    assert next_users(1990, 50, 2000) == 2000
    assert next_users(10, 0, 2000) == 11
    assert parse_range("1-3") == (1.0, 3.0)
    assert parse_range("0.5") == (0.5, 0.5)
    with pytest.raises(ValueError):
        parse_range("3-1")


def test_summarize_step_reads_route_means() -> None:
    s = Stats()
    s.record("queue_position", 0.05, 200, 1.0)
    s.record("queue_position", 0.15, 200, 1.0)
    s.record("user_tickets", 0.2, 500, 1.0)
    s.record("healthz", 0.001, 200, 1.0)
    st = summarize_step(s, users=7, seconds=2.0)
    assert st.users == 7 and st.requests == 4 and st.errors == 1
    assert st.position_mean_s == pytest.approx(0.1)
    assert st.tickets_mean_s == pytest.approx(0.2)
    assert st.rps == 2.0
    d = st.to_dict()
    assert d["position_mean_ms"] == pytest.approx(100.0) and d["error_rate"] == 0.25

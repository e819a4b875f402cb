"""KPI thresholds and the ramp's stop rule. Pure functions over step summaries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bench.stats import Stats

# Route names whose means have their own KPI.
POSITION_ROUTE = "queue_position"
TICKETS_ROUTE = "user_tickets"


@dataclass(frozen=True, slots=True)
class Kpis:
    p95_s: float = 1.0            # overall p95 must stay below this
    error_rate: float = 0.005     # errors / requests must stay below this
    position_mean_s: float = 0.100
    tickets_mean_s: float = 0.300
    min_requests: int = 1         # a step with fewer completed requests counts as broken


@dataclass(frozen=True, slots=True)
class StepSummary:
    users: int
    seconds: float
    requests: int
    errors: int
    p95_s: float
    position_mean_s: float | None = None
    tickets_mean_s: float | None = None
    breaches: tuple[str, ...] = field(default=())

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["breaches"] = list(self.breaches)
        d.update(error_rate=round(self.error_rate, 6), rps=round(self.rps, 2))
        for k in ("p95_s", "position_mean_s", "tickets_mean_s"):
            v = d.pop(k)
            d[k.replace("_s", "_ms")] = None if v is None else round(v * 1e3, 3)
        return d


def summarize_step(window: Stats, users: int, seconds: float) -> StepSummary:
    pos = window.routes.get(POSITION_ROUTE)
    tix = window.routes.get(TICKETS_ROUTE)
    return StepSummary(
        users=users, seconds=seconds, requests=window.requests, errors=window.errors,
        p95_s=window.all_latency().percentile(95),
        position_mean_s=pos.latency.mean if pos and pos.count else None,
        tickets_mean_s=tix.latency.mean if tix and tix.count else None,
    )


def breaches(step: StepSummary, kpis: Kpis) -> list[str]:
    """Which KPIs this step broke (empty: it held)."""
    out = []
    if step.requests < kpis.min_requests:
        out.append(f"only {step.requests} requests completed")
        return out
    if step.p95_s >= kpis.p95_s:
        out.append(f"p95 {step.p95_s * 1e3:.0f} ms >= {kpis.p95_s * 1e3:.0f} ms")
    if step.error_rate >= kpis.error_rate:
        out.append(f"errors {step.error_rate:.2%} >= {kpis.error_rate:.2%}")
    if step.position_mean_s is not None and step.position_mean_s >= kpis.position_mean_s:
        out.append(f"queue-position mean {step.position_mean_s * 1e3:.0f} ms >= "
                   f"{kpis.position_mean_s * 1e3:.0f} ms")
    if step.tickets_mean_s is not None and step.tickets_mean_s >= kpis.tickets_mean_s:
        out.append(f"user-tickets mean {step.tickets_mean_s * 1e3:.0f} ms >= "
                   f"{kpis.tickets_mean_s * 1e3:.0f} ms")
    return out


@dataclass(frozen=True, slots=True)
class Verdict:
    stop: bool
    held_users: int          # largest user count whose step held (0: none held)
    reason: str


def ramp_verdict(steps: list[StepSummary], kpis: Kpis, max_users: int) -> Verdict:
    """Decide after the latest step whether the ramp goes on.

    Stops at the first step that breaks a KPI (the answer is the previous step's user
    count) or once a step at `max_users` has held.
    """
    held = 0
    for step in steps:
        broken = breaches(step, kpis)
        if broken:
            return Verdict(True, held, f"{step.users} users broke: " + "; ".join(broken))
        held = max(held, step.users)
    if steps and steps[-1].users >= max_users:
        return Verdict(True, held, f"reached --max-users {max_users} with KPIs held")
    return Verdict(False, held, "KPIs held so far")


def next_users(current: int, step: int, max_users: int) -> int:
    return min(current + max(step, 1), max_users)


def parse_range(text: str) -> tuple[float, float]:
    """'1-3' -> (1.0, 3.0); '2' -> (2.0, 2.0)."""
    text = text.strip()
    if "-" in text[1:]:
        i = text.index("-", 1)
        lo, hi = float(text[:i]), float(text[i + 1:])
    else:
        lo = hi = float(text)
    if lo < 0 or hi < lo:
        raise ValueError(f"bad range {text!r}: want LOW-HIGH with 0 <= LOW <= HIGH")
    return lo, hi

"""Run one scenario: set up workers and bounds, show progress, scrape server stats, report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.http import Budget, Tokens, Worker, default_secret, raise_nofile_limit
from bench.kpi import Kpis
from bench.progress import progress_loop
from bench.report import build_report, write_report
from bench.safety import require_loopback
from bench.serverstats import ServerStats, scrape_loop
from bench.stats import Stats

SCENARIOS = ("seed-mix", "flash-sale", "waiting-crowd", "ramp")


class SetupError(RuntimeError):
    """The scenario could not prepare (e.g. creating its event failed)."""


@dataclass
class RunConfig:
    scenario: str
    base_url: str = "http://127.0.0.1:8000"
    secret: str | None = None
    users: int = 50                       # seed-mix VUs / flash-sale N / waiting-crowd M
    duration_s: float = 60.0
    max_requests: int | None = None
    think: tuple[float, float] = (1.0, 3.0)
    event_id: str | None = None           # reuse an event instead of creating one
    tickets: int = 100                    # flash-sale capacity C
    quantity: int = 1                     # tickets per user
    concurrency: int = 50                 # concurrent joins
    max_live_offers: int | None = None
    offers_per_minute: int | None = None
    purchase_wait_s: float = 5.0
    poll_s: float = 1.0                   # polling period when SSE is unavailable
    changes: int = 5                      # waiting-crowd rounds
    move: str = "leave"                   # waiting-crowd: 'leave' or 'offers'
    push_timeout_s: float = 10.0
    ramp_start: int = 50
    ramp_step: int = 50
    step_seconds: float = 30.0
    max_users: int = 2000
    kpis: Kpis = field(default_factory=Kpis)
    workers: int = 1
    connections: int | None = None        # per-run total; split over workers
    request_timeout_s: float = 10.0
    out: Path | None = None
    progress: bool = True
    scrape_interval_s: float = 2.0
    seed: int | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))

    def to_report(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("secret")
        d["out"] = str(self.out) if self.out else None
        d["think"] = list(self.think)
        return d


class Ctx:
    """What a scenario sees: config, bounds, workers, tokens, live gauges, result dict."""

    def __init__(self, cfg: RunConfig, budget: Budget, workers: list[Worker], control: Worker,
                 tokens: Tokens, started: float) -> None:
        self.cfg = cfg
        self.control = control  # setup, admin calls and checks; never starved by VUs
        self.budget = budget
        self.workers = workers
        self.tokens = tokens
        self.started = started
        self.gauges: dict[str, Any] = {"users": 0}
        self.result: dict[str, Any] = {}
        self.organizer_id = f"bench-{cfg.run_id}-org"

    def worker_for(self, i: int) -> Worker:
        return self.workers[i % len(self.workers)]

    def user_id(self, i: int) -> str:
        return f"bench-{self.cfg.run_id}-u{i}"

    def user_headers(self, uid: str) -> dict[str, str]:
        return self.tokens.header(uid, ("user",))

    def organizer_headers(self) -> dict[str, str]:
        return self.tokens.header(self.organizer_id, ("organizer",))

    def merged(self) -> Stats:
        return Stats.merged([w.sink.total for w in self.workers])

    def position_path(self, event_id: str, uid: str) -> str:
        return f"/api/queue/position?eventId={quote(event_id)}&userId={quote(uid)}"

    async def until_stop(self, coro: Awaitable[Any]) -> Any:
        """Run `coro` but cancel it when the run stops (time/request budget or a stop)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.budget.stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()


ScenarioFn = Callable[[Ctx], Awaitable[dict[str, Any]]]


def scenario_fn(name: str) -> ScenarioFn:
    from bench.scenarios import flash_sale, ramp, seed_mix, waiting_crowd
    table: dict[str, ScenarioFn] = {
        "seed-mix": seed_mix.run, "flash-sale": flash_sale.run,
        "waiting-crowd": waiting_crowd.run, "ramp": ramp.run,
    }
    if name not in table:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return table[name]


def _connections(cfg: RunConfig) -> int:
    if cfg.connections:
        return cfg.connections
    if cfg.scenario in ("flash-sale", "waiting-crowd"):
        return cfg.users + cfg.concurrency + 20   # one socket per open stream
    if cfg.scenario == "ramp":
        return max(100, cfg.max_users)
    return max(100, cfg.users)


async def run_async(cfg: RunConfig) -> dict[str, Any]:
    base = require_loopback(cfg.base_url)
    fn = scenario_fn(cfg.scenario)
    secret = cfg.secret or default_secret()
    raise_nofile_limit()
    started_mono = time.monotonic()
    started = time.time()
    budget = Budget(deadline=started_mono + cfg.duration_s, max_requests=cfg.max_requests)
    per_worker = max(1, math.ceil(_connections(cfg) / max(1, cfg.workers)))
    done = asyncio.Event()
    server = ServerStats()
    async with contextlib.AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(
            Worker(base, budget, connections=per_worker, timeout_s=cfg.request_timeout_s))
            for _ in range(max(1, cfg.workers))]
        # the control worker (setup, scraping, checks) is separate so VUs never starve it
        control = await stack.enter_async_context(
            Worker(base, budget, connections=32, timeout_s=cfg.request_timeout_s))
        ctx = Ctx(cfg, budget, workers, control, Tokens(secret), started)

        async def watchdog() -> None:
            await budget.sleep(budget.remaining_s() + 0.01)
            budget.stop.set()

        def all_stats() -> Stats:
            return Stats.merged([w.sink.total for w in [*workers, control]])

        bg = [asyncio.create_task(watchdog()),
              asyncio.create_task(progress_loop(f"event-pulse bench: {cfg.scenario}",
                                                all_stats, ctx.gauges, done, started,
                                                enabled=cfg.progress)),
              asyncio.create_task(scrape_loop(control, ctx.organizer_headers(), started,
                                              server, done, cfg.scrape_interval_s))]
        try:
            result = await fn(ctx)
        finally:
            budget.stop.set()
            done.set()
            for t in bg:
                if not t.done():
                    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                        await asyncio.wait_for(t, 15)
        elapsed = time.monotonic() - started_mono
        stats = all_stats()
    report = build_report(scenario=cfg.scenario, base_url=base, config=cfg.to_report(),
                          stats=stats, started_at=started, elapsed_s=elapsed,
                          server=server.to_report(), result=result)
    if cfg.out is not None:
        json_path, png_path = write_report(report, Path(cfg.out))
        report["files"] = {"json": str(json_path), "png": str(png_path)}
    return report


def run(cfg: RunConfig) -> dict[str, Any]:
    """Synchronous entry: runs the scenario on a fresh (uvloop) event loop."""
    try:
        import uvloop
        return uvloop.run(run_async(cfg))
    except ImportError:
        return asyncio.run(run_async(cfg))

"""The `eventpulse` command: up, down, status, token, dashboards."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from eventpulse.auth import NoSecret, mint_token, token_secret
from eventpulse.settings import Settings

app = typer.Typer(help="Event-Pulse: a fair, exact and fast ticket-sale waiting room on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        s = Settings()
    except Exception as e:  # pydantic's message names the bad variable
        console.print(f"[red]configuration error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    s.data_dir = s.data_dir.resolve()
    return s


@app.callback()
def _options(data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="the instance's data directory (default: EVENTPULSE_DATA_DIR, "
        "else ./.eventpulse if it holds an instance, else the user's state directory)",
        file_okay=False)] = None) -> None:
    if data_dir is not None:  # every Settings() of this process and of what it starts
        os.environ["EVENTPULSE_DATA_DIR"] = str(data_dir.resolve())


@contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    with console.status(f"{name}…"):
        yield
    console.print(f"[green]✓[/] {name} [dim]({time.monotonic() - started:.1f} s)[/]")


def _no_instance(s: Settings, what: str) -> typer.Exit:
    console.print(f"[red]{what}:[/] no Event-Pulse instance in {s.data_dir} — start one with "
                  "`eventpulse up`, or name its data directory with --data-dir or "
                  "EVENTPULSE_DATA_DIR")
    return typer.Exit(1)


@app.command()
def token(user: str, role: Annotated[Optional[str], typer.Option(
        help="organizer or admin")] = None) -> None:
    """Print a bearer token for USER (alone on standard output)."""
    if role not in (None, "organizer", "admin"):
        console.print("[red]--role must be organizer or admin[/]")
        raise typer.Exit(2)
    s = _settings()
    try:
        secret = token_secret(s)
    except NoSecret:
        raise _no_instance(s, "no token secret") from None
    print(mint_token(user, [role] if role else [], secret=secret, ttl_s=s.token_ttl_s))


@app.command()
def up(demo: Annotated[bool, typer.Option(help="seed a demo event and print tokens")] = False,
       monitoring: Annotated[bool, typer.Option(help="also start a local Prometheus")] = False,
       timeout: Annotated[float, typer.Option(help="seconds to wait for readiness")] = 240,
       ingress: Annotated[Literal["haproxy", "serve"], typer.Option(
           help="haproxy: Serve's HAProxy ingress with the edge and the side server; serve: Serve's "
                "default Python proxy, every request on Serve's path (slower; to compare, or "
                "where HAProxy can't run)")] = "haproxy",
       ) -> None:
    """Start Redis (unless configured), Ray, the Serve app and the purchase job.

    If any step fails (or is interrupted), everything started before it is stopped again
    before `up` exits non-zero with the reason."""
    from cluster import launcher as L
    from cluster.demo import DemoError

    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    prior = L.State.load(s.data_dir)
    if prior is not None and prior.api_url and L.port_in_use(s.port):
        console.print(f"[yellow]already running[/] at {prior.api_url} (`eventpulse down` stops it)")
        raise typer.Exit(0)
    if prior is not None:  # an instance that died or never finished starting
        with step("stopped what an earlier `up` left behind"):
            L.teardown(prior)
    if L.port_in_use(s.port):
        console.print(f"[red]port {s.port} is already in use[/]: set EVENTPULSE_PORT or free it")
        raise typer.Exit(1)
    state = L.State(data_dir=str(s.data_dir), ingress=ingress)
    try:
        _start(s, state, L, monitoring=monitoring, timeout=timeout, demo=demo)
    except (L.LaunchError, DemoError) as e:
        reason = str(e)
    except KeyboardInterrupt:
        reason = "interrupted"
    except Exception as e:  # noqa: BLE001 — one clear line; details are in the logs
        reason = f"{type(e).__name__}: {e}"
    else:
        reason = None
    if reason is not None:
        console.print(f"[red]cannot start:[/] {escape(reason)}")
        with step("stopped what was started"):
            L.teardown(state)
        raise typer.Exit(1)
    table = Table(title="Event-Pulse is up", show_header=False)
    for k, v in state.urls.items():
        table.add_row(k, v)
    console.print(table)
    console.print(f"data directory: {s.data_dir}")
    console.print("stop everything with [bold]eventpulse down[/]")


def _start(s: Settings, state, L, *, monitoring: bool, timeout: float, demo: bool) -> None:
    """`up`'s steps, each recorded in `state` (saved) before it starts."""
    with step("secrets ready"):
        token_secret(s, create=True)
        L.ray_token(s.data_dir)
    if s.redis_url == "embedded":
        with step("Redis started (AOF on)"):
            state.redis_url, state.redis_pid = L.start_redis(s.data_dir, s.redis_port)
        state.save()
    else:
        state.redis_url = s.redis_url
    env_settings = {"EVENTPULSE_REDIS_URL": state.redis_url,
                    "EVENTPULSE_DATA_DIR": str(s.data_dir),  # workers run elsewhere
                    "EVENTPULSE_PORT": str(s.port), "EVENTPULSE_HOST": s.host}
    env_settings.update({k: v for k, v in os.environ.items()
                         if k.startswith("EVENTPULSE_") and k not in env_settings})
    env = L.ray_env(env_settings, s.data_dir, state.ingress)
    # this process's own Ray clients (Serve deploy, job submission) use the same token
    os.environ.update({k: v for k, v in env.items() if k.startswith(("RAY_", "EVENTPULSE_"))})
    if os.environ.get("RAY_ADDRESS"):
        state.ray_address = os.environ["RAY_ADDRESS"]
    else:
        state.gcs_port, state.ray_started = L.free_port(), True
        state.save()
        with step("Ray head started"):
            L.start_ray(env, state.gcs_port)
        from ray._private.services import get_node_ip_address

        state.ray_address = f"{get_node_ip_address()}:{state.gcs_port}"
    state.save()
    dashboard = f"http://127.0.0.1:{L.DASHBOARD_PORT}"
    with step("Serve application deployed"):
        from cluster.deploy import deploy_serve, wait_serve_running

        names = deploy_serve(dashboard, L.serve_config_for(s.host, s.port, s.data_dir))
        wait_serve_running(dashboard, names, timeout)
    state.api_url = f"http://{s.host}:{s.port}"
    state.save()
    with step("API ready"):
        L.wait_http(state.api_url + "/readyz", timeout)
    with step("purchase job submitted"):
        from ray.job_submission import JobSubmissionClient

        from cluster.deploy import ensure_purchase_job

        state.job_id = ensure_purchase_job(JobSubmissionClient(dashboard),
                                           f"{sys.executable} -m cluster.purchase_job",
                                           env_settings)
    state.save()
    if monitoring:
        from cluster.monitoring import start_prometheus

        with step("Prometheus started"):
            prom = start_prometheus(s.data_dir / "prometheus", 9090)
            state.prometheus_pid = getattr(prom, "pid", None)
        state.urls["prometheus"] = "http://127.0.0.1:9090"
        state.save()
    state.urls.update({"API": state.api_url, "OpenAPI docs": state.api_url + "/docs",
                       "Ray dashboard": dashboard,
                       "metrics": f"http://127.0.0.1:{L.METRICS_PORT}/metrics",
                       "Redis": state.redis_url})
    state.save()
    if demo:
        _seed_demo(s, state)


def _seed_demo(s: Settings, state) -> None:
    from cluster.demo import seed

    with step("demo event ready"):
        demo = seed(state.api_url, token_secret(s), s.data_dir, s.token_ttl_s)
    if not demo.joined:
        console.print("[dim]the demo user keeps their place in the demo line[/]")
    state.urls["demo event"] = f"{state.api_url}/api/events/{demo.event_id}"
    state.urls["waiting room"] = f"{state.api_url}/events/{demo.event_id}/waiting-room"
    state.save()
    # Plain prints: tokens must stay on one line to be copied.
    print(f"demo user token:      {demo.user_token}", file=sys.stderr)
    print(f"demo organizer token: {demo.organizer_token}", file=sys.stderr)
    print(f"waiting room:         {state.urls['waiting room']}?token={demo.user_token}",
          file=sys.stderr)


@app.command()
def down() -> None:
    """Stop what `up` started; with nothing running, say so and exit 1."""
    from cluster import launcher as L

    s = _settings()
    state = L.State.load(s.data_dir)
    if state is None:
        raise _no_instance(s, "nothing to stop")
    L.teardown(state, on_step=lambda name: console.print(f"[green]✓[/] stopping {name}"))
    console.print("[green]✓[/] stopped")


@app.command()
def status() -> None:
    """Show what is running."""
    from cluster import launcher as L

    s = _settings()
    state = L.State.load(s.data_dir)
    if state is None:
        raise _no_instance(s, "not running")
    table = Table(title="Event-Pulse", show_header=False)
    api_ok = L.port_in_use(s.port)
    table.add_row("API", f"{state.api_url} {'[green]up' if api_ok else '[red]down'}[/]")
    if state.redis_pid:
        alive = Path(f"/proc/{state.redis_pid}").exists()
        table.add_row("Redis", f"{state.redis_url} {'[green]up' if alive else '[red]down'}[/]")
    table.add_row("Ray", state.ray_address)
    table.add_row("ingress", "HAProxy" if state.ingress == "haproxy" else "Serve's proxy")
    table.add_row("purchase job", state.job_id or "-")
    table.add_row("data directory", str(s.data_dir))
    for k, v in state.urls.items():
        table.add_row(k, v)
    console.print(table)


def _mount_optional() -> None:
    try:
        from cluster.dashboards import dashboards_app

        app.add_typer(dashboards_app, name="dashboards", help="Grafana dashboards")
    except ImportError:
        pass


_mount_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""All configuration, from `EVENTPULSE_*` environment variables (or a `.env` file).

Each default is written next to its reason. `Settings()` reads the environment once;
pass keyword arguments (or `_env_file=None` and an explicit mapping) in tests.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LEGACY_DATA_DIR = Path(".eventpulse")
LEGACY_MARKS = ("launcher.json", "token_secret")  # what an instance leaves there


def default_data_dir(cwd: Path | None = None) -> Path:
    """Where an instance keeps its state when no data directory is configured.

    A `./.eventpulse` in the working directory that holds an instance (the default of
    earlier releases) still wins; otherwise the user's state directory
    (`~/.local/state/eventpulse` on Linux), so the CLI finds the instance from any
    directory.
    """
    legacy = (cwd or Path.cwd()) / LEGACY_DATA_DIR
    if any((legacy / name).exists() for name in LEGACY_MARKS):
        return legacy.resolve()
    return platformdirs.user_state_path("eventpulse")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVENTPULSE_", env_file=".env", extra="ignore")

    # where it runs ---------------------------------------------------------------
    mode: Literal["development", "production"] = Field(
        "development",
        description="production refuses to start without an explicit token secret.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Embedded Redis data (AOF), launcher state, secrets and logs live here "
        "(`default_data_dir`; the CLI's `--data-dir` sets it too).",
    )

    # Redis -----------------------------------------------------------------------
    redis_url: str = Field(
        "embedded",
        description="'embedded' starts a private redis-server on `up`; otherwise a redis:// URL.",
    )
    redis_cluster: bool = Field(False, description="Treat redis_url as a Redis Cluster node.")
    redis_port: int = Field(
        0, description="Port for the embedded Redis; 0 picks a free one (Ray's GCS owns 6379)."
    )
    redis_pool_size: int = Field(
        50,
        description="Connections per process. Callers wait for a free one instead of failing: "
        "a non-blocking pool of 50 answered 'Too many connections' at 1,000 users.",
    )
    redis_pool_timeout_s: float = Field(
        5.0, description="How long a caller waits for a free connection before a 503."
    )
    redis_health_check_s: int = Field(
        15, description="Idle connections are PINGed after this many seconds before reuse."
    )
    redis_retries: int = Field(
        4, description="Retries on connection errors/timeouts, with exponential backoff."
    )
    redis_socket_timeout_s: float = Field(5.0, description="Per-command socket timeout.")

    # HTTP ------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the API listens on.")
    port: int = Field(8000, description="Port the API listens on.")
    max_body_bytes: int = Field(
        64 * 1024, description="Bodies above this are refused with 413; no route needs more."
    )

    body_timeout_s: float = Field(
        10.0, description="A request body must arrive within this long, else 408: a client "
        "dribbling its body must not hold a handler (routes take bodies of a few hundred bytes).")

    max_in_flight: int = Field(
        2000, description="Requests one replica works on at once before answering 503; "
        "past this, queueing only adds latency.")
    max_streams: int = Field(
        4500, ge=0, description="Open SSE streams one replica holds; past it a stream request "
        "gets 503 `streams_full` with Retry-After and the client polls `/queue/me`. Each "
        "stream holds a connection of the ingress (HAProxy's maxconn, 9,900 on one "
        "machine): a crowd larger than that, refused at once, falls back to polling, "
        "instead of waiting for a connection slot until it times out. `eventpulse up` sets "
        "it to 90 % of maxconn shared by the replicas.")

    side_port: int = Field(
        0, ge=0, le=65535, description="Port of the replicas' side server (`serve/side.py`): an "
        "aiohttp server in every Ingress replica, sharing the port (SO_REUSEPORT) on "
        "127.0.0.1, that the node's HAProxy sends the hottest per-user routes to. 0 turns "
        "it off (everything through Serve's ingress). `eventpulse up` picks a free port.")

    # auth ------------------------------------------------------------------------
    token_secret: SecretStr | None = Field(
        None,
        description="HS256 secret shared with the identity provider. Required in production; "
        "in development a random one is generated and kept in the data directory.",
    )
    token_ttl_s: int = Field(12 * 3600, description="Lifetime of tokens the CLI mints.")
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC secret of the payment provider's webhook."
    )

    # the line --------------------------------------------------------------------
    offer_minutes: float = Field(30, description="Default offer window, as in the earlier product.")
    join_rate_limit: int = Field(3, description="Joins per user per window (earlier product: 3).")
    join_rate_window_s: int = Field(1800, description="Window of the join rate limit (30 min).")
    abandon_after_s: float = Field(
        300, description="An entry not seen for this long is skipped when it reaches the head."
    )
    line_idle_exit_s: float = Field(
        300.0, ge=0, description="An event's line actor leaves after this long without a call "
        "while nothing in its line is due (no offer to expire, no opening, no grant waiting on "
        "the clock); the next call creates it again from Redis. Each idle actor cost ~1 % of a "
        "core here (Ray's own per-process work); 0 keeps them for good.")
    snapshot_every_n: int = Field(
        50_000, description="Snapshot after this many journaled mutations..."
    )
    snapshot_every_s: float = Field(30.0, description="...or after this many seconds with any.")
    group_commit_ms: float = Field(
        1.0, description="Mutations arriving within this window share one journal write."
    )

    # purchases -------------------------------------------------------------------
    purchase_partitions: int = Field(4, description="Purchase streams (P) and job consumers.")
    purchase_batch_size: int = Field(
        1000, ge=1, description="Most requests a consumer takes at once (XREADGROUP COUNT: "
        "a cap, so a light load still goes in small batches; under a backlog larger batches "
        "share each event's round trips among more purchases).")
    purchase_batch_wait_ms: int = Field(
        1000, ge=1, description="How long an idle consumer blocks for work (XREADGROUP BLOCK: "
        "it returns as soon as a request arrives, so this costs no latency; a short block "
        "only burns CPU polling — 20 ms cost ~6 % of a core per consumer).")
    purchase_linger_ms: float = Field(
        80.0, ge=0, description="After a batch that was not full, wait this long before the "
        "next read, so that under load the next batch gathers more requests and shares its "
        "Redis round trips and actor calls among them (in a flash sale batches held 1-3 "
        "purchases at ~7 ms of consumer CPU each). An idle consumer's first request is still "
        "read at once; 0 reads again at once.")
    purchase_max_attempts: int = Field(5, description="Deliveries before a dead-letter.")
    purchase_reclaim_idle_ms: int = Field(
        30_000, description="A pending request idle this long is reclaimed (XAUTOCLAIM)."
    )

    # caching ---------------------------------------------------------------------
    event_cache_ttl_s: float = Field(
        2.0, description="L1 TTL of event details; pub/sub invalidation makes it rarely matter."
    )
    availability_cache_ttl_s: float = Field(
        0.5, description="L1 TTL of availability: it changes with every offer."
    )
    line_mirror: bool = Field(
        True, description="Replicas answer reads of line entries they read before from a "
        "mirror that follows the line's changes (serve/mirror.py), while it is complete; "
        "false sends every read to the event's actor.")
    actor_batch_window_ms: float = Field(
        2.0, description="Replicas coalesce actor calls for one event within this window."
    )

    @model_validator(mode="after")
    def _production_needs_secret(self) -> "Settings":
        if self.mode == "production" and self.token_secret is None:
            raise ValueError("EVENTPULSE_TOKEN_SECRET must be set when EVENTPULSE_MODE=production")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()

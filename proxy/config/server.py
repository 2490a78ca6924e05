"""The ``server`` section: process-wide settings that belong with the policy."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from proxy.config.fields import MAX_NUMBER, NonNegativeFloat, PositiveFloat, PositiveInt, Strict


class UpstreamTimeout(Strict):
    """Upstream read timeout proportional to input size: base + per 1K tokens, capped."""

    base_seconds: PositiveFloat = 10.0
    per_1k_input_tokens_seconds: NonNegativeFloat = 1.0
    max_seconds: PositiveFloat = 25.0


class Retry(Strict):
    """Upstream retries of throttles and 503s inside the caller's deadline."""

    #: Extra attempts per call (0 disables retries).
    max_retries: Annotated[int, Field(ge=0, le=5)] = 2
    #: Retries allowed as a fraction of first attempts (the retry budget).
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    base_backoff_ms: PositiveInt = 100
    max_backoff_ms: PositiveInt = 2000


class AdaptivityTuning(Strict):
    """How often the fleet-wide controllers (adaptive limits, breakers, pauses) look."""

    tick_seconds: PositiveFloat = 1.0
    #: The window over which a real-time class's p99 decides batch pauses.
    pause_window_seconds: PositiveFloat = 10.0


class Connections(Strict):
    """Client-connection protections; defaults follow nginx and Envoy's edge guidance."""

    #: A request's line and headers must arrive within this (Envoy edge: 10 s).
    header_timeout_seconds: PositiveFloat = 10.0
    #: Longest pause between two reads of a request body (nginx client_body_timeout).
    body_timeout_seconds: PositiveFloat = 60.0
    #: An idle keep-alive connection is closed after this (nginx keepalive_timeout).
    keepalive_timeout_seconds: PositiveFloat = 75.0
    #: Open client connections per instance; more are answered 503 and closed.
    max_connections: PositiveInt = 4096
    #: Requests still sending their body (so not yet identified) at once per instance.
    max_unauthenticated_requests: PositiveInt = 256
    #: Longest request line or header line (nginx large_client_header_buffers: 8 KiB).
    max_header_line_bytes: Annotated[int, Field(ge=256, le=MAX_NUMBER)] = 8190
    #: Most header lines in one request.
    max_headers: PositiveInt = 128


#: Ten years, in hours: the longest ``server.jobs.retention_hours``.
MAX_RETENTION_HOURS = 10 * 366 * 24


class Jobs(Strict):
    """Durable batch workers in every instance (``proxy/jobs``)."""

    enabled: bool = True
    #: Records one instance processes at once (admission still decides the pace).
    workers: PositiveInt = 16
    #: A record's visibility lease, renewed while it is processed; a dead worker's records
    #: are taken over this long after its last renewal.
    lease_seconds: PositiveFloat = 30.0
    #: The embedded store's file when Sluice runs without Redis (created on first submit).
    sqlite_path: str = "sluice-jobs.sqlite3"
    #: Largest JSONL body one submit may send (it is held in memory while it is validated).
    max_submit_bytes: PositiveInt = 256 * 1024 * 1024
    #: A completed or cancelled batch (its output lines and dead letters too) is deleted
    #: this long after it finished. Bounded at ten years: a retention is a promise to
    #: delete, and past that it is a typo. Strict: `true` is not an hour.
    retention_hours: Annotated[PositiveFloat, Field(le=MAX_RETENTION_HOURS, strict=True)] = 168.0


class Server(Strict):
    """Process-wide settings that belong with the policy."""

    region: str | None = None
    max_body_bytes: PositiveInt = 20 * 1024 * 1024
    #: From a tenth of a second (heartbeats renew at a third of it; the store refuses less)
    #: to ten years: far past that the lease arithmetic (milliseconds in Redis integers)
    #: breaks, and every call failed (1e300 s left leases that never expired).
    lease_ttl_seconds: Annotated[float, Field(ge=0.1, le=315_360_000, allow_inf_nan=False)] = 30.0
    upstream_connect_timeout_seconds: PositiveFloat = 5.0
    upstream_read_timeout_seconds: PositiveFloat = 300.0
    store_timeout_ms: PositiveInt = 250
    #: Grants the Redis store holds ahead of demand per plan while every limit of the plan
    #: is at least half free (0, the default: every request asks Redis). Read at start.
    grants_ahead: Annotated[int, Field(ge=0, le=64)] = 0
    access_log: bool = True
    #: Where models not named in any pool go: "allow" (no pool limits) or "refuse".
    unknown_models: Literal["allow", "refuse"] = "allow"
    upstream_timeout: UpstreamTimeout | None = None
    retry: Retry = Field(default_factory=lambda: Retry())
    adaptivity: AdaptivityTuning = Field(default_factory=lambda: AdaptivityTuning())
    connections: Connections = Field(default_factory=lambda: Connections())
    jobs: Jobs = Field(default_factory=lambda: Jobs())

"""The fleet view's shape: what ``/sluice/v1/fleet``, the dashboard and ``sluice status`` show."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PoolView:
    """A model pool across the fleet: the limit in force against use and quota."""

    name: str
    quota: dict[str, float | None]  # rpm, tpm, concurrency as the policy declares them
    limit: float | None  # concurrency limit in force (adaptive, or configured)
    adaptive_limit: float | None
    in_flight: float
    requests_per_min: float
    tokens_per_min: float  # weighted tokens settled, as the tokens/min quota counts them
    throttle_rate: float  # Bedrock 429s / upstream calls
    breaker: str | None  # closed | half-open | open; None without a breaker


@dataclass(frozen=True, slots=True)
class Outcomes:
    """What happened to a class's or a workload's calls across the fleet (last 10 s)."""

    name: str
    admitted_per_s: float
    refused_per_s: float
    degraded_per_s: float
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, slots=True)
class ClassView(Outcomes):
    """A priority class across the fleet."""

    share: float | None
    target_p99_ms: float | None


@dataclass(frozen=True, slots=True)
class WorkloadView(Outcomes):
    """A workload across the fleet."""

    priority: str | None
    paused: bool


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One live instance, as its last snapshot describes it."""

    id: str
    policy_version: int | None
    policy_sha: str | None
    policy_source: str | None  # "redis": runs a stored version; a path: a file of its own
    # Shares the fleet's Redis without following its versions (--no-fleet): not a member.
    own_file: bool
    # Runs the version in the view's header (for a member: the fleet's current version).
    on_policy: bool
    age_s: float


def runs(version: int | None, sha: str | None, source: str | None) -> str:
    """What an instance runs, in words: a stored version, or a file and its reload count."""
    short = (sha or "")[:12] or "-"
    if source == "redis":
        return f"v{version} (sha {short})"
    # A file's count is the instance's own (v1 at start, +1 a reload), not a fleet version.
    return f"file {source} (local v{version}, sha {short})"


@dataclass(frozen=True, slots=True)
class FleetView:
    """Everything the dashboard shows; ``history`` holds the 15-minute chart points."""

    fleet: str
    generated_at: float
    # version, sha, author, source of the fleet's current version in Redis (without one:
    # of the newest version its members run)
    policy: dict[str, Any]
    members: int  # instances that follow the fleet's versions (own_file False)
    instances: tuple[InstanceView, ...]  # every instance on the board, members or not
    pools: tuple[PoolView, ...]
    classes: tuple[ClassView, ...]
    workloads: tuple[WorkloadView, ...]
    paused: tuple[str, ...]
    schedules: dict[str, Any]
    batch: dict[str, Any]
    dlq: dict[str, float]
    history: tuple[dict[str, Any], ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The view as JSON-ready dicts and lists."""
        return dataclasses.asdict(self)

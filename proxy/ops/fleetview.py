"""The fleet view: every live instance's snapshot, from Redis, summed into one picture.

Each instance writes its snapshot (:mod:`proxy.ops.snapshot`) once a second under one
hash tag per fleet, with a 10 s expiry, and registers itself in a sorted set; any
instance (or ``sluice status``, with no instance at all) reads them back in two calls
and merges them. One instance a 5-second slot (whoever takes the slot's lock) appends a
compact point to a 15-minute history, so a freshly opened dashboard has its charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from proxy.backend.client import FAILURES, Redis, RedisCluster
from proxy.backend.fleet_board import (
    append_history,
    publish_snapshot,
    read_board,
    withdraw_snapshot,
)
from proxy.backend.versions import PolicyVersions
from proxy.control.fleet import N_BUCKETS, quantile_ms
from proxy.ops.snapshot import Snapshots
from proxy.ops.view import ClassView, FleetView, InstanceView, PoolView, WorkloadView
from proxy.tasks import stop_tasks

log = logging.getLogger("sluice.fleetview")

HISTORY_POINTS = 180  # 15 minutes at one point per 5 s
HISTORY_EVERY_S = 5
_BREAKER = {0: "closed", 1: "half-open", 2: "open"}
_FAILURES = FAILURES


def _rate(rows: Iterable[tuple[dict[str, Any], float]], field: str) -> float:
    return float(sum(row.get(field, 0.0) / window for row, window in rows if window > 0))


def _quantiles(rows: Iterable[tuple[dict[str, Any], float]]) -> tuple[float | None, ...]:
    hist = [0] * N_BUCKETS
    for row, _ in rows:
        for j, count in enumerate(row.get("hist", ())):
            hist[j] += count
    return quantile_ms(hist, 0.5), quantile_ms(hist, 0.99)


_Rows = dict[str, list[tuple[dict[str, Any], float]]]


def _rows(snaps: list[dict[str, Any]], kind: str) -> _Rows:
    out: _Rows = {}
    for snap in snaps:
        for name, row in snap.get(kind, {}).items():
            out.setdefault(name, []).append((row, snap.get("window_s") or 0.0))
    return out


def _max(rows: list[tuple[dict[str, Any], float]], field: str) -> float | None:
    values = [row[field] for row, _ in rows if row.get(field) is not None]
    return max(values) if values else None


def _pool(name: str, rows: list[tuple[dict[str, Any], float]]) -> PoolView:
    upstream = _rate(rows, "upstream")
    breaker = _max(rows, "breaker")
    quota: dict[str, Any] = next((row["quota"] for row, _ in reversed(rows) if "quota" in row), {})
    return PoolView(
        name=name,
        quota=quota,
        limit=_max(rows, "limit"),
        adaptive_limit=_max(rows, "adaptive"),
        in_flight=sum(row.get("in_flight", 0.0) for row, _ in rows),
        requests_per_min=round(_rate(rows, "requests") * 60, 2),
        tokens_per_min=round(_rate(rows, "tokens") * 60, 1),
        throttle_rate=round(_rate(rows, "throttled") / upstream, 4) if upstream else 0.0,
        breaker=_BREAKER.get(int(breaker)) if breaker is not None else None,
    )


def _outcomes(rows: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    p50, p99 = _quantiles(rows)
    return {
        "admitted_per_s": round(_rate(rows, "admitted"), 3),
        "refused_per_s": round(_rate(rows, "refused"), 3),
        "degraded_per_s": round(_rate(rows, "degraded"), 3),
        "p50_ms": round(p50, 1) if p50 is not None else None,
        "p99_ms": round(p99, 1) if p99 is not None else None,
    }


def _classes(classes: _Rows, workloads: _Rows) -> tuple[ClassView, ...]:
    out = []
    for name, rows in sorted(classes.items()):
        # Degradations are counted per workload: fold them into their class.
        members = [r for rs in workloads.values() for r in rs if r[0].get("class") == name]
        last = rows[-1][0]
        fields = {**_outcomes(rows), "degraded_per_s": round(_rate(members, "degraded"), 3)}
        out.append(
            ClassView(
                name=name,
                share=last.get("share"),
                target_p99_ms=last.get("target_p99_ms"),
                **fields,
            )
        )
    return tuple(out)


def _own_file(policy: dict[str, Any]) -> bool:
    if "own_file" in policy:
        return bool(policy["own_file"])
    # A snapshot from an older instance (a rolling upgrade) does not say: a file path is
    # the best sign it runs its own policy.
    return policy.get("source") not in (None, "redis")


def _runs(policy: dict[str, Any], header: dict[str, Any]) -> bool:
    return all(policy.get(k) == header.get(k) for k in ("version", "sha", "source"))


def _header(snaps: list[dict[str, Any]], current: dict[str, Any] | None) -> dict[str, Any]:
    """The policy the view is about: the fleet's stored current version when it has one.

    Never the newest version any snapshot reports: an instance running a file of its own
    counts its reloads from v1, so its number says nothing about the fleet's versions.
    Without a stored version (no Redis, or none published yet) the members' newest stands in.
    """
    if current is not None:
        return {**current, "source": "redis"}
    members = [p for p in (s.get("policy", {}) for s in snaps) if not _own_file(p)]
    newest: dict[str, Any] = max(members, key=lambda v: v.get("version") or 0, default={})
    return {k: newest[k] for k in ("version", "sha", "author", "source") if k in newest}


def _instance(snap: dict[str, Any], header: dict[str, Any], now: float) -> InstanceView:
    policy = snap.get("policy", {})
    own = _own_file(policy)
    return InstanceView(
        id=str(snap.get("id")),
        policy_version=policy.get("version"),
        policy_sha=policy.get("sha"),
        policy_source=policy.get("source"),
        own_file=own,
        on_policy=not own and bool(header) and _runs(policy, header),
        age_s=round(now - snap.get("at", now), 2),
    )


def merge(
    snaps: list[dict[str, Any]],
    fleet: str,
    now: float | None = None,
    current: dict[str, Any] | None = None,
) -> FleetView:
    """One fleet view from instance snapshots and the fleet's ``current`` stored version
    (version, sha, author; None without one). Pure: also used by ``sluice status``."""
    now = time.time() if now is None else now
    workloads = _rows(snaps, "workloads")
    paused = tuple(sorted({w for s in snaps for w in s.get("paused", [])}))
    header = _header(snaps, current)
    instances = tuple(_instance(s, header, now) for s in snaps)
    merged: dict[str, dict[str, Any]] = {"schedules": {}, "batch": {}, "dlq": {}}
    for s in snaps:
        for field, values in merged.items():
            values.update(s.get(field, {}))
    return FleetView(
        fleet=fleet,
        generated_at=now,
        policy=header,
        members=sum(not i.own_file for i in instances),
        instances=instances,
        pools=tuple(_pool(name, rows) for name, rows in sorted(_rows(snaps, "pools").items())),
        classes=_classes(_rows(snaps, "classes"), workloads),
        workloads=tuple(
            WorkloadView(
                name=name,
                priority=rows[-1][0].get("class"),
                paused=name in paused,
                **_outcomes(rows),
            )
            for name, rows in sorted(workloads.items())
        ),
        paused=paused,
        schedules=merged["schedules"],
        batch=merged["batch"],
        dlq=merged["dlq"],
    )


def point(view: FleetView) -> dict[str, Any]:
    """The few numbers the dashboard charts, for the 15-minute history."""
    return {
        "t": round(view.generated_at, 1),
        "pools": {
            p.name: [p.requests_per_min, p.tokens_per_min, p.in_flight, p.throttle_rate]
            for p in view.pools
        },
        "classes": {c.name: [c.admitted_per_s, c.refused_per_s, c.p99_ms] for c in view.classes},
    }


async def read_fleet(client: Redis | RedisCluster, fleet: str) -> FleetView:
    """The fleet view from Redis alone, with its history and current policy version."""
    now = time.time()
    snaps, history = await read_board(client, fleet)
    stored = await PolicyVersions(client, fleet).current()
    current = None
    if stored is not None:
        current = {"version": stored.number, "sha": stored.sha, "author": stored.author}
    return dataclasses.replace(merge(snaps, fleet, now, current), history=history)


class FleetBoard:
    """This instance's part of the fleet view: publish its snapshot, serve the merged view."""

    def __init__(
        self, snapshots: Snapshots, client: Redis | RedisCluster | None, fleet: str
    ) -> None:
        self.snapshots = snapshots
        self.fleet = fleet
        self._client = client
        self._latest: dict[str, Any] | None = None
        self._local_history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._task: asyncio.Task[None] | None = None
        self._down = False

    async def start(self) -> None:
        """Tick once a second in the background."""
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop ticking and close the connection."""
        if self._task is not None:
            await stop_tasks([self._task], "fleet board")
        if self._client is not None:
            # Leave the fleet at once: otherwise `policy apply --wait` counts this instance
            # as behind until its snapshot expires (10 s).
            with contextlib.suppress(*_FAILURES):
                async with asyncio.timeout(1.0):
                    await withdraw_snapshot(self._client, self.fleet, self.snapshots.instance_id)
            await self._client.aclose()

    async def view(self) -> FleetView:
        """The fleet view: from Redis when there is one, else this instance alone."""
        if self._client is not None:
            with contextlib.suppress(*_FAILURES):
                return await read_fleet(self._client, self.fleet)
        snaps = [self._latest] if self._latest is not None else []
        return dataclasses.replace(merge(snaps, self.fleet), history=tuple(self._local_history))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._latest = snap = self.snapshots.tick()
            try:
                await self._publish(snap)
                self._down = False
            except _FAILURES as exc:
                if not self._down:
                    self._down = True
                    log.warning(f"fleet view: cannot publish to Redis: {exc!r}")
            except Exception:  # a defect: logged, and the board ticks on (it used to end
                # silently, leaving this instance out of the fleet view for good)
                if not self._down:
                    self._down = True
                    log.exception("fleet view: cannot publish this instance's snapshot")

    async def _publish(self, snap: dict[str, Any]) -> None:
        now = time.time()
        slot = int(now // HISTORY_EVERY_S)
        if self._client is None:
            if not self._local_history or self._local_history[-1]["slot"] != slot:
                self._local_history.append({**point(merge([snap], self.fleet, now)), "slot": slot})
            return
        if not await publish_snapshot(self._client, self.fleet, snap, slot, HISTORY_EVERY_S):
            return
        view = await read_fleet(self._client, self.fleet)
        await append_history(
            self._client, self.fleet, {**point(view), "slot": slot}, HISTORY_POINTS
        )

"""Randomized incident sweep: shedding must hold on numbers nobody tuned for (issue 9).

    python bench/sweep.py --seeds 5 [--first-seed 1] [--duration 45] [--instances 3]

Each seed draws an incident (:mod:`sweep_draw`): the Bedrock quota that binds (concurrency,
requests/min or tokens/min) and its size, the pool's starting limit at 0.5-2.5x the quota,
traffic with a surge, a class mix with degradation chains, a batch job, and a quota cut or
raise at a random time. The same load runs through ``--instances`` Sluice processes on one
Redis and straight to a fresh simulator; the invariants of issue 9 are checked per seed and
printed as one table (``bench/results/sweep-<UTC>.json`` keeps every figure):

* ``p0``: P0 success >= 99 % whenever P0's own demand fits the quota, never below direct;
* ``thr``: Bedrock throttles < 1 % of upstream calls outside the 10 s after the start, a
  surge onset or a quota change;
* ``conv``: with demand above the limit and a higher (concurrency) quota, the fleet limit
  reaches 90 % of the quota within 30 s;
* ``ok``: successful calls of the real-time (open-loop) classes through Sluice (degraded
  to another model included, templates not) >= direct's;
* ``shape``: no bare error for a class with a chain, every refusal carries Retry-After.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import (
    RESULTS_DIR,
    CpuLayout,
    default_layout,
    install_cleanup,
    log,
    processes,
    start_redis,
)
from scenario_load import Driver, Sample, http_call
from scenarios import check_stack, start_simulator, start_sluices
from sweep_check import check_seed, table
from sweep_draw import Incident, draw


def _write_files(inc: Incident, workdir: Path) -> None:
    inc.scenario.policy_file.write_text(yaml.safe_dump(inc.policy, sort_keys=False))
    inc.scenario.sim_file.write_text(yaml.safe_dump(inc.sim, sort_keys=False))


async def _change_quota(sim_url: str, inc: Incident, t0: float) -> float | None:
    """Apply the drawn quota change at its time; returns when it was applied (run clock)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + inc.change_at - loop.time()))
    patch = json.dumps({"models": {inc.model: {"quotas": inc.quota_after}}}).encode()
    await asyncio.to_thread(http_call, "POST", sim_url + "/_sim/config", patch)
    return loop.time() - t0


async def _drive(driver: Driver, sim_url: str, instances: list[str], inc: Incident) -> Any:
    t0 = asyncio.get_running_loop().time()
    samples, changed = await asyncio.gather(
        driver.run(sim_url, instances), _change_quota(sim_url, inc, t0)
    )
    return samples, changed


def run_one(system: str, inc: Incident, opts: argparse.Namespace) -> dict[str, Any]:
    """One system (``sluice`` or ``direct``) under the seed's load; raw outcomes and samples."""
    layout = default_layout() if opts.pin else CpuLayout(None, None)
    with (
        tempfile.TemporaryDirectory(prefix=f"sluice-sweep-{system}-") as tmp,
        processes() as started,
    ):
        workdir = opts.keep / f"seed{inc.seed}-{system}" if opts.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        inc = inc.placed(workdir)
        _write_files(inc, workdir)
        sim_url = start_simulator(inc.scenario, layout, workdir, started)
        targets = [sim_url]
        if system == "sluice":
            redis, redis_url = start_redis(workdir, layout)
            started.append(redis)
            targets = start_sluices(
                inc.scenario, opts.instances, sim_url, redis_url, layout, workdir, started
            )
        check_stack(inc.scenario, targets)
        http_call("POST", sim_url + "/_sim/reset", b"{}")
        instances = targets if system == "sluice" else []
        driver = Driver(inc.scenario, targets, opts.duration, 1.0, 0.0, None, inc.seed)
        log(f"seed {inc.seed} / {system}: {opts.duration:g} s, {inc.describe()}")
        samples, changed = asyncio.run(_drive(driver, sim_url, instances, inc))
        metrics = _final_metrics(instances)
        if opts.keep:
            _write_timeline(workdir / "timeline.tsv", samples, inc.model)
    return {
        "system": system,
        "outcomes": driver.outcomes,
        "samples": samples,
        "changed_at": changed,
        "dropped": driver.dropped,
        "metrics": metrics,
    }


def _write_timeline(path: Path, samples: list[Sample], model: str) -> None:
    """Per sample: Bedrock's in-flight, calls and throttles so far, and the fleet limit."""
    lines = ["t\tin_flight\trequests\tthrottled\tlimit"]
    for s in samples:
        sim = s.sim.get(model, {})
        limits = [
            g["sluice_adaptive_limit"].get("sonnet", 0)
            for g in s.gauges
            if "sluice_adaptive_limit" in g
        ]
        cells = (sim.get("in_flight", ""), sim.get("requests", ""), sim.get("throttled", ""))
        lines.append(f"{s.t:.2f}\t" + "\t".join(map(str, cells)) + f"\t{max(limits, default='')}")
    path.write_text("\n".join(lines) + "\n")


def _final_metrics(instances: list[str]) -> dict[str, float]:
    """Fleet totals at the end of a run: breaker transitions (also per state entered,
    ``...:open``), limit changes, retries given up (no slot under the limit, budget empty).
    Each transition is counted by the one instance that applied it, so the sum over
    instances is the fleet's count."""
    totals: dict[str, float] = {}
    for base in instances:
        with contextlib.suppress(OSError):
            for line in http_call("GET", base + "/metrics").decode().splitlines():
                name = line.partition("{")[0].partition(" ")[0]
                if name not in (
                    "sluice_breaker_transitions_total",
                    "sluice_adaptive_limit_changes_total",
                    "sluice_upstream_retry_requeue_refused_total",
                    "sluice_upstream_retry_budget_exhausted_total",
                ):
                    continue
                value = float(line.rpartition(" ")[2])
                totals[name] = totals.get(name, 0.0) + value
                to = line.partition('to="')[2].partition('"')[0]
                if to:
                    totals[f"{name}:{to}"] = totals.get(f"{name}:{to}", 0.0) + value
    return totals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="how many seeds (default 5)")
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=45.0, help="seconds of load per system")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument(
        "--vary-policy",
        action="store_true",
        help="draw the policy's control settings too (interval, cut, tick, breaker, shares)",
    )
    p.add_argument("--pin", action="store_true", help="pin processes to CPUs (default: not)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: bench/results)")
    p.add_argument("--keep", type=Path, default=None, help="keep every process log under DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    install_cleanup()
    rows: list[dict[str, Any]] = []
    for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
        inc = draw(seed, opts.duration, vary_policy=opts.vary_policy)
        if inc.variant:
            log(f"seed {seed} policy: {inc.variant}")
        started = time.monotonic()
        runs = {system: run_one(system, inc, opts) for system in ("sluice", "direct")}
        row = check_seed(inc, runs["sluice"], runs["direct"], opts.duration)
        row["wall_s"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(table([row]), flush=True)
    print("\n" + table(rows))
    passed = sum(1 for r in rows if r["pass"])
    print(f"\n{passed}/{len(rows)} seeds pass every invariant")
    out = opts.out or RESULTS_DIR / f"sweep-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": {**vars(opts), "out": str(out)}, "seeds": rows}, indent=1, default=str)
    )
    log(f"results: {out}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Sample", "main", "run_one"]

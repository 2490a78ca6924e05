"""Incident replays: several Sluice instances on one Redis in front of the Bedrock simulator.

    python bench/scenarios.py [--scenario flash-sale|priority-inversion|all] [--instances 3]
                              [--duration 60] [--scale 1.0] [--boto3-share 0.2] [--no-baseline]

Each scenario (``/work/shared/scenarios.md``) is a policy and a simulator config in
``bench/scenarios/`` plus a load shape defined below. One run starts redis-server, the simulator
and ``--instances`` Sluice processes (all on free ports), drives open-loop traffic tagged with
``x-sluice-workload`` round-robin over the instances, and samples every 250 ms: the simulator's
``/_sim/stats`` (in-flight, throttles) and each instance's ``/metrics`` (the pool limit in force,
breaker state, paused workloads -- whichever of them this build exposes).

The baseline is the same load, in the same invocation, sent straight to a fresh simulator: what
the callers would see without Sluice. Output: a markdown table on stdout, JSON and a PNG in
``bench/results/scenario-<name>-<UTC>.{json,png}`` (the PNG needs matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from common import (
    RESULTS_DIR,
    CpuLayout,
    ManagedProcess,
    default_layout,
    free_port,
    install_cleanup,
    log,
    parse_cpu_list,
    processes,
    request_headers,
    start_redis,
    timestamp,
)
from scenario_load import (
    BotoClients,
    Driver,
    Outcome,
    Scenario,
    http_call,
    invoke_path,
    load_scenarios,
    request_body,
    scrape_health,
)
from scenario_report import (
    class_table,
    phase_table,
    plot,
    pool_models,
    series,
    summarize,
    upstream_table,
)
from systems import AWS_ENV, PY, ProxyContext, _sluice

# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def start_simulator(
    scenario: Scenario, layout: CpuLayout, workdir: Path, started: list[ManagedProcess]
) -> str:
    port = free_port()
    argv = [PY, "-m", "proxy", "simulate", "--port", str(port), "--config", str(scenario.simulator)]
    started.append(ManagedProcess("simulator", [*layout.prefix("rest"), *argv], log_dir=workdir))
    url = f"http://127.0.0.1:{port}"
    started[-1].wait_http(url + "/_sim/healthz")
    return url


def start_sluices(
    scenario: Scenario,
    count: int,
    sim_url: str,
    redis_url: str,
    layout: CpuLayout,
    workdir: Path,
    started: list[ManagedProcess],
) -> list[str]:
    bases = []
    for i in range(count):
        port = free_port()
        argv = _sluice(scenario.policy, redis=True)(ProxyContext(port, sim_url, redis_url))
        proc = ManagedProcess(
            f"sluice-{i}", [*layout.prefix("sut"), *argv], log_dir=workdir, env=AWS_ENV
        )
        started.append(proc)
        bases.append(f"http://127.0.0.1:{port}")
    for proc, base in zip(started[-count:], bases, strict=True):
        proc.wait_http(base + "/healthz", timeout=60)
    return bases


def check_stack(scenario: Scenario, bases: Sequence[str]) -> None:
    """One real call per target before the clock starts, so a broken stack fails loudly."""
    stream = scenario.streams[0]
    for base in bases:
        headers = {**request_headers(), "x-sluice-workload": stream.workload}
        req = urllib.request.Request(
            base + invoke_path(stream.model_id), request_body(stream, 0), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(
                f"{base}: check call failed: {exc.code} {exc.read()[:300]!r}"
            ) from None


def run_system(
    system: str, scenario: Scenario, opts: argparse.Namespace, layout: CpuLayout
) -> dict[str, Any]:
    """Start everything fresh, drive the scenario once, stop everything; return raw data."""
    with (
        tempfile.TemporaryDirectory(prefix=f"sluice-scenario-{system}-") as tmp,
        processes() as started,
    ):
        workdir = Path(tmp)
        sim_url = start_simulator(scenario, layout, workdir, started)
        if system == "sluice":
            redis, redis_url = start_redis(workdir, layout)
            started.append(redis)
            targets = start_sluices(
                scenario, opts.instances, sim_url, redis_url, layout, workdir, started
            )
        else:
            targets = [sim_url]
        check_stack(scenario, targets)
        http_call("POST", sim_url + "/_sim/reset", b"{}")
        instances = targets if system == "sluice" else []
        boto = None
        if opts.boto3_share > 0:
            workloads = sorted({s.workload for s in scenario.streams})
            boto = BotoClients(targets, workloads, threads=64)
        driver = Driver(
            scenario, targets, opts.duration, opts.scale, opts.boto3_share, boto, opts.seed
        )
        log(f"{scenario.name} / {system}: {opts.duration:g} s of load on {len(targets)} target(s)")
        try:
            samples = asyncio.run(driver.run(sim_url, instances))
        finally:
            if boto is not None:
                boto.close()
        health = scrape_health(instances)
        dead = [p.name for p in started if not p.alive()]
        logs = {p.name: p.log_tail(5) for p in started if p.name.startswith("sluice")}
    return {
        "system": system,
        "targets": len(targets),
        "outcomes": driver.outcomes,
        "samples": samples,
        "dropped": driver.dropped,
        "max_lag_s": driver.max_lag_s,
        "died": dead,
        "health": health,
        "log_tails": logs,
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def run_scenario(scenario: Scenario, opts: argparse.Namespace, layout: CpuLayout) -> bool:
    policy = yaml.safe_load(scenario.policy.read_text())
    sim_config = yaml.safe_load(scenario.simulator.read_text())
    pools = pool_models(policy, sim_config)
    quotas = {
        m: ((sim_config.get("models") or {}).get(m, {}).get("quotas") or {}).get("concurrency")
        for m in set(pools.values())
    }
    systems = ["sluice", "direct"] if opts.baseline else ["sluice"]
    runs = {name: run_system(name, scenario, opts, layout) for name in systems}
    summaries = {name: summarize(run, scenario, opts.duration) for name, run in runs.items()}
    ts_by_system, notes = {}, []
    for name, run in runs.items():
        ts_by_system[name], run_notes = series(run, policy, pools)
        notes += run_notes
        if run["dropped"]:
            notes.append(f"{name}: generator dropped {run['dropped']} arrivals (too many pending)")
        if run["max_lag_s"] > 0.1:
            notes.append(f"{name}: generator sent up to {run['max_lag_s']:.2f} s late")
        for counter, value in run.get("health", {}).items():
            if value:
                notes.append(
                    f"{name}: {counter} = {value:g} -- Sluice could not always decide; "
                    f"see log_tails in the JSON"
                )
        if run["died"]:
            notes.append(f"{name}: processes died during the run: {run['died']}")

    stamp = timestamp()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = RESULTS_DIR / f"scenario-{scenario.name}-{stamp}.png"
    problem = plot(png, scenario, runs, ts_by_system, policy, pools, quotas, opts.duration)
    if problem:
        notes.append(problem)

    print(f"\n## {scenario.title}\n")
    print(f"{opts.instances} Sluice instances on one Redis vs direct to the simulator; "
          f"{opts.duration:g} s, scale {opts.scale:g}, boto3 share {opts.boto3_share:g}; phases: "
          + ", ".join(f"{p.name} {s:.0f}-{e:.0f} s"
                      for p, s, e in scenario.phase_bounds(opts.duration)) + "\n")  # fmt: skip
    print(class_table(summaries))
    print()
    print(upstream_table(summaries, quotas))
    print("\nSluice by phase:\n")
    print(phase_table(summaries["sluice"]))
    for note in notes:
        print(f"- {note}")
    doc = {
        "scenario": asdict(scenario),
        "options": vars(opts),
        "layout": asdict(layout),
        "policy": policy,
        "simulator": sim_config,
        "pools": pools,
        "summary": summaries,
        "series": ts_by_system,
        "notes": notes,
        "png": None if problem else str(png),
        "runs": {
            name: {
                **{k: v for k, v in run.items() if k not in ("outcomes", "samples")},
                "outcome_fields": list(Outcome.__dataclass_fields__),
                "outcomes": [list(asdict(o).values()) for o in run["outcomes"]],
            }
            for name, run in runs.items()
        },
    }
    out = RESULTS_DIR / f"scenario-{scenario.name}-{stamp}.json"
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nJSON: {out}" + ("" if problem else f"\nPNG:  {png}"))
    return not any(run["died"] for run in runs.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--scenario", choices=[*load_scenarios(), "all"], default="all")
    p.add_argument("--instances", type=int, default=3, help="Sluice processes (default 3)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per system")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every open-loop rate")
    p.add_argument(
        "--boto3-share",
        type=float,
        default=0.2,
        help="share of open-loop calls made with real boto3 clients (batch jobs always use "
        "boto3 unless this is 0); the rest use aiohttp with boto3's wire shape",
    )
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the direct-to-simulator run of the same load")  # fmt: skip
    p.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    p.add_argument("--seed", type=int, default=7)
    opts = p.parse_args(argv)
    if not 0 <= opts.boto3_share <= 1:
        p.error("--boto3-share must be in [0, 1]")
    if opts.duration < 10 or opts.duration > 600:
        p.error("--duration must be within 10..600 s")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    install_cleanup()
    layout = default_layout() if opts.pin else CpuLayout(None, None)
    if layout.rest:
        # The generator (and boto3's threads) stay off the Sluice CPU, like the simulator.
        os.sched_setaffinity(0, parse_cpu_list(layout.rest))
    log(f"layout: {layout.describe()}")
    scenarios = load_scenarios()
    names = list(scenarios) if opts.scenario == "all" else [opts.scenario]
    ok = True
    for name in names:
        ok = run_scenario(scenarios[name], opts, layout) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Durable batch jobs under load: incidents 2 and 5, the issue's headline run, and costs.

    python bench/batch_jobs.py [--scenario batch-queue|retry-dead-letter|batch-headline|costs|all]

A scenario is three files in ``bench/scenarios/``: ``<name>.yaml`` (the policy),
``<name>.sim.yaml`` (the simulator) and ``<name>.jobs.yaml`` (instances, the batch, the
real-time callers and the phases). One run starts redis-server (AOF on), the simulator
and the Sluice instances (all on free ports, killed at the end), then per phase: sets the
simulator's throttle rate on the batch model, submits the batch, runs closed-loop
real-time callers and a producer that keeps submitting (refusals with Retry-After are
counted). Every 0.5 s it samples queue depth, oldest record age and records finished.

``costs`` measures what the issue's targets name: how long a submit of 100,000 records
takes to be accepted, and Redis round trips per record (``MONITOR`` lines issued by
clients, script-internal commands excluded) while 1,000 records drain.

Output: tables on stdout, ``results/batch-<name>-<UTC>.json`` and ``.png`` (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from batch_report import phase_table, plot, summary_lines  # noqa: E402

from tests.support.jobs_helpers import call, dead_letters, output, record, submit  # noqa: E402
from tests.support.load import Results, drive  # noqa: E402
from tests.support.processes import Simulator, Sluice, metric_value  # noqa: E402
from tests.support.redis_fixtures import REDIS_CLI, RedisServerProcess  # noqa: E402

SCENARIOS = ("batch-queue", "retry-dead-letter", "batch-headline")
RESULTS = BENCH / "results"


#: Outside any fleet: every instance runs its own file and all share the default fleet's
#: batch queue, whose key names _count_in_redis reads (the test helper would otherwise give
#: each process a fleet, and so a queue, of its own).
ALONE = ["--no-fleet"]


class Stack:
    """Redis (AOF on), the simulator and N Sluice instances for one scenario."""

    def __init__(self, name: str, instances: int, workdir: Path) -> None:
        scen = BENCH / "scenarios"
        self.policy = yaml.safe_load((scen / f"{name}.yaml").read_text())
        self.sim_config = yaml.safe_load((scen / f"{name}.sim.yaml").read_text())
        self.redis = RedisServerProcess("--appendonly", "yes").start()
        self.sim = Simulator(workdir, self.sim_config)
        self.sluices = [
            Sluice(workdir, upstream=self.sim.url, policy=self.policy, redis_url=self.redis.url,
                   extra_args=ALONE)
            for _ in range(instances)
        ]  # fmt: skip

    def close(self) -> None:
        for s in self.sluices:
            s.stop()
        self.sim.stop()
        self.redis.cleanup()


def _status(base: str, batch_id: str, workload: str) -> dict[str, Any]:
    code, _, raw = call(base, "GET", f"/batches/{batch_id}", workload=workload)
    return dict(json.loads(raw)) if code == 200 else {}


async def _sampler(stack: Stack, spec: dict[str, Any], state: dict[str, Any]) -> None:
    workload = spec["batch"]["workload"]
    base = stack.sluices[0].url
    while True:
        docs = [await asyncio.to_thread(_status, base, b, workload) for b in list(state["ids"])]
        docs = [d for d in docs if d]
        state["samples"].append(
            {
                "t": time.monotonic() - state["t0"],
                "depth": max((d["queueDepth"] for d in docs), default=0),
                "age": max((d["oldestPendingAgeSeconds"] for d in docs), default=0.0),
                "done": sum(d["succeeded"] + d["failed"] for d in docs),
                "pending": sum(d["pending"] for d in docs),
            }
        )
        await asyncio.sleep(0.5)


async def _producer(stack: Stack, spec: dict[str, Any], state: dict[str, Any], until: float):
    inflow, b = spec["inflow"], spec["batch"]
    n = 0
    while time.monotonic() < until:
        recs = [record(100_000 + n + i) for i in range(inflow["records"])]
        n += inflow["records"]
        body = "\n".join(json.dumps(r) for r in recs).encode()
        code, headers, raw = await asyncio.to_thread(
            call, stack.sluices[-1].url, "POST", f"/batches?modelId={b['model']}",
            body=body, workload=b["workload"],
        )  # fmt: skip
        state["producer"][str(code)] += 1
        if code == 202:
            state["ids"].append(json.loads(raw)["batchId"])
            state["records"][state["ids"][-1]] = recs
        else:
            state["retry_after"].append(int(headers.get("Retry-After", 0)))
        await asyncio.sleep(inflow["every_seconds"])


def _all_done(stack: Stack, spec: dict[str, Any], state: dict[str, Any]) -> bool:
    base, wl = stack.sluices[0].url, spec["batch"]["workload"]
    return all(_status(base, b, wl).get("status") != "running" for b in state["ids"])


async def _phase(stack: Stack, spec: dict[str, Any], phase: dict[str, Any], state: dict[str, Any]):
    b, rt = spec["batch"], spec["realtime"]
    if "throttle_rate" in phase:
        patch = {"models": {b["model"]: {"faults": {"throttle_rate": phase["throttle_rate"]}}}}
        await asyncio.to_thread(stack.sim.configure, patch)
    if phase.get("submit"):
        recs = [record(i) for i in range(b["records"])]
        started = time.monotonic()
        bid = await asyncio.to_thread(
            submit, stack.sluices[0].url, recs, b["model"], workload=b["workload"]
        )
        state["submit_s"] = time.monotonic() - started
        state["ids"].append(bid)
        state["records"][bid] = recs
        if spec.get("bad_records"):
            bad = [record(50_000 + i) for i in range(spec["bad_records"])]
            bad_id = await asyncio.to_thread(
                submit, stack.sluices[0].url, bad, "anthropic.claude-nonexistent-v1:0",
                workload=b["workload"],
            )  # fmt: skip
            state["ids"].append(bad_id)
            state["records"][bad_id] = bad
    if phase.get("replay"):
        await asyncio.sleep(2)
        code, _, raw = await asyncio.to_thread(
            call, stack.sluices[0].url, "POST",
            f"/dlq/replay?reason=ValidationException&modelId={b['model']}", workload=b["workload"],
        )  # fmt: skip
        state["replayed"] = json.loads(raw).get("replayed") if code == 200 else raw.decode()
    start = time.monotonic()
    state["phases"].append({"name": phase["name"], "start": start - state["t0"]})
    until_done = phase["seconds"] == 0
    seconds = phase["seconds"] or 5.0
    while True:
        tasks = []
        clients = phase.get("realtime_clients", 0)
        if clients:
            urls = [s.url for s in stack.sluices]
            tasks.append(
                drive(urls, rt["workload"], rt["model"], clients=clients, seconds=seconds,
                      results=state["rt"], retries=0)
            )  # fmt: skip
        if phase.get("inflow"):
            tasks.append(_producer(stack, spec, state, time.monotonic() + seconds))
        tasks.append(asyncio.sleep(seconds))
        await asyncio.gather(*tasks)
        if not until_done or await asyncio.to_thread(_all_done, stack, spec, state):
            break
        if time.monotonic() - start > 600:
            state["notes"].append("gave up waiting for the batch after 600 s")
            break
    state["phases"][-1]["end"] = time.monotonic() - state["t0"]


def _check_outputs(stack: Stack, spec: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    wl, base = spec["batch"]["workload"], stack.sluices[-1].url
    lines, duplicates, missing = 0, 0, 0
    for bid, recs in state["records"].items():
        counts = Counter(line["recordId"] for line in output(base, bid, workload=wl))
        lines += sum(counts.values())
        duplicates += sum(v - 1 for v in counts.values() if v > 1)
        missing += len({r["recordId"] for r in recs} - set(counts))
    texts = [s.metrics() for s in stack.sluices]
    attempts = Counter()
    for text in texts:
        for line in text.splitlines():
            if line.startswith("sluice_batch_attempts_total{"):
                reason = line.split('reason="')[1].split('"')[0]
                attempts[reason] += float(line.rsplit(" ", 1)[1])
    dlq = Counter(d["reason"] for d in dead_letters(base, workload=wl))
    per_instance = [
        metric_value(t, "sluice_batch_records_total", outcome="succeeded") for t in texts
    ]
    return {
        "output_lines": lines, "duplicates": duplicates, "missing": missing,
        "dlq_by_reason": dict(dlq), "attempts_by_reason": dict(attempts),
        "succeeded_per_instance": per_instance,
    }  # fmt: skip


def _count_in_redis(stack: Stack, spec: dict[str, Any], state: dict[str, Any]) -> dict[str, int]:
    """With every instance stopped: output lines + records still queued vs records submitted."""
    for s in stack.sluices:
        s.stop()
    pool, wl = "haiku", spec["batch"]["workload"]
    queued = int(stack.redis.cli("xlen", f"sluice:{{{pool}}}:jobs:{wl}").strip() or 0)
    if spec.get("bad_records"):
        queued += int(stack.redis.cli("xlen", f"sluice:{{_other}}:jobs:{wl}").strip() or 0)
    lines = 0
    for bid in state["records"]:
        bpool = bid.split(":", 1)[0]
        lines += int(stack.redis.cli("hlen", f"sluice:{{{bpool}}}:batch:{bid}:out").strip() or 0)
    submitted = sum(len(r) for r in state["records"].values())
    return {"submitted": submitted, "queued_at_end": queued, "lost": submitted - lines - queued}


async def run_scenario(name: str, workdir: Path) -> dict[str, Any]:
    spec = yaml.safe_load((BENCH / "scenarios" / f"{name}.jobs.yaml").read_text())
    stack = Stack(name, spec["instances"], workdir)
    state: dict[str, Any] = {
        "t0": time.monotonic(), "ids": [], "records": {}, "samples": [], "phases": [],
        "rt": Results(), "producer": Counter(), "retry_after": [], "notes": [],
    }  # fmt: skip
    sampler = asyncio.create_task(_sampler(stack, spec, state))
    try:
        for phase in spec["phases"]:
            await _phase(stack, spec, phase, state)
        await asyncio.sleep(1.0)
        checks = await asyncio.to_thread(_check_outputs, stack, spec, state)
        sampler.cancel()
        checks.update(_count_in_redis(stack, spec, state))
    finally:
        sampler.cancel()
        stack.close()
    rt = [
        {"t": o.started - state["t0"], "latency": o.latency_s, "status": o.status}
        for o in state["rt"].outcomes
    ]
    return {
        "scenario": name, "title": spec["title"], "spec": spec, "policy": stack.policy,
        "sim": stack.sim_config, "phases": state["phases"], "samples": state["samples"],
        "realtime": rt, "producer": dict(state["producer"]), "retry_after": state["retry_after"],
        "submit_s": state.get("submit_s"), "replayed": state.get("replayed"),
        "checks": checks, "notes": state["notes"],
    }  # fmt: skip


def costs(workdir: Path) -> dict[str, Any]:
    """Accept time of 100,000 records; client round trips per record while 1,000 drain."""
    stack = Stack("batch-headline", 0, workdir)
    policy = {**stack.policy, "server": {"access_log": False, "jobs": {"enabled": False}}}
    idle = Sluice(
        workdir, upstream=stack.sim.url, policy=policy, redis_url=stack.redis.url, extra_args=ALONE
    )
    wl = "catalog-enrichment"
    try:
        started = time.monotonic()
        submit(idle.url, [record(i) for i in range(100_000)], workload=wl)
        accept_s = time.monotonic() - started
        stack.redis.cli("flushall")
        submit(idle.url, [record(i) for i in range(1000)], workload=wl)
        idle.stop()
        monitor_file = (workdir / "monitor.txt").open("wb")
        mon = subprocess.Popen(
            [REDIS_CLI, "-p", str(stack.redis.port), "monitor"], stdout=monitor_file
        )
        drainer = Sluice(
            workdir,
            upstream=stack.sim.url,
            policy=stack.policy,
            redis_url=stack.redis.url,
            extra_args=ALONE,
        )
        t0 = time.monotonic()
        # Progress from /metrics (no Redis command), so polling adds nothing to the count.
        while (
            metric_value(drainer.metrics(), "sluice_batch_records_total", outcome="succeeded")
            < 1000
        ):
            time.sleep(0.2)
        drain_s = time.monotonic() - t0
        mon.terminate()
        mon.wait()
        drainer.stop()
        lines = (workdir / "monitor.txt").read_text(errors="replace").splitlines()
        client = [ln for ln in lines if " lua]" not in ln and ln[:1].isdigit()]
        kinds = Counter(ln.split('"')[1].lower() for ln in client if '"' in ln)
        return {
            "accept_100k_s": round(accept_s, 2), "drain_1k_s": round(drain_s, 2),
            "round_trips_per_record": round(len(client) / 1000, 2),
            "commands": dict(kinds.most_common(12)),
        }  # fmt: skip
    finally:
        idle.stop()
        stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="all", choices=(*SCENARIOS, "costs", "all"))
    opts = parser.parse_args(argv)
    names = [*SCENARIOS, "costs"] if opts.scenario == "all" else [opts.scenario]
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"sluice-{name}-") as tmp:
            if name == "costs":
                doc = costs(Path(tmp))
                print(json.dumps(doc, indent=2))
            else:
                doc = asyncio.run(run_scenario(name, Path(tmp)))
                print(f"\n## {doc['title']}\n")
                print(phase_table(doc))
                print("\n".join(summary_lines(doc)))
                png = RESULTS / f"batch-{name}-{stamp}.png"
                print(plot(doc, png) or f"plot: {png}")
        (RESULTS / f"batch-{name}-{stamp}.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Incident shapes ``sweep_draw`` never draws, each against direct-to-simulator in one run.

    python bench/sweep_edges.py --case slowdown [--case ...] [--duration 40] [--keep DIR]
    python bench/sweep_edges.py --list

Reuses the sweep's machinery (policy template, simulator, Sluice fleet on one Redis, the
open-loop driver) and adds what its draw lacks: several timed simulator patches (latency,
quotas, faults), uneven traffic over instances, clients that retry 429s themselves, a P0
workload on the fallback model, long calls, bursts. Per case and system it prints P0
success and latency (p50/p99 of answered calls), Bedrock throttles, calls served per class,
and "inversions": lower-class calls sent after a P0 call and answered by the same model
while that P0 call was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from common import (
    RESULTS_DIR,
    CpuLayout,
    install_cleanup,
    log,
    percentile,
    processes,
    render_table,
    start_redis,
)
from scenario_load import (
    Driver,
    Outcome,
    Phase,
    Stream,
    _error_label,
    _send_aiohttp,
    http_call,
    request_body,
)
from scenarios import check_stack, start_simulator, start_sluices
from sweep_draw import HAIKU, SONNET, SweepScenario, _policy

CALL_S = 0.5


@dataclass
class Case:
    name: str
    what: str
    policy: dict[str, Any]
    sim: dict[str, Any]
    phases: tuple[Phase, ...]
    streams: tuple[Stream, ...]
    #: (seconds into the run, simulator config patch)
    patches: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    instances: int = 3
    #: Relative share of the traffic each instance gets (None: even).
    weights: tuple[int, ...] | None = None
    #: Open-loop callers retry a 429/503 at once this many times (ignoring Retry-After).
    client_retries: int = 0


def _sim(sonnet: dict[str, Any], haiku: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "latency_scale": 0.3,
        "records_kept": 0,
        "seed": 7,
        "models": {
            SONNET: {"quotas": sonnet},
            HAIKU: {"quotas": haiku or {"concurrency": 80}},
        },
    }


def _streams(rate: float, p0: float, p1: float, workers: int = 3, **kw: Any) -> tuple[Stream, ...]:
    p2 = 1.0 - p0 - p1
    return (
        Stream("orders", "P0", SONNET, rate=rate * p0, output_tokens=40),
        Stream("recommend", "P1", SONNET, rate=rate * p1, output_tokens=40),
        Stream(
            "browse",
            "P2",
            SONNET,
            rate=rate * p2,
            output_tokens=kw.get("p2_tokens", 40),
            prompts=30,
        ),
        Stream("analytics", "batch", SONNET, workers=workers, output_tokens=120),
    )


def _flat() -> tuple[Phase, ...]:
    return (Phase("all", 1.0, 1.0),)


def _surge(factor: float = 2.5) -> tuple[Phase, ...]:
    return (Phase("normal", 0.25, 1.0), Phase("surge", 0.35, factor), Phase("after", 0.4, 1.0))


def _sonnet_latency(scale: float) -> dict[str, Any]:
    return {"models": {SONNET: {"latency": {"latency_scale": scale}}}}


def _quota(q: dict[str, Any]) -> dict[str, Any]:
    return {"models": {SONNET: {"quotas": q}}}


def _faults(f: dict[str, Any]) -> dict[str, Any]:
    return {"models": {SONNET: {"faults": f}}}


def slowdown(d: float) -> Case:
    # Quota far above need; Bedrock's latency climbs 6x for a while, no throttle.
    p = _policy(20, 120)
    return Case(
        "slowdown",
        "conc 100, demand 8 eq; Sonnet latency x6 at 25%..70%",
        p,
        _sim({"concurrency": 100}),
        _flat(),
        _streams(16.0, 0.3, 0.3),
        [(0.25 * d, _sonnet_latency(1.8)), (0.7 * d, _sonnet_latency(0.3))],
    )


def slowdown_learned(d: float) -> Case:
    # The pool learned a quota early (a throttle at 10); then the quota is raised and
    # latency climbs: the limit is held at the learned 10 while need is 30.
    p = _policy(30, 120)
    return Case(
        "slowdown-learned",
        "conc 10 -> 100 at 20%, latency x4 at 30%..75%, demand 6 eq",
        p,
        _sim({"concurrency": 10}),
        (Phase("normal", 0.1, 1.0), Phase("surge", 0.1, 2.5), Phase("after", 0.8, 1.0)),
        _streams(12.0, 0.4, 0.3),
        [
            (0.2 * d, _quota({"concurrency": 100})),
            (0.3 * d, _sonnet_latency(1.2)),
            (0.75 * d, _sonnet_latency(0.3)),
        ],
    )


def cut_restore(d: float) -> Case:
    return Case(
        "cut-restore",
        "conc 20 -> 4 at 25% -> 20 at 55%, demand 10 -> 25 eq",
        _policy(20, 60),
        _sim({"concurrency": 20}),
        _surge(2.5),
        _streams(20.0, 0.15, 0.3),
        [(0.25 * d, _quota({"concurrency": 4})), (0.55 * d, _quota({"concurrency": 20}))],
    )


def p0_on_fallback(d: float) -> Case:
    # P0 FAQ on Haiku; Haiku's quota (6) is near P0-haiku's own need; Sonnet throttles
    # and P1/P2 go down their chain onto Haiku. Direct: nothing is degraded onto Haiku.
    p = _policy(16, 60)
    p["workloads"]["faq"] = {"priority": "P0", "models": ["haiku"], "max_wait_ms": 2000}
    streams = (*_streams(24.0, 0.1, 0.3), Stream("faq", "P0", HAIKU, rate=6.0))
    return Case(
        "p0-on-fallback",
        "sonnet conc 8, haiku conc 6 (P0 faq needs ~2), demand 12 -> 30 eq",
        p,
        _sim({"concurrency": 8}, {"concurrency": 6}),
        _surge(2.5),
        streams,
    )


def p0_on_fallback_adaptive(d: float) -> Case:
    c = p0_on_fallback(d)
    h = c.policy["models"]["haiku"]
    h["adaptive"] = {"floor": 2, "ceiling": 80, "initial": 40, "target_p99_ms": 3000}
    h["breaker"] = {"window_seconds": 10, "min_requests": 20, "open_seconds": 5}
    return replace(c, name="p0-on-fallback-adaptive", what=c.what + "; haiku adaptive")


def tiny(d: float) -> Case:
    return Case(
        "tiny",
        "conc 2, demand 1.5 -> 4 eq",
        _policy(4, 8),
        _sim({"concurrency": 2}),
        _surge(2.5),
        _streams(3.0, 0.3, 0.3, workers=2),
    )


def tiny_rpm(d: float) -> Case:
    return Case(
        "tiny-rpm",
        "rpm 12 (burst 5 s), demand 0.15 -> 0.4 req/s",
        _policy(4, 8),
        _sim({"requests_per_minute": 12, "burst_seconds": 5}),
        _surge(2.5),
        _streams(0.2, 0.4, 0.3, workers=1),
    )


def huge(d: float) -> Case:
    return Case(
        "huge",
        "conc 150, demand 60 -> 180 eq, start 20",
        _policy(20, 450),
        _sim({"concurrency": 150}),
        _surge(3.0),
        _streams(120.0, 0.15, 0.3, workers=4),
    )


def p0_over(d: float) -> Case:
    return Case(
        "p0-over",
        "conc 6, P0 alone 12 eq",
        _policy(6, 20),
        _sim({"concurrency": 6}),
        _flat(),
        _streams(30.0, 0.8, 0.1),
    )


def uneven(d: float) -> Case:
    return Case(
        "uneven-4",
        "4 instances, 85/5/5/5 traffic; conc 12 -> 6 at 40%, demand 8 -> 20",
        _policy(12, 40),
        _sim({"concurrency": 12}),
        _surge(2.5),
        _streams(16.0, 0.2, 0.3),
        [(0.4 * d, _quota({"concurrency": 6}))],
        instances=4,
        weights=(17, 1, 1, 1),
    )


def bursty(d: float) -> Case:
    phases = []
    for _ in range(8):
        phases += [Phase("burst", 0.025, 8.0), Phase("calm", 0.1, 0.4)]
    return Case(
        "bursty",
        "conc 12, 1 s bursts at 8x every 5 s",
        _policy(12, 40),
        _sim({"concurrency": 12}),
        tuple(phases),
        _streams(12.0, 0.2, 0.3),
    )


def long_streams(d: float) -> Case:
    # P2 calls of 2000 output tokens (~10 s each) hold slots; P0 short calls.
    return Case(
        "long-calls",
        "conc 16, P2 calls ~10 s (2000 tokens), P0 short, demand ~20 eq",
        _policy(16, 48),
        _sim({"concurrency": 16}),
        _flat(),
        _streams(6.0, 0.4, 0.2, p2_tokens=2000),
    )


def client_retry(d: float) -> Case:
    return Case(
        "client-retry",
        "conc 8, demand 8 -> 20 eq, callers retry 429 5x at once",
        _policy(8, 30),
        _sim({"concurrency": 8}),
        _surge(2.5),
        _streams(16.0, 0.2, 0.3),
        client_retries=5,
    )


def random_throttles(d: float) -> Case:
    # Bedrock throttles 5 % of calls at random (regional pressure), quota far above need.
    return Case(
        "random-throttles",
        "conc 100, demand 8 eq, 5% of calls throttled at random",
        _policy(20, 120),
        _sim({"concurrency": 100}),
        _flat(),
        _streams(16.0, 0.3, 0.3),
        [(0.2 * d, _faults({"throttle_rate": 0.05}))],
    )


def random_503(d: float) -> Case:
    return Case(
        "random-503",
        "conc 100, demand 8 eq, 10% of calls 503 at random",
        _policy(20, 120),
        _sim({"concurrency": 100}),
        _flat(),
        _streams(16.0, 0.3, 0.3),
        [(0.2 * d, _faults({"unavailable_rate": 0.10}))],
    )


def many_workloads(d: float) -> Case:
    p = _policy(12, 40)
    streams = []
    weights = [8, 4, 2, 1, 1, 1, 0.5, 0.5]
    prios = ["P2", "P1", "P0", "P2", "P1", "P0", "P2", "batch"]
    for i, (w, pr) in enumerate(zip(weights, prios, strict=True)):
        wl = f"w{i}"
        spec: dict[str, Any] = {"priority": pr}
        if pr in ("P1", "P2"):
            spec["degrade"] = ["haiku"]
        if pr == "P0":
            spec["max_wait_ms"] = 2000
        p["workloads"][wl] = spec
        if pr == "batch":
            streams.append(Stream(wl, pr, SONNET, workers=3, output_tokens=120))
        else:
            streams.append(Stream(wl, pr, SONNET, rate=1.2 * w, output_tokens=40))
    return Case(
        "many-workloads",
        "8 workloads, skewed 8:4:2:1:1:1:.5 + batch; conc 10 -> 5 at 45%",
        p,
        _sim({"concurrency": 10}),
        _surge(2.0),
        tuple(streams),
        [(0.45 * d, _quota({"concurrency": 5}))],
    )


CASES: tuple[Callable[[float], Case], ...] = (
    slowdown,
    slowdown_learned,
    cut_restore,
    p0_on_fallback,
    p0_on_fallback_adaptive,
    tiny,
    tiny_rpm,
    huge,
    p0_over,
    uneven,
    bursty,
    long_streams,
    client_retry,
    random_throttles,
    random_503,
    many_workloads,
)


def build(name: str, duration: float) -> Case:
    for fn in CASES:
        c = fn(duration)
        if c.name == name:
            return c
    raise SystemExit(f"unknown case {name}: see --list")


@dataclass
class EdgeDriver(Driver):
    retries: int = 0
    attempts: int = 0

    async def _one(self, session: Any, stream: Stream, n: int, t_sched: float, t0: float) -> Any:
        loop = asyncio.get_running_loop()
        base, body = next(self._rr), request_body(stream, n)
        tries = 0
        while True:
            self.attempts += 1
            status, headers, error = await _send_aiohttp(session, base, stream, body)
            if status not in (429, 503) or stream.workers or tries >= self.retries:
                break
            tries += 1
        outcome = Outcome(
            t_sched,
            stream.priority,
            stream.workload,
            "aiohttp",
            status,
            loop.time() - t0 - t_sched,
            headers.get("x-sluice-degraded"),
            status in (429, 503) and "retry-after" in headers,
            error or _error_label(status, headers),
        )
        self.outcomes.append(outcome)
        return outcome


async def _patches(sim_url: str, case: Case, t0: float) -> None:
    loop = asyncio.get_running_loop()
    for at, patch in sorted(case.patches, key=lambda x: x[0]):
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        await asyncio.to_thread(
            http_call, "POST", sim_url + "/_sim/config", json.dumps(patch).encode()
        )
        log(f"  t={loop.time() - t0:.1f}s patch {json.dumps(patch)[:120]}")


async def _drive(driver: EdgeDriver, sim_url: str, instances: list[str], case: Case) -> Any:
    t0 = asyncio.get_running_loop().time()
    samples, _ = await asyncio.gather(driver.run(sim_url, instances), _patches(sim_url, case, t0))
    return samples


def run_one(system: str, case: Case, duration: float, keep: Path | None) -> dict[str, Any]:
    layout = CpuLayout(None, None)
    with (
        tempfile.TemporaryDirectory(prefix=f"sluice-edge-{system}-") as tmp,
        processes() as started,
    ):
        workdir = keep / f"{case.name}-{system}" if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        sc = SweepScenario(
            case.name,
            case.what,
            case.phases,
            case.streams,
            policy_file=workdir / "policy.yaml",
            sim_file=workdir / "sim.yaml",
        )
        sc.policy_file.write_text(yaml.safe_dump(case.policy, sort_keys=False))
        sc.sim_file.write_text(yaml.safe_dump(case.sim, sort_keys=False))
        sim_url = start_simulator(sc, layout, workdir, started)
        targets = [sim_url]
        if system == "sluice":
            redis, redis_url = start_redis(workdir, layout)
            started.append(redis)
            targets = start_sluices(
                sc, case.instances, sim_url, redis_url, layout, workdir, started
            )
        check_stack(sc, targets)
        http_call("POST", sim_url + "/_sim/reset", b"{}")
        instances = targets if system == "sluice" else []
        weighted = targets
        if case.weights and system == "sluice":
            weighted = [t for t, w in zip(targets, case.weights, strict=True) for _ in range(w)]
        driver = EdgeDriver(sc, weighted, duration, 1.0, 0.0, None, 7, retries=case.client_retries)
        log(f"{case.name} / {system}: {duration:g} s, {case.what}")
        samples = asyncio.run(_drive(driver, sim_url, instances, case))
        stats = json.loads(http_call("GET", sim_url + "/_sim/stats"))["models"]
    return {
        "outcomes": driver.outcomes,
        "samples": samples,
        "sim": stats,
        "attempts": driver.attempts,
    }


def _served_model(case: Case, o: Outcome) -> str | None:
    if o.status != 200 or o.degraded not in (None, "downgrade"):
        return None
    model = next(s.model_id for s in case.streams if s.workload == o.workload)
    return HAIKU if o.degraded == "downgrade" else model


def _inversions(case: Case, outs: list[Outcome]) -> int:
    """Lower-class calls sent while a P0 call waited, answered by the P0 call's model,
    when that P0 call was refused in the end."""
    rank = {"P0": 0, "P1": 1, "P2": 2, "batch": 3}
    model_of = {s.workload: s.model_id for s in case.streams}
    failed = [o for o in outs if o.priority == "P0" and o.status != 200]
    lower = [(o, _served_model(case, o)) for o in outs if rank[o.priority] > 0]
    n = 0
    for f in failed:
        m = model_of[f.workload]
        n += any(f.t <= o.t <= f.t + f.latency_s and sm == m for o, sm in lower)
    return n


def summarize(case: Case, run: dict[str, Any]) -> dict[str, Any]:
    outs: list[Outcome] = run["outcomes"]
    p0 = [o for o in outs if o.priority == "P0"]
    ok = sorted(o.latency_s for o in p0 if o.status == 200)
    errors: dict[str, int] = {}
    for o in p0:
        if o.status != 200:
            k = o.error or str(o.status)
            errors[k] = errors.get(k, 0) + 1
    by_class = {}
    for c in ("P0", "P1", "P2", "batch"):
        xs = [o for o in outs if o.priority == c]
        by_class[c] = [sum(_served_model(case, o) is not None for o in xs), len(xs)]
    by_workload = {}
    for s in case.streams:
        xs = [o for o in outs if o.workload == s.workload]
        by_workload[s.workload] = [sum(_served_model(case, o) is not None for o in xs), len(xs)]
    sim = {
        m.split(".")[-1][:18]: {k: v.get(k) for k in ("requests", "throttled", "peak_concurrency")}
        for m, v in run["sim"].items()
        if v.get("requests")
    }
    return {
        "p0_ok": sum(o.status == 200 for o in p0) / len(p0) if p0 else None,
        "p0_n": len(p0),
        "p0_p50": percentile(ok, 50),
        "p0_p99": percentile(ok, 99),
        "p0_errors": errors,
        "served": by_class,
        "by_workload": by_workload,
        "sim": sim,
        "inversions": _inversions(case, outs),
        "attempts": run["attempts"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--case", action="append", default=[])
    p.add_argument("--list", action="store_true")
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--keep", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    opts = p.parse_args(argv)
    if opts.list:
        for fn in CASES:
            c = fn(opts.duration)
            print(f"{c.name:26} {c.what}")
        return 0
    install_cleanup()
    rows, doc = [], {}
    for name in opts.case:
        case = build(name, opts.duration)
        res = {
            s: summarize(case, run_one(s, case, opts.duration, opts.keep))
            for s in ("sluice", "direct")
        }
        doc[name] = {"what": case.what, **res}
        s, dd = res["sluice"], res["direct"]

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{x:.1%}"

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x * 1000:.0f}"

        row = [
            name,
            f"{pct(s['p0_ok'])}/{pct(dd['p0_ok'])}",
            f"{ms(s['p0_p99'])}/{ms(dd['p0_p99'])}",
            f"{ms(s['p0_p50'])}/{ms(dd['p0_p50'])}",
            " ".join(f"{c}:{s['served'][c][0]}/{dd['served'][c][0]}" for c in s["served"]),
            json.dumps({k: v["throttled"] for k, v in s["sim"].items()}),
            json.dumps({k: v["throttled"] for k, v in dd["sim"].items()}),
            str(s["inversions"]),
            json.dumps(s["p0_errors"]),
        ]
        rows.append(row)
        print(json.dumps(doc[name], default=str), flush=True)
        print(
            render_table(
                [
                    "case",
                    "P0 ok S/D",
                    "P0 p99 ms S/D",
                    "p50 S/D",
                    "served S/D",
                    "thr S",
                    "thr D",
                    "inv",
                    "P0 errors S",
                ],
                [row],
            ),
            flush=True,
        )
    print(
        render_table(
            [
                "case",
                "P0 ok S/D",
                "P0 p99 ms S/D",
                "p50 S/D",
                "served S/D",
                "thr S",
                "thr D",
                "inv",
                "P0 errors S",
            ],
            rows,
        )
    )
    out = (
        opts.out
        or RESULTS_DIR / f"sweep-edges-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    )
    out.write_text(json.dumps(doc, indent=1, default=str))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

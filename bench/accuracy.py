"""Rate accuracy of a Sluice fleet sharing one Redis, and Redis calls per admitted request.

    python bench/accuracy.py [--duration 60] [--instances 4] [--rpm 6000] [--burst 20]
                             [--configs rate,rate+concurrency] [--connections 64] [--reps 1]

Per configuration (``CONFIGS``: a policy of ``bench/policies/``) and repetition, fresh processes:
one ``redis-server``, the Bedrock simulator at ``latency_scale: 0`` and ``--instances`` Sluice
processes on that Redis. ``--connections`` closed-loop connections, spread over the instances
(one wrk per instance, with a Lua ``response`` hook counting status and ``x-amzn-ErrorType``),
drive the one pool far above its rate for ``--duration`` seconds. Then:

* admitted = calls the simulator received (``/_sim/stats``, reset just before the load);
  expected = ``burst + rate x elapsed``, elapsed = the generators' send window (wrk's own);
  error = admitted / expected - 1 (issue target: within +-1%);
* refusals: share of all answers, and how many were 429 ``ThrottlingException`` with
  ``Retry-After`` (anything else is listed);
* Redis: ``INFO commandstats`` before/after; script calls (``evalsha`` and friends) divided by
  admitted and by all requests (issue target: <= 2 per admitted request).

Sluice's own counters (``/metrics``: admitted, refused by limit, store errors, fail-open) and the
admission span from the access logs (first to last admitted answer) go to the JSON as a
cross-check. Output: a markdown table on stdout, ``bench/results/accuracy-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml
from common import (
    INVOKE_PATH,
    MODEL_ID,
    RESULTS_DIR,
    CpuLayout,
    CpuMeter,
    Interference,
    ManagedProcess,
    default_layout,
    fmt,
    free_port,
    install_cleanup,
    log,
    median,
    processes,
    render_table,
    start_redis,
    timestamp,
    wait_until_quiet,
)
from loadgen import _wrk_script
from passthrough import check_once
from systems import AWS_ENV, POLICIES, ProxyContext, _sluice, start_upstream

#: Configuration name -> policy template (``--rpm`` / ``--burst`` / ``--concurrency`` override).
CONFIGS: dict[str, Path] = {
    "rate": POLICIES / "accuracy.yaml",
    "rate+concurrency": POLICIES / "accuracy-concurrency.yaml",
}
POOL = "haiku"
#: Commands that run a server-side script; each is one round trip of an admission store.
SCRIPT_COMMANDS = ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro")

# --------------------------------------------------------------------------------------------
# Load: one wrk per instance, counting every answer by status and error type
# --------------------------------------------------------------------------------------------

# Appended to loadgen's POST script: count answers per "status[ errortype][ +retry]" in each
# thread, then print them after loadgen's own WRKJSON line.
_WRK_COUNT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body)
  local key = tostring(status)
  if status ~= 200 then
    local kind, retry = "-", ""
    for name, value in pairs(headers) do
      local lname = string.lower(name)
      if lname == "x-amzn-errortype" then kind = string.match(value, "^[^:]*")
      elseif lname == "retry-after" then retry = " +retry-after" end
    end
    key = key .. " " .. kind .. retry
  end
  counts[key] = (counts[key] or 0) + 1
end
local loadgen_done = done
done = function(summary, latency, requests)
  loadgen_done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get("counts")) do total[key] = (total[key] or 0) + n end
  end
  local parts = {}
  for key, n in pairs(total) do table.insert(parts, string.format('"%s":%d', key, n)) end
  io.write("COUNTJSON {" .. table.concat(parts, ",") .. "}\n")
end
"""


def wrk_script(workdir: Path) -> Path:
    """loadgen's boto3-shaped POST script plus the answer counter above."""
    script = _wrk_script(workdir, INVOKE_PATH)
    script.write_text(script.read_text() + _WRK_COUNT)
    return script


def run_wrk(
    bases: list[str], opts: argparse.Namespace, layout: CpuLayout, workdir: Path
) -> list[dict[str, Any]]:
    """``--connections`` spread over the instances, one single-threaded wrk each, all at once."""
    script = wrk_script(workdir)
    n = len(bases)
    shares = [opts.connections // n + (i < opts.connections % n) for i in range(n)]
    gens = []
    for i, (base, conns) in enumerate(zip(bases, shares, strict=True)):
        argv = [
            *layout.prefix("rest"),
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(opts.duration))}s",
            "--timeout=10s",
            "-s",
            str(script),
            base + INVOKE_PATH,
        ]
        gens.append(ManagedProcess(f"wrk-{i}", argv, log_dir=workdir))
    results = []
    try:
        for gen in gens:
            gen.popen.wait(opts.duration + 60)
    finally:
        for gen in gens:
            gen.stop()
    for gen in gens:
        out = gen.log_path.read_text(errors="replace")
        main = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
        counts = re.search(r"^COUNTJSON (\{.*\})$", out, re.M)
        if gen.popen.returncode != 0 or main is None or counts is None:
            raise RuntimeError(f"{gen.name} failed ({gen.popen.returncode}):\n{out[-2000:]}")
        raw = orjson.loads(main.group(1))
        results.append(
            {
                "connections": shares[len(results)],
                "duration_s": raw["duration_us"] / 1e6,
                "requests": raw["requests"],
                "socket_errors": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
                "answers": orjson.loads(counts.group(1)),
                "latency_ms": {"p50": raw["p50_us"] / 1000, "p99": raw["p99_us"] / 1000},
            }
        )
    return results


# --------------------------------------------------------------------------------------------
# What the simulator, Redis and Sluice say
# --------------------------------------------------------------------------------------------


def _http(method: str, url: str) -> bytes:
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def sim_requests(sim_url: str) -> dict[str, int]:
    """The simulator's counters for the benchmark's model."""
    stats = orjson.loads(_http("GET", sim_url + "/_sim/stats"))["models"][MODEL_ID]
    return {k: int(v) for k, v in stats.items()}


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (``INFO commandstats``)."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def script_split(calls: dict[str, int], script_calls: int) -> dict[str, int]:
    """Script calls by script, inferred from the commands the scripts run inside Redis.

    ``INFO commandstats`` counts commands a script runs too. With these policies (no token
    limits, no waiting, no adaptivity) only admit.lua runs HMGET (once per call; settle.lua
    reads the pool hash only to refund tokens) and only settle.lua runs HGET (once per call,
    on its stats ring); the rest are extend.lua (heartbeats of held leases). Keep in step
    with ``proxy/admission/scripts/``: ``other`` going negative means the inference broke.
    """
    admit, settle = calls.get("hmget", 0), calls.get("hget", 0)
    return {"admit": admit, "settle": settle, "other": script_calls - admit - settle}


_METRIC_LINE = re.compile(r"^(sluice_\w+_total)(\{[^}]*\})? (\S+)$", re.M)
_WANTED = (
    "sluice_admitted_total",
    "sluice_refused_total",
    "sluice_rejections_total",
    "sluice_store_errors_total",
    "sluice_fail_open_total",
)


def sluice_counters(bases: list[str]) -> Counter[str]:
    """The counters above summed over instances, keyed ``name{labels}``."""
    total: Counter[str] = Counter()
    for base in bases:
        for name, labels, value in _METRIC_LINE.findall(_http("GET", base + "/metrics").decode()):
            if name in _WANTED:
                total[name + labels] += int(float(value))
    return total


def admission_span(procs: list[ManagedProcess], since: float) -> dict[str, Any]:
    """First and last admitted answer (access-log ``ts``, 1 ms) after ``since``, all instances."""
    first, last, count = None, None, 0
    for proc in procs:
        for line in proc.log_path.read_bytes().splitlines():
            if not line.startswith(b"{") or b'"status":200' not in line:
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            ts = rec.get("ts")
            if rec.get("status") != 200 or not isinstance(ts, float | int) or ts < since:
                continue
            count += 1
            first = ts if first is None else min(first, ts)
            last = ts if last is None else max(last, ts)
    span = None if first is None or last is None else last - first
    return {"first": first, "last": last, "admitted": count, "span_s": span}


# --------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------


def write_policy(config: str, opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The configuration's policy with the command line's numbers, written to ``workdir``."""
    policy = yaml.safe_load(CONFIGS[config].read_text())
    pool = policy["models"][POOL]
    pool["requests_per_minute"] = opts.rpm
    if opts.burst is not None:
        pool["burst_requests"] = opts.burst
    if opts.concurrency is not None and "concurrency" in pool:
        pool["concurrency"] = opts.concurrency
    (workdir / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    return policy


def measure(config: str, opts: argparse.Namespace, layout: CpuLayout) -> dict[str, Any]:
    """Fresh redis, simulator and fleet; one load run; every figure of the configuration."""
    with (
        tempfile.TemporaryDirectory(prefix=f"sluice-accuracy-{config}-") as tmp,
        processes() as started,
    ):
        workdir = Path(tmp)
        policy = write_policy(config, opts, workdir)
        pool = policy["models"][POOL]
        rate = pool["requests_per_minute"] / 60.0
        burst = pool.get("burst_requests", rate * 10)  # the policy default: 10 s of refill

        red, redis_url = start_redis(workdir, layout)
        started.append(red)
        sim, sim_url = start_upstream("simulator", 0.0, "rest", layout, workdir)
        started.append(sim)
        fleet, bases = [], []
        for i in range(opts.instances):
            port = free_port()
            argv = _sluice(workdir / "policy.yaml", redis=True)(
                ProxyContext(port, sim_url, redis_url)
            )
            proc = ManagedProcess(
                f"sluice-{i}", [*layout.prefix("sut"), *argv], log_dir=workdir, env=AWS_ENV
            )
            started.append(proc)
            fleet.append(proc)
            bases.append(f"http://127.0.0.1:{port}")
        for proc, base in zip(fleet, bases, strict=True):
            proc.wait_http(base + "/healthz", timeout=60)
        for base in bases:  # one real call each: a broken stack fails loudly, before the clock
            check_once(base + INVOKE_PATH)

        client = redis.Redis.from_url(redis_url)
        # The checks took tokens: let the bucket refill to its full burst before the clock.
        time.sleep(max(1.0, 2 * burst / rate))
        _http("POST", sim_url + "/_sim/reset")
        cmd_before, sluice_before = commandstats(client), sluice_counters(bases)
        sut_cpu, noise = CpuMeter(fleet), Interference(layout)
        sut_cpu.start()
        noise.start()
        since = time.time()
        gens = run_wrk(bases, opts, layout, workdir)
        sut_cpu.stop()
        interference = noise.stop(sut_cpu.seconds)
        time.sleep(1.0)  # settles are queued, not awaited: let the last batches land
        sim_after = sim_requests(sim_url)
        cmd_after, sluice_after = commandstats(client), sluice_counters(bases)
        span = admission_span(fleet, since)
        client.close()
        for proc in started:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} died during the run:\n{proc.log_tail()}")

    answers: Counter[str] = Counter()
    for gen in gens:
        answers.update(gen["answers"])
    elapsed = max(g["duration_s"] for g in gens)
    admitted = sim_after["requests"]
    expected = burst + rate * elapsed
    requests = sum(answers.values())
    ok = answers.get("200", 0)
    refusals = requests - ok
    throttles = sum(n for k, n in answers.items() if k.startswith("429 ThrottlingException"))
    with_retry = sum(n for k, n in answers.items() if k != "200" and k.endswith("+retry-after"))
    calls = {c: cmd_after.get(c, 0) - cmd_before.get(c, 0) for c in cmd_after}
    calls = {c: n for c, n in sorted(calls.items()) if n}
    script_calls = sum(calls.get(c, 0) for c in SCRIPT_COMMANDS)
    split = script_split(calls, script_calls)
    sluice = {k: sluice_after[k] - sluice_before.get(k, 0) for k in sluice_after}
    return {
        "config": config,
        "policy": policy,
        "rate_per_s": rate,
        "burst": burst,
        "elapsed_s": elapsed,
        "admitted": admitted,
        "expected": expected,
        "error": admitted / expected - 1,
        "admission_span": {
            **span,
            "expected": None if span["span_s"] is None else burst + rate * span["span_s"],
        },
        "requests": requests,
        "offered_rps": requests / elapsed,
        "refusals": refusals,
        "refused_share": refusals / requests if requests else None,
        "refusals_429_throttling": throttles,
        "refusals_with_retry_after": with_retry,
        "answers": dict(answers),
        "socket_errors": sum(g["socket_errors"] for g in gens),
        "simulator": sim_after,
        "redis_calls": calls,
        "script_calls": script_calls,
        "script_calls_per_admitted": script_calls / admitted if admitted else None,
        "script_calls_per_request": script_calls / requests if requests else None,
        "script_split": split,
        "admit_calls_per_request": split["admit"] / requests if requests else None,
        "settle_calls_per_admitted": split["settle"] / admitted if admitted else None,
        "sluice_counters": {k: v for k, v in sorted(sluice.items()) if v},
        "generators": gens,
        "sut_cpu_s": sut_cpu.seconds,
        "interference": interference,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

HEADERS = [
    "Config",
    "Elapsed s",
    "Offered req/s",
    "Admitted",
    "Expected",
    "Error",
    "Refused",
    "429 Throttling",
    "Script calls",
    "admit / settle / other",
    "per admitted",
    "per request",
    "settles per admitted",
    "admits per request",
]


def summarize(runs: list[dict[str, Any]], configs: list[str]) -> dict[str, dict[str, Any]]:
    """Medians over repetitions, per configuration."""
    out = {}
    for config in configs:
        ok = [r for r in runs if r["config"] == config and "error_text" not in r]
        out[config] = {
            key: median(r[key] for r in ok)
            for key in (
                "elapsed_s",
                "offered_rps",
                "admitted",
                "expected",
                "error",
                "refused_share",
                "script_calls",
                "script_calls_per_admitted",
                "script_calls_per_request",
                "settle_calls_per_admitted",
                "admit_calls_per_request",
            )
        }
        for part in ("admit", "settle", "other"):
            out[config][f"{part}_calls"] = median(r["script_split"][part] for r in ok)
        out[config]["refusals"] = sum(r["refusals"] for r in ok)
        out[config]["refusals_429_throttling"] = sum(r["refusals_429_throttling"] for r in ok)
        out[config]["reps"] = len(ok)
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    rows = []
    for config, s in summary.items():
        if not s["reps"]:
            rows.append([config, *["failed"] * (len(HEADERS) - 1)])
            continue
        rows.append(
            [
                config,
                fmt(s["elapsed_s"], ".2f"),
                fmt(s["offered_rps"]),
                fmt(s["admitted"]),
                fmt(s["expected"]),
                fmt(None if s["error"] is None else s["error"] * 100, "+.2f", "%"),
                fmt(None if s["refused_share"] is None else s["refused_share"] * 100, ".1f", "%"),
                f"{s['refusals_429_throttling']:,} / {s['refusals']:,}",
                fmt(s["script_calls"]),
                " / ".join(fmt(s[f"{part}_calls"]) for part in ("admit", "settle", "other")),
                fmt(s["script_calls_per_admitted"], ".2f"),
                fmt(s["script_calls_per_request"], ".3f"),
                fmt(s["settle_calls_per_admitted"], ".2f"),
                fmt(s["admit_calls_per_request"], ".3f"),
            ]
        )
    return render_table(HEADERS, rows)


def notes(runs: list[dict[str, Any]], max_noise: float) -> list[str]:
    out = []
    for r in runs:
        tag = f"{r['config']} rep {r['rep'] + 1}"
        if "error_text" in r:
            out.append(f"{tag}: FAILED: {r['error_text'].splitlines()[0]}")
            continue
        if abs(r["error"]) > 0.01:
            out.append(f"{tag}: admitted {r['admitted']:,} is {r['error']:+.2%} off expected")
        odd = {
            k: n for k, n in r["answers"].items() if k != "200" and "ThrottlingException" not in k
        }
        if odd or r["socket_errors"]:
            out.append(
                f"{tag}: answers other than 200/429 throttles: {odd}, socket errors "
                f"{r['socket_errors']}"
            )
        if r["refusals_with_retry_after"] != r["refusals"]:
            out.append(
                f"{tag}: {r['refusals'] - r['refusals_with_retry_after']:,} refusals "
                "without Retry-After"
            )
        health = {
            k: v
            for k, v in r["sluice_counters"].items()
            if k.startswith(("sluice_store_errors", "sluice_fail_open"))
        }
        if health:
            out.append(f"{tag}: Sluice could not always decide: {health}")
        span = r["admission_span"]
        if span["expected"]:
            out.append(
                f"{tag}: access-log admission span {span['span_s']:.2f} s -> expected "
                f"{span['expected']:,.0f}, admitted {r['admitted']:,} "
                f"({r['admitted'] / span['expected'] - 1:+.2%}); offered "
                f"{r['offered_rps'] / r['rate_per_s']:.0f}x the rate"
            )
        if r["script_split"]["other"] < 0:
            out.append(f"{tag}: admit/settle split inferred wrongly: {r['redis_calls']}")
        if r["interference"] is not None and r["interference"] > max_noise:
            out.append(f"{tag}: other processes took {r['interference']:.0%} of the fleet's CPU")
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per run")
    p.add_argument("--instances", type=int, default=4, help="Sluice processes on one Redis")
    p.add_argument("--rpm", type=int, default=6000, help="the pool's requests_per_minute")
    p.add_argument("--burst", type=int, default=None, help="burst_requests (default: policy's)")
    p.add_argument(
        "--concurrency", type=int, default=None, help="pool concurrency of rate+concurrency"
    )
    p.add_argument("--connections", type=int, default=64, help="spread over the instances")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"from: {', '.join(CONFIGS)}")
    p.add_argument("--reps", type=int, default=1, help="repetitions (medians reported)")
    p.add_argument("--sut-cpus", default=None, help="taskset list for the Sluice instances")
    p.add_argument("--rest-cpus", default=None, help="taskset list for wrk/simulator/redis")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="wait for a quiet machine")
    p.add_argument("--max-noise", type=float, default=0.2, help="flag runs noisier than this")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    opts = p.parse_args(argv)
    opts.configs = [c.strip() for c in opts.configs.split(",") if c.strip()]
    unknown = [c for c in opts.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    if shutil.which("wrk") is None:
        p.error("needs wrk (apt-get install -y wrk): it counts answers by status and error type")
    if opts.instances < 1 or opts.connections < opts.instances:
        p.error("needs at least one instance and one connection per instance")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    install_cleanup()
    layout = default_layout(opts.sut_cpus, opts.rest_cpus)
    log(f"layout: {layout.describe()}")
    runs: list[dict[str, Any]] = []
    for rep in range(opts.reps):
        for config in opts.configs:
            log(
                f"rep {rep + 1}/{opts.reps} {config}: {opts.instances} instances, "
                f"{opts.connections} connections, {opts.duration:g} s ..."
            )
            busy = wait_until_quiet(timeout=opts.quiet_wait)
            try:
                run = measure(config, opts, layout)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError) as exc:
                log(f"  FAILED: {exc}")
                runs.append({"rep": rep, "config": config, "error_text": str(exc)})
                continue
            run.update(rep=rep, machine_busy_before=busy)
            runs.append(run)
            log(
                f"  admitted {run['admitted']:,} vs expected {run['expected']:,.0f} "
                f"({run['error']:+.2%}), {run['offered_rps']:,.0f} req/s offered, "
                f"{run['script_calls_per_admitted']:.2f} script calls per admitted"
            )
    summary = summarize(runs, opts.configs)
    text = table(summary)
    note_lines = notes(runs, opts.max_noise)
    print(text)
    print(
        f"\n{opts.instances} Sluice instances on one redis-server, simulator at latency_scale 0, "
        f"wrk with {opts.connections} connections over the instances; rpm {opts.rpm} "
        f"({opts.rpm / 60:g}/s); duration {opts.duration:g} s, reps {opts.reps} (medians); "
        f"CPU layout: {layout.describe()}"
    )
    for line in note_lines:
        print(f"note: {line}")
    out = opts.out or RESULTS_DIR / f"accuracy-{timestamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "layout": {"sut": layout.sut, "rest": layout.rest},
        "runs": runs,
        "summary": summary,
        "table": text,
        "notes": note_lines,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {out}")
    return 1 if any("error_text" in r for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())

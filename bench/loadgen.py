"""Load generators for Sluice benchmarks; each run prints one JSON object on stdout.

Two shapes of load, because they answer different questions:

``saturate``   closed loop: N connections each send the next request as soon as the previous
               answer arrives, for D seconds. Measures the most a system can serve. Uses wrk
               (C, with a Lua script for the POST) when installed -- a Python generator would be
               slower than the systems it measures -- else several Python processes.
``fixed-rate`` open loop: requests go out on a timetable (R per second) whether or not earlier
               ones have returned, and latency is measured from the *scheduled* send time, so a
               stalled system is charged for the queue it causes (no coordinated omission).
               wrk cannot do a fixed rate, so this is always Python.

    python bench/loadgen.py saturate --url http://127.0.0.1:8080/model/X/invoke -c 64 -d 10
    python bench/loadgen.py fixed-rate --url http://127.0.0.1:8080/model/X/invoke --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp
import orjson
from common import percentile, request_body, request_headers
from yarl import URL

_TIMEOUT_S = 10.0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(coro)


def _ms_summary(seconds: list[float]) -> dict[str, float | None]:
    values = sorted(s * 1000.0 for s in seconds)
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "p999": percentile(values, 99.9),
        "max": values[-1] if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


def _session(limit: int) -> aiohttp.ClientSession:
    # The boto3-like headers carry their own User-Agent; don't let aiohttp add a second one.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S),
        skip_auto_headers=("User-Agent",),
    )


# --------------------------------------------------------------------------------------------
# Closed loop, wrk
# --------------------------------------------------------------------------------------------

_WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def _lua_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrk_script(workdir: Path, path: str) -> Path:
    body_file = workdir / "body.json"
    body_file.write_bytes(request_body())
    lines = [
        'wrk.method = "POST"',
        f"wrk.path = {_lua_str(path)}",  # keep the %3A exactly as boto3 sends it
        f"local f = io.open({_lua_str(str(body_file))}, 'rb'); wrk.body = f:read('*a'); f:close()",
    ]
    lines += [f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in request_headers().items()]
    script = workdir / "post.lua"
    script.write_text("\n".join(lines) + "\n" + _WRK_DONE)
    return script


def saturate_wrk(url: str, connections: int, duration: float, threads: int) -> dict[str, Any]:
    """Run wrk with the POST script and return its summary in our JSON shape."""
    with tempfile.TemporaryDirectory(prefix="sluice-wrk-") as tmp:
        script = _wrk_script(Path(tmp), URL(url, encoded=True).raw_path)
        argv = [
            "wrk",
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"--timeout={int(_TIMEOUT_S)}s",
            "-s",
            str(script),
            url,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    match = re.search(r"^WRKJSON (\{.*\})$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    raw = orjson.loads(match.group(1))
    elapsed = raw["duration_us"] / 1e6
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "generator": "wrk",
        "connections": connections,
        "threads": threads,
        "duration_s": elapsed,
        "requests": raw["requests"],
        "non_2xx": raw["status"],
        "errors": socket_errors,
        "rps": raw["requests"] / elapsed,
        "latency_ms": {
            "p50": raw["p50_us"] / 1000,
            "p90": raw["p90_us"] / 1000,
            "p99": raw["p99_us"] / 1000,
            "mean": raw["mean_us"] / 1000,
            "max": raw["max_us"] / 1000,
        },
    }


# --------------------------------------------------------------------------------------------
# Closed loop, Python (fallback)
# --------------------------------------------------------------------------------------------


async def _saturate_async(
    url: str, connections: int, duration: float, start_at: float
) -> dict[str, Any]:
    body, headers, target = request_body(), request_headers(), URL(url, encoded=True)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    errors = 0
    async with _session(connections) as session:
        await asyncio.sleep(max(0.0, start_at - time.time()))  # all processes start together
        loop = asyncio.get_running_loop()
        begin = perf_counter()
        end = begin + duration

        async def one_connection() -> None:
            nonlocal errors
            while loop.time() < end:
                sent = perf_counter()
                try:
                    async with session.post(target, data=body, headers=headers) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                latencies.append(perf_counter() - sent)

        await asyncio.gather(*(one_connection() for _ in range(connections)))
        elapsed = perf_counter() - begin
    return {
        "statuses": dict(statuses),
        "errors": errors,
        "latencies": latencies,
        "elapsed": elapsed,
    }


def _saturate_process(args: tuple[str, int, float, float]) -> dict[str, Any]:
    return _run(_saturate_async(*args))  # type: ignore[no-any-return]


def saturate_python(url: str, connections: int, duration: float, procs: int) -> dict[str, Any]:
    """Closed loop over ``procs`` processes, each with its share of the connections."""
    procs = max(1, min(procs, connections))
    shares = [connections // procs + (i < connections % procs) for i in range(procs)]
    start_at = time.time() + 0.5 + 0.1 * procs
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_saturate_process, [(url, n, duration, start_at) for n in shares])
    statuses: Counter[int] = Counter()
    for part in parts:
        statuses.update(part["statuses"])
    total = sum(statuses.values())
    elapsed = max(p["elapsed"] for p in parts)
    return {
        "generator": "python",
        "connections": connections,
        "processes": procs,
        "duration_s": elapsed,
        "requests": total,
        "non_2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
        "errors": sum(p["errors"] for p in parts),
        "rps": total / elapsed,
        "latency_ms": _ms_summary([s for p in parts for s in p["latencies"]]),
    }


# --------------------------------------------------------------------------------------------
# Open loop, fixed rate
# --------------------------------------------------------------------------------------------


async def fixed_rate(url: str, rate: float, duration: float, warmup: float) -> dict[str, Any]:
    """Send ``rate`` requests/s on a timetable; latency counts from each scheduled send time.

    The first ``warmup`` seconds open connections and warm caches and are not counted.
    """
    body, headers, target = request_body(), request_headers(), URL(url, encoded=True)
    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    async with _session(0) as session:

        async def one(scheduled: float, counted: bool) -> None:
            nonlocal errors
            if counted:
                lags.append(perf_counter() - scheduled)
            try:
                async with session.post(target, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                if counted:
                    errors += 1
                return
            if counted:
                statuses[status] += 1
                if 200 <= status < 300:
                    latencies.append(perf_counter() - scheduled)

        total = int(rate * (warmup + duration))
        n_warm = int(rate * warmup)
        # The timetable lives on perf_counter: uvloop's loop.time() ticks in whole milliseconds,
        # too coarse for differences of a fraction of a millisecond.
        t0 = perf_counter() + 0.05
        tasks: list[asyncio.Task[None]] = []
        for i in range(total):
            scheduled = t0 + i / rate
            delay = scheduled - perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled, i >= n_warm)))
        last_sent = perf_counter()
        await asyncio.gather(*tasks)

    measured = total - n_warm
    return {
        "generator": "python-open-loop",
        "rate": rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "scheduled": measured,
        "ok": len(latencies),
        "non_2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
        "errors": errors,
        # If sends fell behind the timetable the generator, not the system, was the limit.
        "send_lag_ms": _ms_summary(lags),
        "send_span_s": last_sent - t0,
        "latency_ms": _ms_summary(latencies),
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sat = sub.add_parser("saturate", help="closed loop, N connections for D seconds")
    sat.add_argument("--url", required=True)
    sat.add_argument("-c", "--connections", type=int, default=64)
    sat.add_argument("-d", "--duration", type=float, default=10.0)
    sat.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    sat.add_argument("--threads", type=int, default=1, help="wrk threads")
    sat.add_argument("--procs", type=int, default=2, help="Python generator processes")
    fix = sub.add_parser("fixed-rate", help="open loop at a fixed arrival rate")
    fix.add_argument("--url", required=True)
    fix.add_argument("--rate", type=float, default=200.0)
    fix.add_argument("-d", "--duration", type=float, default=10.0)
    fix.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)

    if args.mode == "saturate":
        generator = args.generator
        if generator == "auto":
            generator = "wrk" if shutil.which("wrk") else "python"
        if generator == "wrk":
            result = saturate_wrk(args.url, args.connections, args.duration, args.threads)
        else:
            result = saturate_python(args.url, args.connections, args.duration, args.procs)
    else:
        result = _run(fixed_rate(args.url, args.rate, args.duration, args.warmup))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

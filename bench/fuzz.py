"""Hostile-input fuzzing and slowloris against a real Sluice on Redis (issue 10's targets).

    python bench/fuzz.py --requests 100000    # seeded fuzz run, ~6 min on 2 cores
    python bench/fuzz.py --slowloris 1000     # a good call's p99: idle vs 1,000 slow clients

Fuzz mode plays :mod:`tests.support.hostile`'s generator over raw sockets and counts what
the targets forbid: Sluice's own 5xx, answers that are not Bedrock-shaped, connections
open past their timeout, leases left in Redis, prompt/credential bytes or tracebacks in
Sluice's logs. Slowloris mode measures a good call's latency alone, then while N clients
trickle request heads one byte at a time. Both print a table and write JSON to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import RESULTS_DIR, percentile, render_table, timestamp
from tests.support.hostile import problems, run
from tests.support.hostile_cases import (
    FUZZ_SECRET_ENV,
    HAIKU,
    PROMPT_CANARY,
    SECRET_CANARY,
    converse_body,
    fuzz_policy,
    request,
)
from tests.support.processes import Simulator, Sluice
from tests.support.redis_fixtures import RedisServerProcess

BATCH = 5000


def _leases(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return sum(int(client.zcard(k)) for k in client.scan_iter("sluice:*leases"))
    finally:
        client.close()


def _classify(found: list[str]) -> str:
    text = found[0]
    if "status 5" in text:
        return "own_5xx"
    if "still open" in text or "no answer within" in text:
        return "hang"
    if "closed without" in text:
        return "no_answer"
    return "not_bedrock_shaped"


async def _fuzz(port: int, total: int, seed: int, conc: int, timeout_s: float) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    examples: list[str] = []
    done = 0
    while done < total:
        n = min(BATCH, total - done)
        answers = await run("127.0.0.1", port, n, seed * 100_003 + done, concurrency=conc,
                            timeout_s=timeout_s)  # fmt: skip
        for a in answers:
            statuses[f"{a.case.kind} {a.status}"] += 1
            found = problems(a)
            if found:
                failures[_classify(found)] += 1
                if len(examples) < 20:
                    examples.append(found[0])
        done += n
        print(f"  {done:,} / {total:,} requests", file=sys.stderr, flush=True)
    return {"statuses": dict(statuses), "failures": dict(failures), "examples": examples}


def _with_grants_ahead(policy: dict[str, Any], n: int) -> dict[str, Any]:
    """``policy`` with ``server.grants_ahead: n`` (the fuzz then also runs that path)."""
    server = cast("dict[str, Any]", policy["server"])
    return {**policy, "server": {**server, "grants_ahead": n}}


def fuzz(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    redis_server = RedisServerProcess().start()
    sim = Simulator(work / "sim", {"latency_scale": 0})
    proxy = Sluice(
        work / "sluice",
        upstream=sim.url,
        policy=_with_grants_ahead(fuzz_policy(args.timeout), args.grants_ahead),
        redis_url=redis_server.url,
        env={FUZZ_SECRET_ENV: "bench-" + SECRET_CANARY},
    )
    try:
        started = time.monotonic()
        out = asyncio.run(
            _fuzz(proxy.port, args.requests, args.seed, args.concurrency, args.timeout)
        )
        out["seconds"] = round(time.monotonic() - started, 1)
        deadline = time.monotonic() + 10
        while (left := _leases(redis_server.url)) and time.monotonic() < deadline:
            time.sleep(0.1)
        out["leases_left"] = left
        logs = proxy.stdout_path.read_text(errors="replace") + proxy.stderr_path.read_text(
            errors="replace"
        )
        out["log_prompt_bytes"] = logs.count(PROMPT_CANARY)
        out["log_secret_bytes"] = logs.count(SECRET_CANARY)
        out["log_tracebacks"] = logs.count("Traceback")
        out["log_lines"] = logs.count("\n")
    finally:
        proxy.stop()
        sim.stop()
        redis_server.cleanup()
    return out


async def _good_latencies(port: int, n: int, seconds: float) -> list[float]:
    """Good Converse calls one after another on one keep-alive connection (ms): at least
    ``n``, for at least ``seconds``."""
    rng = random.Random(7)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[float] = []
    until = time.monotonic() + seconds
    try:
        while len(out) < n or time.monotonic() < until:
            data = request("POST", f"/model/{HAIKU}/converse", converse_body(rng, 16))
            started = time.perf_counter()
            writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            out.append((time.perf_counter() - started) * 1000)
            assert head.startswith(b"HTTP/1.1 200"), head[:80]
    finally:
        writer.close()
    return out


async def _loris(port: int, stop: asyncio.Event, opened: list[int]) -> None:
    """One slow client: a request head one byte every second, reconnecting when cut off."""
    head = request("POST", f"/model/{HAIKU}/converse", b"{}")
    while not stop.is_set():
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        opened[0] += 1
        try:
            for byte in head[:-4]:
                writer.write(bytes([byte]))
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                if stop.is_set():
                    break
        except ConnectionError:
            pass  # the server's header timeout cut it off: come back, as an attacker would
        finally:
            writer.close()


async def _slowloris(port: int, clients: int, calls: int, seconds: float) -> dict[str, Any]:
    idle = sorted(await _good_latencies(port, calls, seconds))
    stop, opened = asyncio.Event(), [0]
    tasks = [asyncio.create_task(_loris(port, stop, opened)) for _ in range(clients)]
    await asyncio.sleep(3)  # every slow client connected and trickling
    # Longer than the 10 s header timeout: the clients are cut off and come back meanwhile.
    loaded = sorted(await _good_latencies(port, calls, seconds))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    p99_idle, p99_loaded = percentile(idle, 99), percentile(loaded, 99)
    return {
        "clients": clients,
        "calls_idle": len(idle),
        "calls_loaded": len(loaded),
        "connections_opened": opened[0],
        "p50_idle_ms": percentile(idle, 50),
        "p99_idle_ms": p99_idle,
        "p50_loaded_ms": percentile(loaded, 50),
        "p99_loaded_ms": p99_loaded,
        "p99_ratio": (p99_loaded / p99_idle) if p99_idle and p99_loaded else None,
    }


def slowloris(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    redis_server = RedisServerProcess().start()
    sim = Simulator(work / "sim", {"latency_scale": 0})
    # Production defaults for every timeout (10 s header timeout), room for the clients.
    policy = fuzz_policy(10.0, max_connections=max(4096, args.slowloris * 2))
    proxy = Sluice(work / "sluice", upstream=sim.url, policy=policy, redis_url=redis_server.url,
                   env={FUZZ_SECRET_ENV: "x"})  # fmt: skip
    try:
        return asyncio.run(_slowloris(proxy.port, args.slowloris, args.calls, args.seconds))
    finally:
        proxy.stop()
        sim.stop()
        redis_server.cleanup()


def _report(kind: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    if kind == "fuzz":
        rows = [[k, f"{v:,}"] for k, v in sorted(result["statuses"].items())]
        print(render_table(["kind status", "answers"], rows))
        checks = {
            "own 5xx": result["failures"].get("own_5xx", 0),
            "not Bedrock-shaped": result["failures"].get("not_bedrock_shaped", 0),
            "hangs (open past timeout / no answer)": result["failures"].get("hang", 0)
            + result["failures"].get("no_answer", 0),
            "leases left after the run": result["leases_left"],
            "prompt bytes in logs": result["log_prompt_bytes"],
            "credential bytes in logs": result["log_secret_bytes"],
            "tracebacks in logs": result["log_tracebacks"],
        }
        print(
            render_table(
                ["target (all must be 0)", "found"], [[k, str(v)] for k, v in checks.items()]
            )
        )
        print(
            f"{args.requests:,} requests in {result['seconds']} s; {result['log_lines']} log lines"
        )
    else:
        rows = [[k, f"{v:.2f}" if isinstance(v, float) else str(v)] for k, v in result.items()]
        print(render_table(["slowloris", "value"], rows))
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{kind}-{timestamp()}.json"
    path.write_text(json.dumps({"options": vars(args), "result": result}, indent=2))
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000, help="fuzzed requests")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument(
        "--grants-ahead", type=int, default=0, help="server.grants_ahead of the fuzzed Sluice"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="connections at a time")
    parser.add_argument("--timeout", type=float, default=1.0, help="server header/body timeout (s)")
    parser.add_argument("--slowloris", type=int, default=0, help="slow clients (slowloris mode)")
    parser.add_argument("--calls", type=int, default=500, help="good calls per slowloris phase")
    parser.add_argument("--seconds", type=float, default=15.0, help="slowloris phase length")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-fuzz-") as tmp:
        if args.slowloris:
            result = slowloris(args, Path(tmp))
            _report("slowloris", result, args)
            return 0 if (result["p99_ratio"] or 99) <= 2.0 else 1
        result = fuzz(args, Path(tmp))
        _report("fuzz", result, args)
    bad = sum(result["failures"].values()) + result["leases_left"] + result["log_prompt_bytes"]
    return 1 if bad + result["log_secret_bytes"] + result["log_tracebacks"] else 0


if __name__ == "__main__":
    sys.exit(main())

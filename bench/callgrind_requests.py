"""Instructions per request, counted by callgrind: a figure the machine's load cannot move.

    python bench/callgrind_requests.py                     # sluice (embedded store), 400 requests
    python bench/callgrind_requests.py --system sluice+redis --requests 400

Starts the zero-latency simulator (and redis-server), runs Sluice under
``valgrind --tool=callgrind --instr-atstart=no``, sends ``--warmup`` requests, switches
collection on (``callgrind_control -i on``), sends ``--requests`` more with ``--concurrency``
in flight, switches it off and dumps. Prints total instructions (Ir) / requests. Startup,
imports and warm-up are not counted. Slow (valgrind runs Python ~50x slower): minutes.

That figure also counts the process's timer-driven background loops (policy reload polls,
the fleet board's tick, lease heartbeats, the batch queue's watcher), which run per second,
not per request, and valgrind stretches the seconds ~50x. ``--idle S`` first counts S
idle seconds and also prints the figure net of that background rate over the run's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from common import (
    INVOKE_PATH,
    PROJECT_ROOT,
    ManagedProcess,
    free_port,
    install_cleanup,
    log,
    processes,
    request_body,
    request_headers,
    start_redis,
)
from held_streams import _NO_PIN
from systems import PY, SYSTEMS, ProxyContext


async def send(url: str, n: int, concurrency: int) -> int:
    body, ok = request_body(), 0
    async with aiohttp.ClientSession() as session:

        async def worker(count: int) -> None:
            nonlocal ok
            for _ in range(count):
                async with session.post(url, data=body, headers=request_headers()) as resp:
                    await resp.read()
                    ok += resp.status == 200

        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    return ok


def total_ir(out: Path) -> int:
    """Sum of the ``totals:`` lines of every dump callgrind wrote (the header's summary
    line can be 0 when instrumentation started late)."""
    total = 0
    for f in out.parent.glob(out.name + "*"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def idle_rate(pid: int, out: Path, seconds: float) -> tuple[float, int]:
    """Instructions per second the process runs with no request in flight (and the dump's Ir)."""
    control(pid, "-i", "on")
    started = time.monotonic()
    time.sleep(seconds)
    control(pid, "-i", "off")
    elapsed = time.monotonic() - started
    control(pid, "-d")
    time.sleep(2)
    ir = total_ir(out)
    return ir / elapsed, ir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--system", default="sluice", choices=["sluice", "sluice+quotas", "sluice+redis"]
    )
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument(
        "--idle",
        type=float,
        default=0.0,
        help="count this many idle seconds first; also print the figure net of background",
    )
    p.add_argument(
        "--keep", type=Path, help="write callgrind's files here (for callgrind_annotate)"
    )
    p.add_argument(
        "--tree",
        type=Path,
        default=PROJECT_ROOT,
        help="run Sluice from this checkout (before/after)",
    )
    args = p.parse_args()
    install_cleanup()
    spec = SYSTEMS[args.system]
    assert spec.command is not None
    with tempfile.TemporaryDirectory(prefix="callgrind-") as tmp, processes() as procs:
        workdir = Path(tmp)
        sim_port, port = free_port(), free_port()
        (workdir / "sim.yaml").write_text("latency_scale: 0\n")
        sim = [PY, "-m", "proxy", "simulate", "--port", str(sim_port)]
        procs.append(
            ManagedProcess("sim", [*sim, "--config", str(workdir / "sim.yaml")], log_dir=workdir)
        )
        procs[-1].wait_http(f"http://127.0.0.1:{sim_port}/_sim/stats")
        redis_url = None
        if spec.needs_redis:
            redis, redis_url = start_redis(workdir, _NO_PIN)
            procs.append(redis)
        argv = spec.command(ProxyContext(port, f"http://127.0.0.1:{sim_port}", redis_url))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        out = (args.keep or workdir) / "callgrind.out"
        vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        argv = [a.replace(str(PROJECT_ROOT), str(args.tree)) for a in argv]
        sluice = ManagedProcess(
            "sluice",
            [*vg, *argv],
            log_dir=workdir,
            # On CPython's allocator: `sluice serve` would re-execute itself on jemalloc
            # (proxy/allocator.py) and valgrind does not follow an exec.
            env={**spec.env, "SLUICE_ALLOCATOR": "pymalloc"},
            cwd=args.tree,
        )
        procs.append(sluice)
        sluice.wait_http(f"http://127.0.0.1:{port}/healthz", timeout=600)
        url = f"http://127.0.0.1:{port}{INVOKE_PATH}"
        log(f"warm-up: {asyncio.run(send(url, args.warmup, args.concurrency))} ok")
        rate, idle_ir = idle_rate(sluice.pid, out, args.idle) if args.idle > 0 else (0.0, 0)
        control(sluice.pid, "-i", "on")
        started = time.monotonic()
        ok = asyncio.run(send(url, args.requests, args.concurrency))
        control(sluice.pid, "-i", "off")
        wall = time.monotonic() - started
        control(sluice.pid, "-d")
        time.sleep(2)
        ir = total_ir(out) - idle_ir
        sent = args.requests // args.concurrency * args.concurrency
        log(f"{ok}/{sent} ok in {wall:.0f}s under valgrind")
        print(f"{args.system}: {ir / sent:,.0f} instructions/request ({ir:,} over {sent})")
        if args.idle > 0:
            net = (ir - rate * wall) / sent
            print(
                f"{args.system}: {net:,.0f} instructions/request net of background "
                f"({rate:,.0f} Ir/s idle x {wall:.2f} s)"
            )
    return 0 if ok == sent else 1


if __name__ == "__main__":
    sys.exit(main())

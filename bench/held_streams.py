"""Memory of held ConverseStream responses: bytes per stream, and RSS given back afterwards.

    python bench/held_streams.py                          # 1,000 / 5,000 / 10,000 streams
    python bench/held_streams.py --streams 2000 --after-s 10
    python bench/held_streams.py --system sluice+redis --streams 5000
    python bench/held_streams.py --workers 2 --streams 10000   # one instance, two processes

For each stream count, fresh processes: the simulator with a *slow* stream (first event at
once, then one event every ``--delta-s`` seconds), Sluice (``bench/policies/passthrough.yaml``
by default, from ``systems.SYSTEMS``), and this process as the client (uvloop, one connection
per stream, opened at ``--open-rate`` per second so accept queues never overflow).

Figures, all from ``/proc/<sluice pid>/status`` (VmRSS), so the machine's load does not move them:

* idle: after 20 warm-up streams have finished (what a started, used instance holds);
* held: once every stream has its headers and first event (all N open at once), after 2 s;
  bytes/stream = (held - idle) / N;
* after: ``--after-s`` seconds after the last stream ended; the target is <= 1.2 x idle.

With ``--workers N`` Sluice runs as ``sluice serve --workers N`` (N processes on one port, so
a Redis is started for them) and every figure is the sum over the supervisor and its workers:
one instance holding N times the streams one process's file-descriptor limit allows.

Every stream is decoded (CRCs checked) and must be intact: messageStart, every
contentBlockDelta the simulator sends, messageStop and metadata, no exception event.
Output: a table on stdout, JSON in ``bench/results/held-streams-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    BENCH_DIR,
    MODEL_ID,
    PROJECT_ROOT,
    RESULTS_DIR,
    ManagedProcess,
    free_port,
    install_cleanup,
    log,
    processes,
    render_table,
    start_redis,
    timestamp,
)
from scenario_load import http_call
from systems import PY, SYSTEMS, ProxyContext

sys.path.insert(0, str(PROJECT_ROOT))
from proxy.eventstream import EventStreamDecoder, EventStreamError

STREAM_PATH = "/model/" + MODEL_ID.replace(":", "%3A") + "/converse-stream"


def stream_body(kb: float = 0.0) -> bytes:
    """The ConverseStream request; ``kb`` > 0 pads its text to about that many KB (a long
    conversation, which a held stream must not keep)."""
    text = "Tell me about Mushishi." + " Mushishi." * round(kb * 1024 / 10)
    return json.dumps({"messages": [{"role": "user", "content": [{"text": text}]}]}).encode()


STREAM_BODY = stream_body()
TOKENS_PER_DELTA = 3
FD_LIMIT = 65536


def raise_fd_limit() -> int:
    """Allow N client + 2N Sluice + N simulator sockets (children inherit the limit)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT
    with contextlib.suppress(ValueError, OSError):  # not root: keep the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        return want
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def simulator_config(delta_s: float, deltas: int) -> str:
    """A simulator whose Haiku streams its first event at once and then one every delta_s."""
    rate = TOKENS_PER_DELTA / delta_s
    return (
        f"default_output_tokens: {deltas * TOKENS_PER_DELTA}\n"
        f"tokens_per_delta: {TOKENS_PER_DELTA}\n"
        "records_kept: 0\n"
        "models:\n"
        f"  {MODEL_ID}:\n"
        "    latency: {ttft_s: 0.01, ttft_per_1k_input_s: 0.0, "
        f"output_tokens_per_s: {rate}}}\n"
    )


@dataclass
class StreamResult:
    status: int = 0
    events: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def intact(self, deltas: int) -> bool:
        e = self.events
        return (
            self.status == 200
            and self.error is None
            and e.get("messageStart") == 1
            and e.get("contentBlockDelta") == deltas
            and e.get("messageStop") == 1
            and e.get("metadata") == 1
        )


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    opened: asyncio.Event,
    counter: list[int],
    n: int,
    body: bytes,
) -> StreamResult:
    out = StreamResult()
    decoder = EventStreamDecoder()
    first = True
    try:
        async with session.post(url, data=body, headers=_headers()) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return _opened(out, opened, counter, n)
            async for chunk in resp.content.iter_any():
                for msg in decoder.feed(chunk):
                    kind = str(msg.headers.get(":event-type") or msg.headers.get(":message-type"))
                    if msg.headers.get(":message-type") == "exception":
                        out.error = str(msg.headers.get(":exception-type"))
                    out.events[kind] = out.events.get(kind, 0) + 1
                if first:
                    first = False
                    _opened(out, opened, counter, n)
    except (aiohttp.ClientError, TimeoutError, EventStreamError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    if first:  # never opened: do not leave the waiter hanging
        _opened(out, opened, counter, n)
    return out


def _opened(out: StreamResult, opened: asyncio.Event, counter: list[int], n: int) -> StreamResult:
    counter[0] += 1
    if counter[0] == n:
        opened.set()
    return out


def _headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "application/vnd.amazon.eventstream"}


async def drive(
    url: str, n: int, open_rate: float, on_open: Any, body: bytes = STREAM_BODY
) -> list[StreamResult]:
    """Open n streams at open_rate/s; call on_open() once all have their first event."""
    opened = asyncio.Event()
    counter = [0]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one_stream(session, url, opened, counter, n, body)))
            if i % 50 == 49:
                await asyncio.sleep(50 / open_rate)
        await opened.wait()
        await on_open()
        return await asyncio.gather(*tasks)


def allocator(metrics_url: str) -> str:
    """The allocator Sluice says it runs on (``sluice_allocator_info``; SLUICE_ALLOCATOR)."""
    text = http_call("GET", metrics_url).decode()
    found = re.search(r'sluice_allocator_info\{allocator="([a-z]+)"\} 1', text)
    return found.group(1) if found else "?"


def instance_rss(pid: int) -> int:
    """RSS of ``pid`` and its children (``--workers``: the supervisor and its workers)."""
    total = rss_bytes(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return total + sum(rss_bytes(int(child)) for child in children)


@dataclass
class Run:
    system: str
    streams: int
    deltas: int
    workers: int = 1
    allocator: str = "?"
    idle_rss: int = 0
    held_rss: int = 0
    end_rss: int = 0
    after_rss: int = 0
    intact: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    open_s: float = 0.0

    @property
    def per_stream(self) -> float:
        return (self.held_rss - self.idle_rss) / self.streams

    @property
    def after_ratio(self) -> float:
        return self.after_rss / self.idle_rss


def measure(args: argparse.Namespace, system: str, n: int, workdir: Path) -> Run:
    deltas = math.ceil((n / args.open_rate + args.hold_s) / args.delta_s)
    run = Run(system, n, deltas, args.workers)
    spec = SYSTEMS[system]
    assert spec.command is not None, "held streams need a proxy"
    with processes() as procs:
        sim_port, port = free_port(), free_port()
        config = workdir / f"sim-{n}.yaml"
        config.write_text(simulator_config(args.delta_s, deltas))
        argv = [PY, "-m", "proxy", "simulate", "--port", str(sim_port), "--config", str(config)]
        procs.append(ManagedProcess(f"sim-{n}", argv, log_dir=workdir))
        procs[-1].wait_http(f"http://127.0.0.1:{sim_port}/_sim/stats")
        redis_url = None
        if spec.needs_redis or args.workers > 1:  # several workers share their store
            redis, redis_url = start_redis(workdir, _NO_PIN)
            procs.append(redis)
        ctx = ProxyContext(port, f"http://127.0.0.1:{sim_port}", redis_url)
        argv = _with_connection_cap(spec.command(ctx), n + 1000, workdir)
        if args.workers > 1:
            argv += ["--workers", str(args.workers)]
            if not spec.needs_redis:
                argv += ["--redis-url", str(redis_url)]
        if args.tracemalloc:  # same command under bench/traced_serve.py
            argv = [PY, str(BENCH_DIR / "traced_serve.py"), f"{args.tracemalloc}.{n}", *argv[3:]]
        sluice = ManagedProcess(f"{system}-{n}", argv, log_dir=workdir, env=spec.env)
        procs.append(sluice)
        sluice.wait_http(f"http://127.0.0.1:{port}{spec.health_path}", timeout=120)
        url = f"http://127.0.0.1:{port}{STREAM_PATH}"
        body = stream_body(args.body_kb)
        # Warm-up: every code path once (in every worker: the port spreads connections).
        asyncio.run(drive(url, 20 * args.workers, 1000, _noop, body))
        run.allocator = allocator(f"http://127.0.0.1:{port}/metrics")
        time.sleep(1.0)
        run.idle_rss = instance_rss(sluice.pid)
        if args.tracemalloc:  # FILE.<N>.1: the idle heap the next dumps are compared with
            _traced_dump(sluice.pid, Path(f"{args.tracemalloc}.{n}.1"))
        started = time.monotonic()

        async def on_open() -> None:
            run.open_s = time.monotonic() - started
            await asyncio.sleep(2.0)
            run.held_rss = instance_rss(sluice.pid)
            if args.tracemalloc:
                os.kill(sluice.pid, signal.SIGUSR1)
            log(f"{n} streams open after {run.open_s:.1f}s: RSS {run.held_rss / 2**20:.0f} MB")

        results = asyncio.run(drive(url, n, args.open_rate, on_open, body))
        run.end_rss = instance_rss(sluice.pid)
        time.sleep(args.after_s)
        run.after_rss = instance_rss(sluice.pid)
        if args.tracemalloc:  # FILE.<N>.3: what the burst left behind
            _traced_dump(sluice.pid, Path(f"{args.tracemalloc}.{n}.3"))
    return _tally(run, results)


def _tally(run: Run, results: list[StreamResult]) -> Run:
    """Count the intact streams of ``run`` and each reason the others were not."""
    for r in results:
        if r.intact(run.deltas):
            run.intact += 1
        else:
            key = r.error or f"status {r.status} events {sorted(r.events.items())}"
            run.failures[key] = run.failures.get(key, 0) + 1
    return run


def _traced_dump(pid: int, out: Path, timeout_s: float = 300.0) -> None:
    """Have traced_serve.py write ``out`` and wait until it has: the dump stalls its loop."""
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _with_connection_cap(argv: list[str], cap: int, workdir: Path) -> list[str]:
    """The same command with a policy whose connection cap (default 4,096) admits every stream."""
    at = argv.index("--config") + 1
    text = Path(argv[at]).read_text()
    policy = workdir / f"policy-{cap}.yaml"
    policy.write_text(
        text.replace("server:\n", f"server:\n  connections: {{max_connections: {cap}}}\n", 1)
    )
    return [*argv[:at], str(policy), *argv[at + 1 :]]


async def _noop() -> None:
    return None


class _NoPin:
    def prefix(self, _role: str) -> list[str]:
        return []


_NO_PIN: Any = _NoPin()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", default="1000,5000,10000", help="comma-separated stream counts")
    p.add_argument("--system", default="sluice", choices=[s for s in SYSTEMS if s != "direct"])
    p.add_argument("--open-rate", type=float, default=1000.0, help="new streams per second")
    p.add_argument("--delta-s", type=float, default=3.0, help="seconds between stream events")
    p.add_argument("--body-kb", type=float, default=0.0, help="pad each request to ~N KB")
    p.add_argument("--hold-s", type=float, default=12.0, help="stream life beyond the ramp")
    p.add_argument(
        "--tracemalloc",
        metavar="FILE",
        help="run Sluice traced; write FILE.<N>.1/.2/.3 at idle, all open, after",
    )
    p.add_argument("--after-s", type=float, default=60.0, help="wait before the 'after' RSS")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Sluice processes on one port (sluice serve --workers)",
    )
    return p


def main() -> int:
    args = _parser().parse_args()
    if args.workers < 1 or (args.workers > 1 and args.tracemalloc):
        sys.exit("held_streams: --workers must be >= 1, and 1 with --tracemalloc")
    install_cleanup()
    limit = raise_fd_limit()
    counts = [int(x) for x in args.streams.split(",")]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="held-streams-") as tmp:
        for n in counts:
            # Each worker takes its share of the streams (SO_REUSEPORT spreads connections
            # by hash: allow 10% over an even share).
            per_worker = n if args.workers == 1 else math.ceil(1.1 * n / args.workers)
            if 2 * per_worker + 64 > limit:
                log(f"skipping {n}: file descriptor limit {limit} ({args.workers} workers)")
                continue
            runs.append(measure(args, args.system, n, Path(tmp)))
    # The measurements are written first: nothing after them can lose a run's figures.
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"held-streams-{timestamp()}.json"
    doc = {"options": vars(args), "runs": [asdict(r) | {"per_stream": r.per_stream} for r in runs]}
    out.write_text(json.dumps(doc, indent=2))
    headers = [
        "System",
        "Memory",
        "Workers",
        "Streams",
        "Intact",
        "Idle MB",
        "Held MB",
        "KB/stream",
        "End MB",
    ]
    headers += [f"After {args.after_s:.0f}s MB", "After/idle"]
    mb = 2**20
    rows = [
        [
            r.system,
            r.allocator,
            str(r.workers),
            f"{r.streams:,}",
            f"{r.intact:,}",
            f"{r.idle_rss / mb:.1f}",
            f"{r.held_rss / mb:.1f}",
            f"{r.per_stream / 1024:.1f}",
            f"{r.end_rss / mb:.1f}",
            f"{r.after_rss / mb:.1f}",
            f"{r.after_ratio:.2f}",
        ]
        for r in runs
    ]
    print(render_table(headers, rows))
    for r in runs:
        for reason, count in r.failures.items():
            print(f"- {r.streams}: {count} not intact: {reason}")
    log(f"wrote {out}")
    return 0 if all(r.intact == r.streams for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

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
import contextlib
import itertools
import json
import os
import random
import re
import tempfile
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml
from common import (
    BENCH_DIR,
    RESULTS_DIR,
    CpuLayout,
    ManagedProcess,
    default_layout,
    fmt,
    free_port,
    install_cleanup,
    log,
    parse_cpu_list,
    percentile,
    processes,
    render_table,
    request_headers,
    start_redis,
    timestamp,
)
from systems import AWS_ENV, PY, ProxyContext, _sluice

SCENARIO_DIR = BENCH_DIR / "scenarios"
SAMPLE_S = 0.25
#: API Gateway's integration timeout: the reference user's callers give up after this.
CLIENT_TIMEOUT_S = 29.0
#: A closed-loop caller honours Retry-After, but probes at least this often.
MAX_BACKOFF_S = 1.0
#: Open-loop requests allowed in flight before the generator drops arrivals (and says so).
MAX_OUTSTANDING = 2000


# --------------------------------------------------------------------------------------------
# Scenarios: phases over time and the streams of callers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    fraction: float  # of --duration
    multiplier: float  # applied to every open-loop stream's rate


@dataclass(frozen=True)
class Stream:
    """One kind of caller. Open loop (``rate``) for people; closed loop (``workers``) for jobs."""

    workload: str
    priority: str  # the class Sluice derives from the workload; here only to group the table
    model_id: str
    rate: float = 0.0  # arrivals/s at multiplier 1 and --scale 1
    workers: int = 0
    output_tokens: int = 40  # the simulator's reply length ([[sim:output_tokens=N]])
    prompts: int = 0  # distinct prompts cycled through; 0: every prompt unique
    text: str = "Where is my order? {n}"


@dataclass(frozen=True)
class Scenario:
    """``bench/scenarios/<name>.yaml`` (policy), ``.sim.yaml`` (Bedrock) and ``.load.yaml``."""

    name: str
    title: str
    phases: tuple[Phase, ...]
    streams: tuple[Stream, ...]

    @property
    def policy(self) -> Path:
        return SCENARIO_DIR / f"{self.name}.yaml"

    @property
    def simulator(self) -> Path:
        return SCENARIO_DIR / f"{self.name}.sim.yaml"

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(s.priority for s in self.streams))

    def phase_bounds(self, duration: float) -> list[tuple[Phase, float, float]]:
        out, start = [], 0.0
        for phase in self.phases:
            end = start + phase.fraction * duration
            out.append((phase, start, end))
            start = end
        return out


def load_scenarios() -> dict[str, Scenario]:
    """Every ``bench/scenarios/*.load.yaml``: adding a scenario is adding its three files."""
    found = {}
    for path in sorted(SCENARIO_DIR.glob("*.load.yaml")):
        name = path.name.removesuffix(".load.yaml")
        doc = yaml.safe_load(path.read_text())
        found[name] = Scenario(
            name,
            doc["title"],
            tuple(Phase(**p) for p in doc["phases"]),
            tuple(Stream(**s) for s in doc["streams"]),
        )
    return found


def _body(stream: Stream, n: int) -> bytes:
    k = n % stream.prompts if stream.prompts else n
    prompt = stream.text.format(n=k) + f" [[sim:output_tokens={stream.output_tokens}]]"
    doc = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": max(256, stream.output_tokens),
        "system": "You are the shopping assistant of a Japanese manga store. Be brief.",
        "messages": [{"role": "user", "content": prompt}],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _invoke_path(model_id: str) -> str:
    # botocore percent-encodes ':' and '/' inside the model id (ARNs included).
    return f"/model/{quote(model_id, safe='')}/invoke"


# --------------------------------------------------------------------------------------------
# Clients: aiohttp with boto3's wire shape, and real boto3 clients on a thread pool
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    t: float  # scheduled send, seconds since the run started
    priority: str
    workload: str
    client: str
    status: int  # 0: no HTTP answer (timeout, connection error)
    latency_s: float  # from the scheduled send, so a stalled generator is charged too
    degraded: str | None
    retry_after: bool
    error: str | None = None


Answer = tuple[int, dict[str, str], str | None]


def _error_label(status: int, headers: dict[str, str]) -> str | None:
    """ "429 ThrottlingException" (the error type without its namespace), None for a 200."""
    if status == 200:
        return None
    kind = headers.get("x-amzn-errortype", "").partition(":")[0]
    return f"{status} {kind}".strip()


async def _send_aiohttp(
    session: aiohttp.ClientSession, base: str, stream: Stream, body: bytes
) -> Answer:
    headers = {**request_headers(), "x-sluice-workload": stream.workload}
    try:
        async with session.post(
            base + _invoke_path(stream.model_id), data=body, headers=headers
        ) as resp:
            await resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, {}, type(exc).__name__


class BotoClients:
    """One boto3 client per (target, workload), tagging every call in header mode.

    Retries are off so every refusal reaches the table (Sluice retries upstream throttles
    itself); boto3 is CPU-heavy, so only a share of the traffic goes through it.
    """

    def __init__(self, bases: Sequence[str], workloads: Sequence[str], threads: int) -> None:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id="AKIDSCENARIOCLIENT",
            aws_secret_access_key="scenario-client-secret",
            region_name="us-east-1",
        )
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=CLIENT_TIMEOUT_S,
            max_pool_connections=threads,
        )
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="boto3")
        self._clients: dict[tuple[str, str], Any] = {}
        for base, workload in itertools.product(bases, workloads):
            client = session.client("bedrock-runtime", endpoint_url=base, config=config)
            client.meta.events.register(
                "before-sign.bedrock-runtime.InvokeModel", _tagger(workload)
            )
            self._clients[base, workload] = client

    def call(self, base: str, stream: Stream, body: bytes) -> Answer:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._clients[base, stream.workload]
        try:
            resp = client.invoke_model(
                modelId=stream.model_id,
                body=body,
                contentType="application/json",
                accept="application/json",
            )
            resp["body"].read()
            meta = resp["ResponseMetadata"]
        except ClientError as exc:
            meta = exc.response.get("ResponseMetadata", {})
        except BotoCoreError as exc:
            return 0, {}, type(exc).__name__
        return int(meta.get("HTTPStatusCode", 0)), dict(meta.get("HTTPHeaders", {})), None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _tagger(workload: str) -> Callable[..., None]:
    def tag(request: Any, **_: Any) -> None:
        request.headers["x-sluice-workload"] = workload

    return tag


# --------------------------------------------------------------------------------------------
# Sampling: simulator stats and Sluice /metrics every 250 ms
# --------------------------------------------------------------------------------------------

_GAUGES = (
    "sluice_pool_concurrency_limit",
    "sluice_adaptive_limit",
    "sluice_breaker_state",
    "sluice_workload_paused",
    "sluice_in_flight",
)
_SAMPLE_LINE = re.compile(r'^(\w+)\{(?:pool|workload)="([^"]*)"\} (\S+)$', re.M)


def parse_gauges(text: str) -> dict[str, dict[str, float]]:
    """The single-label gauges this runner plots, from Prometheus text (absent ones omitted)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for name, label, value in _SAMPLE_LINE.findall(text):
        if name in _GAUGES:
            out[name][label] = float(value)
    return dict(out)


#: Counters that mean the run did not test what it claims (Sluice could not decide).
_HEALTH = ("sluice_store_errors_total", "sluice_fail_open_total", "sluice_fleet_errors_total")
_COUNTER_LINE = re.compile(r"^(\w+)(?:\{[^}]*\})? (\S+)$", re.M)


def scrape_health(instances: Sequence[str]) -> dict[str, float]:
    """Fleet totals of :data:`_HEALTH` at the end of a run (absent counters omitted)."""
    totals: dict[str, float] = {}
    for base in instances:
        try:
            text = _http("GET", base + "/metrics").decode()
        except OSError:
            continue
        for name, value in _COUNTER_LINE.findall(text):
            if name in _HEALTH:
                totals[name] = totals.get(name, 0.0) + float(value)
    return totals


@dataclass
class Sample:
    t: float
    sim: dict[str, dict[str, int]]  # model id -> in_flight, requests, throttled
    gauges: list[dict[str, dict[str, float]]]  # one per instance that answered


async def _get_text(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def sample_loop(
    session: aiohttp.ClientSession,
    sim_url: str,
    instances: Sequence[str],
    t0: float,
    stop: asyncio.Event,
    out: list[Sample],
) -> None:
    loop = asyncio.get_running_loop()
    tick = 0
    while not stop.is_set():
        texts = await asyncio.gather(
            _get_text(session, sim_url + "/_sim/stats"),
            *(_get_text(session, base + "/metrics") for base in instances),
        )
        t = loop.time() - t0
        if texts[0] is not None:
            models = json.loads(texts[0])["models"]
            keep = ("in_flight", "requests", "throttled", "peak_concurrency")
            sim = {m: {k: int(v[k]) for k in keep} for m, v in models.items() if v["requests"]}
            out.append(Sample(t, sim, [parse_gauges(x) for x in texts[1:] if x is not None]))
        tick += 1
        # Absolute ticks: a slow scrape shortens the next wait instead of drifting the grid.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, t0 + tick * SAMPLE_S - loop.time()))


# --------------------------------------------------------------------------------------------
# Driving one run
# --------------------------------------------------------------------------------------------


@dataclass
class Driver:
    scenario: Scenario
    targets: list[str]
    duration: float
    scale: float
    boto3_share: float
    boto: BotoClients | None
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    dropped: int = 0
    max_lag_s: float = 0.0
    _rr: Iterator[str] = field(init=False)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._rr = itertools.cycle(self.targets)

    def _rate(self, stream: Stream, t: float) -> float:
        for phase, start, end in self.scenario.phase_bounds(self.duration):
            if start <= t < end:
                return stream.rate * phase.multiplier * self.scale
        return 0.0

    async def _one(
        self, session: aiohttp.ClientSession, stream: Stream, n: int, t_sched: float, t0: float
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        self.max_lag_s = max(self.max_lag_s, loop.time() - t0 - t_sched)
        base, body = next(self._rr), _body(stream, n)
        # ``share`` of each stream's calls go through boto3, spread evenly (closed-loop jobs:
        # all, as a batch job uses the SDK); deterministic, so both systems get the same split.
        share = self.boto3_share
        use_boto = self.boto is not None and (
            stream.workers > 0 or int((n + 1) * share) > int(n * share)
        )
        if use_boto:
            assert self.boto is not None
            answer = await loop.run_in_executor(
                self.boto.executor, self.boto.call, base, stream, body
            )
        else:
            answer = await _send_aiohttp(session, base, stream, body)
        status, headers, error = answer
        outcome = Outcome(
            t_sched,
            stream.priority,
            stream.workload,
            "boto3" if use_boto else "aiohttp",
            status,
            loop.time() - t0 - t_sched,
            headers.get("x-sluice-degraded"),
            status in (429, 503) and "retry-after" in headers,
            error or _error_label(status, headers),
        )
        self.outcomes.append(outcome)
        return outcome

    async def _open_loop(
        self, session: aiohttp.ClientSession, stream: Stream, t0: float, rng: random.Random
    ) -> None:
        loop = asyncio.get_running_loop()
        t, n = 0.0, 0
        while True:
            rate = self._rate(stream, t)
            # Poisson arrivals; a zero-rate stretch is stepped over in 100 ms hops.
            t += rng.expovariate(rate) if rate > 0 else 0.1
            if t >= self.duration:
                return
            await asyncio.sleep(max(0.0, t0 + t - loop.time()))
            if rate <= 0:
                continue
            if len(self._pending) >= MAX_OUTSTANDING:
                self.dropped += 1
                continue
            task = loop.create_task(self._one(session, stream, n, t, t0))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            n += 1

    async def _worker(
        self, session: aiohttp.ClientSession, stream: Stream, index: int, t0: float
    ) -> None:
        loop = asyncio.get_running_loop()
        n = index
        while (t := loop.time() - t0) < self.duration:
            outcome = await self._one(session, stream, n, t, t0)
            n += stream.workers
            if outcome.status == 200:
                continue
            # A job backs off on refusal: Retry-After when given (capped so a resume is
            # noticed), a short pause otherwise -- never a hot loop against a refusal.
            await asyncio.sleep(MAX_BACKOFF_S if outcome.retry_after else 0.2)

    async def run(self, sim_url: str, instances: Sequence[str]) -> list[Sample]:
        loop = asyncio.get_running_loop()
        samples: list[Sample] = []
        stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            t0 = loop.time()
            sampler = loop.create_task(sample_loop(session, sim_url, instances, t0, stop, samples))
            rng = random.Random(self.seed)
            drivers = []
            for stream in self.scenario.streams:
                if stream.workers:
                    drivers += [self._worker(session, stream, w, t0) for w in range(stream.workers)]
                else:
                    drivers.append(
                        self._open_loop(session, stream, t0, random.Random(rng.random()))
                    )
            await asyncio.gather(*drivers)
            if self._pending:  # answers still on their way: bounded by the client timeout
                await asyncio.wait(self._pending, timeout=CLIENT_TIMEOUT_S + 5)
            await asyncio.sleep(2 * SAMPLE_S)  # one more sample after the last answer
            stop.set()
            await sampler
        return samples


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _http(method: str, url: str, data: bytes | None = None, timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


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
            base + _invoke_path(stream.model_id), _body(stream, 0), headers, method="POST"
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
        _http("POST", sim_url + "/_sim/reset", b"{}")
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
# Figures
# --------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def class_figures(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Requests, success, latency of successes, degradations, refusals, other errors."""
    ok = sorted(o.latency_s for o in outcomes if o.status == 200)
    refused = sum(1 for o in outcomes if o.retry_after)
    # Refusals that carry Retry-After are counted on their own; the rest are what a caller
    # can do nothing about (Bedrock's throttles passed through, timeouts, 5xx).
    errors = Counter(
        o.error or str(o.status) for o in outcomes if o.status != 200 and not o.retry_after
    )
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "success_rate": len(ok) / len(outcomes) if outcomes else None,
        "p50_ms": _ms(percentile(ok, 50)),
        "p99_ms": _ms(percentile(ok, 99)),
        "degraded": dict(Counter(o.degraded for o in outcomes if o.degraded)),
        "refused_retry_after": refused,
        "errors": dict(errors),
    }


def summarize(run: dict[str, Any], scenario: Scenario, duration: float) -> dict[str, Any]:
    outcomes: list[Outcome] = run["outcomes"]
    classes = scenario.classes
    per_class = {c: class_figures([o for o in outcomes if o.priority == c]) for c in classes}
    per_phase: dict[str, dict[str, Any]] = {}
    for phase, start, end in scenario.phase_bounds(duration):
        key = f"{phase.name} [{start:.0f}-{end:.0f} s]"
        per_phase[key] = {
            c: class_figures([o for o in outcomes if o.priority == c and start <= o.t < end])
            for c in classes
        }
    samples: list[Sample] = run["samples"]
    upstream: dict[str, Any] = {}
    if samples:
        # The simulator was reset just before the load, so its final counters are the run's.
        for model, now in samples[-1].sim.items():
            upstream[model] = {
                "requests": now["requests"],
                "throttled": now["throttled"],
                "throttle_rate": now["throttled"] / now["requests"] if now["requests"] else None,
                "peak_in_flight": now["peak_concurrency"],
            }
    return {"classes": per_class, "phases": per_phase, "upstream": upstream}


def _degraded_text(d: dict[str, int], n: int) -> str:
    if not d:
        return "0"
    total = sum(d.values())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
    return f"{total} ({total / n:.0%}: {kinds})"


def _errors_text(d: dict[str, int]) -> str:
    if not d:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:3])


def class_table(summaries: dict[str, dict[str, Any]]) -> str:
    headers = ["Class", "System", "Requests", "Success", "p50 ms", "p99 ms", "Degraded",
               "Refused w/ Retry-After", "Other errors (top 3)"]  # fmt: skip
    rows = []
    classes = next(iter(summaries.values()))["classes"]
    for cls in classes:
        for system, summary in summaries.items():
            f = summary["classes"][cls]
            rows.append(
                [
                    cls,
                    system,
                    f"{f['requests']:,}",
                    fmt(None if f["success_rate"] is None else f["success_rate"] * 100, ".1f", "%"),
                    fmt(f["p50_ms"]),
                    fmt(f["p99_ms"]),
                    _degraded_text(f["degraded"], f["requests"]),
                    f"{f['refused_retry_after']:,}",
                    _errors_text(f["errors"]),
                ]
            )
    return render_table(headers, rows)


def phase_table(summary: dict[str, Any]) -> str:
    headers = ["Phase", "Class", "Requests", "Success", "p99 ms", "Degraded", "Refused w/ RA"]
    rows = []
    for phase, by_class in summary["phases"].items():
        for cls, f in by_class.items():
            rows.append(
                [
                    phase,
                    cls,
                    f"{f['requests']:,}",
                    fmt(None if f["success_rate"] is None else f["success_rate"] * 100, ".1f", "%"),
                    fmt(f["p99_ms"]),
                    f"{sum(f['degraded'].values()):,}",
                    f"{f['refused_retry_after']:,}",
                ]
            )
    return render_table(headers, rows)


def upstream_table(summaries: dict[str, dict[str, Any]], quotas: dict[str, int | None]) -> str:
    headers = ["Upstream model", "System", "Calls", "Throttled", "Throttle rate", "Peak in-flight",
               "Quota"]  # fmt: skip
    rows = []
    models = sorted({m for s in summaries.values() for m in s["upstream"]})
    for model in models:
        for system, summary in summaries.items():
            u = summary["upstream"].get(model)
            if u is None:
                continue
            rate = u["throttle_rate"]
            rows.append(
                [
                    model.split(".", 1)[-1],
                    system,
                    f"{u['requests']:,}",
                    f"{u['throttled']:,}",
                    fmt(None if rate is None else rate * 100, ".1f", "%"),
                    str(u["peak_in_flight"]),
                    str(quotas.get(model) or "-"),
                ]
            )
    return render_table(headers, rows)


# --------------------------------------------------------------------------------------------
# Time series and the plot
# --------------------------------------------------------------------------------------------


def pool_models(policy: dict[str, Any], sim_config: dict[str, Any]) -> dict[str, str]:
    """Sluice pool -> the simulator model whose quota it draws on (aliases resolved)."""
    alias = {a: m for m, spec in (sim_config.get("models") or {}).items()
             for a in spec.get("aliases", [])}  # fmt: skip
    return {p: alias.get(spec["ids"][0], spec["ids"][0]) for p, spec in policy["models"].items()}


def series(
    run: dict[str, Any], policy: dict[str, Any], pools: dict[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Per-sample time series for the plot and JSON, plus notes about metrics not exposed."""
    samples: list[Sample] = run["samples"]
    notes: list[str] = []
    ts = [s.t for s in samples]
    out: dict[str, Any] = {"t": ts, "models": {}, "limits": {}, "breaker": {}, "paused": {}}
    out["sluice_in_flight"] = {}
    for model in {m for s in samples for m in s.sim}:
        inflight = [s.sim.get(model, {}).get("in_flight", 0) for s in samples]
        throttled = [s.sim.get(model, {}).get("throttled", 0) for s in samples]
        # Over the trailing second: a 250 ms delta of a handful of throttles is mostly noise.
        back = round(1 / SAMPLE_S)
        rates = [
            (throttled[i] - throttled[max(0, i - back)]) / max(1e-6, ts[i] - ts[max(0, i - back)])
            for i in range(len(ts))
        ]
        out["models"][model] = {"in_flight": inflight, "throttles_per_s": rates}
    if run["system"] != "sluice":
        return out, notes

    def gauge(name: str, label: str, combine: Callable[[list[float]], float]) -> list[float | None]:
        vals = []
        for s in samples:
            got = [g[name][label] for g in s.gauges if label in g.get(name, {})]
            vals.append(combine(got) if got else None)
        return vals

    for pool in pools:
        vals = gauge("sluice_in_flight", pool, sum)
        if any(v for v in vals):
            out["sluice_in_flight"][pool] = vals
        configured = policy["models"][pool].get("concurrency")
        for name in ("sluice_pool_concurrency_limit", "sluice_adaptive_limit"):
            vals = gauge(name, pool, max)
            if any(v is not None for v in vals):
                out["limits"][pool] = {"source": name, "values": vals}
                break
        else:
            out["limits"][pool] = {"source": "configured", "values": [configured] * len(ts)}
            notes.append(
                f"pool {pool}: no sluice_pool_concurrency_limit / sluice_adaptive_limit in "
                f"/metrics; plotted the configured limit ({configured})"
            )
        if policy["models"][pool].get("breaker"):
            vals = gauge("sluice_breaker_state", pool, max)
            if any(v is not None for v in vals):
                out["breaker"][pool] = vals
            else:
                notes.append(f"pool {pool}: breaker configured but sluice_breaker_state absent")
    for wl, spec in policy.get("workloads", {}).items():
        if spec.get("pause"):
            vals = gauge("sluice_workload_paused", wl, max)
            if any(v is not None for v in vals):
                out["paused"][wl] = vals
            else:
                notes.append(f"workload {wl}: pause rule set but sluice_workload_paused absent")
    return out, notes


def _per_second(
    outcomes: Sequence[Outcome], duration: float, pick: Callable[[Outcome], bool]
) -> tuple[list[int], list[int]]:
    bins = [0] * (int(duration) + 1)
    for o in outcomes:
        if pick(o):
            bins[min(len(bins) - 1, int(o.t))] += 1
    return list(range(len(bins))), bins


def _rolling_p99(
    outcomes: Sequence[Outcome], duration: float, window: float = 5.0
) -> tuple[list[int], list[float]]:
    done = sorted((o.t + o.latency_s, o.latency_s) for o in outcomes if o.status == 200)
    xs, ys = [], []
    for end in range(1, int(duration + CLIENT_TIMEOUT_S) + 1):
        lat = sorted(v for t, v in done if end - window < t <= end)
        if lat:
            xs.append(end)
            ys.append((percentile(lat, 99) or 0) * 1000)
    return xs, ys


def plot(
    path: Path,
    scenario: Scenario,
    runs: dict[str, dict[str, Any]],
    ts_by_system: dict[str, dict[str, Any]],
    policy: dict[str, Any],
    pools: dict[str, str],
    quotas: dict[str, int | None],
    duration: float,
) -> str | None:
    """Write the PNG; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no PNG written"
    main = "sluice" if "sluice" in ts_by_system else next(iter(ts_by_system))
    ts = ts_by_system[main]
    models = [m for m in dict.fromkeys(pools.values()) if m in ts["models"]]
    classes = scenario.classes
    fig, axes = plt.subplots(len(models) + 2, 1, figsize=(12, 3.2 * (len(models) + 2)), sharex=True)
    palette = {"P0": "tab:red", "P1": "tab:orange", "P2": "tab:blue", "batch": "tab:gray"}
    spare = iter(["tab:olive", "tab:cyan", "tab:pink", "tab:brown"])
    colors = {c: palette.get(c) or next(spare, "black") for c in classes}

    def shade(ax: Any) -> None:
        for phase, start, end in scenario.phase_bounds(duration):
            if phase.multiplier > 1:
                ax.axvspan(start, end, color="gold", alpha=0.12, lw=0)
        for vals in ts["paused"].values():
            for t, v in zip(ts["t"], vals, strict=True):
                if v:
                    ax.axvspan(t, t + SAMPLE_S, color="purple", alpha=0.10, lw=0)

    for ax, model in zip(axes, models, strict=False):
        m = ts["models"][model]
        ax.plot(ts["t"], m["in_flight"], color="tab:blue", lw=1, label="in-flight (simulator)")
        if quotas.get(model):
            ax.axhline(quotas[model], color="black", ls=":", lw=1, label="account quota")
        mine = [p for p, x in pools.items() if x == model]
        for pool, color in zip(mine, ["tab:green", "tab:purple", "tab:brown"], strict=False):
            held = ts.get("sluice_in_flight", {}).get(pool)
            if held and len(mine) > 1:  # which pool holds the shared quota's slots
                ax.plot(ts["t"], [v or 0 for v in held], color=color, lw=0.8, ls="--",
                        label=f"in-flight via {pool} (Sluice)")  # fmt: skip
            lim = ts["limits"].get(pool)
            if lim:
                ax.step(ts["t"], [v if v is not None else float("nan") for v in lim["values"]],
                        where="post", lw=1.5, color=color,
                        label=f"limit {pool} ({lim['source']})")  # fmt: skip
            for t, v in zip(ts["t"], ts["breaker"].get(pool, []), strict=False):
                if v == 2:
                    ax.axvspan(t, t + SAMPLE_S, color="red", alpha=0.15, lw=0)
        twin = ax.twinx()
        twin.plot(ts["t"], m["throttles_per_s"], color="tab:red", lw=0.8, alpha=0.8,
                  label="throttles/s")  # fmt: skip
        base = ts_by_system.get("direct", {}).get("models", {}).get(model)
        if base is not None and main != "direct":
            twin.plot(ts_by_system["direct"]["t"], base["throttles_per_s"], color="tab:red",
                      lw=0.8, ls=":", alpha=0.6, label="throttles/s, direct baseline")  # fmt: skip
        twin.set_ylabel("throttles/s")
        peak = max([1.0, *m["throttles_per_s"], *(base or {}).get("throttles_per_s", [])])
        twin.set_ylim(bottom=0, top=peak * 1.1)

        ax.set_ylabel("concurrent calls")
        ax.set_title(f"{model} -- Sluice pools {mine}")
        lines = ax.get_legend_handles_labels()
        tl = twin.get_legend_handles_labels()
        ax.legend(lines[0] + tl[0], lines[1] + tl[1], loc="upper left", fontsize=7)
        shade(ax)
    outcomes: list[Outcome] = runs[main]["outcomes"]
    ax = axes[-2]
    for cls in classes:
        x, ok = _per_second(
            outcomes, duration, lambda o, c=cls: o.priority == c and o.status == 200
        )
        _, deg = _per_second(
            outcomes, duration, lambda o, c=cls: o.priority == c and bool(o.degraded)
        )
        _, ref = _per_second(
            outcomes, duration, lambda o, c=cls: o.priority == c and o.status != 200
        )
        ax.plot(x, ok, color=colors[cls], lw=1.2, label=f"{cls} answered/s")
        if any(deg):
            ax.plot(x, deg, color=colors[cls], lw=0.8, ls="--", label=f"{cls} degraded/s")
        if any(ref):
            ax.plot(x, ref, color=colors[cls], lw=0.8, ls=":", label=f"{cls} not 200/s")
    ax.set_ylabel("requests/s (by send time)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    shade(ax)
    ax = axes[-1]
    for cls in classes:
        x, y = _rolling_p99([o for o in outcomes if o.priority == cls], duration)
        ax.plot(x, y, color=colors[cls], lw=1.2, label=f"{cls} p99 (5 s window)")
        target = (policy.get("priorities", {}).get(cls) or {}).get("target_p99_ms")
        if target:
            ax.axhline(target, color=colors[cls], ls=":", lw=1, label=f"{cls} target")
            ax.axhline(2 * target, color=colors[cls], ls="--", lw=1, label=f"{cls} 2x target")
    ax.set_ylabel("p99 of answers, ms")
    ax.set_xlabel("seconds (gold: surge phase; purple: batch paused; red: breaker open)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    shade(ax)
    ax.set_xlim(0, duration + 3)
    fig.suptitle(f"{scenario.title} ({main}, {runs[main]['targets']} target(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


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

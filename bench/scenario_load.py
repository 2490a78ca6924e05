"""The incident scenarios' load generator: scenarios, callers, sampling, the open-loop driver.

A scenario (``bench/scenarios/<name>.yaml`` + ``.load.yaml`` + ``.sim.yaml``) is phases
over time and streams of callers; :class:`Driver` sends their requests open-loop over
aiohttp (boto3's wire shape) or real boto3 clients, records one :class:`Outcome` each,
and samples the simulator and every instance meanwhile. Run by ``bench/scenarios.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml
from common import (
    BENCH_DIR,
    request_headers,
)

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


def request_body(stream: Stream, n: int) -> bytes:
    k = n % stream.prompts if stream.prompts else n
    prompt = stream.text.format(n=k) + f" [[sim:output_tokens={stream.output_tokens}]]"
    doc = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": max(256, stream.output_tokens),
        "system": "You are the shopping assistant of a Japanese manga store. Be brief.",
        "messages": [{"role": "user", "content": prompt}],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def invoke_path(model_id: str) -> str:
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
            base + invoke_path(stream.model_id), data=body, headers=headers
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


def http_call(method: str, url: str, data: bytes | None = None, timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


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
            text = http_call("GET", base + "/metrics").decode()
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
        base, body = next(self._rr), request_body(stream, n)
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

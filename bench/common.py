"""Shared plumbing for Sluice benchmarks: processes, ports, CPU pinning, accounting, statistics.

Everything here is reusable by other runners (``passthrough.py`` today, ``scenarios.py`` later):
start a server as its own process group, wait until it answers, read its CPU time from
``/proc``, and kill the whole group at the end -- including when the runner itself is interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# The model id boto3 would call; botocore percent-encodes ':' in the path, so the wire form has
# "%3A" and a proxy must forward it untouched (re-encoding changes the SigV4 canonical request).
MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
INVOKE_PATH = "/model/" + MODEL_ID.replace(":", "%3A") + "/invoke"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Workload: one realistic ~1 KB InvokeModel request as boto3 sends it
# --------------------------------------------------------------------------------------------


def request_body(target_bytes: int = 1024) -> bytes:
    """An Anthropic Messages body for Bedrock InvokeModel, padded to about ``target_bytes``."""
    import json

    doc: dict[str, Any] = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 256,
        "temperature": 0.2,
        "system": "You are a concise assistant for an online bookshop. Answer in two sentences.",
        "messages": [{"role": "user", "content": ""}],
    }
    base = len(json.dumps(doc, separators=(",", ":")))
    words = "Which of these three manga series would suit a reader who liked Mushishi? "
    filler = (words * (target_bytes // len(words) + 1))[: max(0, target_bytes - base)]
    doc["messages"][0]["content"] = filler
    return json.dumps(doc, separators=(",", ":")).encode()


def request_headers(now: datetime | None = None) -> dict[str, str]:
    """A boto3-like header set with a SigV4-shaped Authorization (not verifiable, by design).

    Date and credential scope are today's, so a proxy that checks the clock skew would accept
    them; the signature is random hex because the default policy accepts unauthenticated callers.
    """
    now = now or datetime.now(UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{now:%Y%m%d}/us-east-1/bedrock/aws4_request"
    return {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "Boto3/1.35.0 md/Botocore#1.35.0 ua/2.0 os/linux lang/python#3.11.7 "
        "cfg/retry-mode#legacy Botocore/1.35.0",
        "X-Amz-Date": amz_date,
        "Authorization": "AWS4-HMAC-SHA256 "
        f"Credential=AKIDCLIENT/{scope}, "
        "SignedHeaders=accept;content-type;host;x-amz-date, "
        f"Signature={secrets.token_hex(32)}",
        "amz-sdk-invocation-id": "6c0f3a57-2a4e-4b8e-9d7f-1b0c2d3e4f50",
        "amz-sdk-request": "attempt=1; max=3",
    }


# --------------------------------------------------------------------------------------------
# Ports and CPU layout
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel picks it, so no fixed test ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CpuLayout:
    """Which CPUs the system under test gets, and which everything else (load, upstream) gets.

    Pinning keeps the load generator from stealing cycles from the proxy it measures; on a
    2-core machine that means proxy on CPU 0, generator + upstream on CPU 1.
    """

    sut: str | None  # taskset list, e.g. "0"; None = not pinned
    rest: str | None  # e.g. "1" or "1-3"

    @property
    def pinned(self) -> bool:
        return self.sut is not None

    def describe(self) -> str:
        if not self.pinned:
            return "unpinned (taskset missing or fewer than 2 CPUs)"
        return f"system under test on CPU {self.sut}; generator, upstream, redis on CPU {self.rest}"

    def rest_count(self) -> int:
        return len(parse_cpu_list(self.rest)) if self.rest else (os.cpu_count() or 1)

    def prefix(self, role: str) -> list[str]:
        """argv prefix pinning a command to the CPUs of ``role`` ("sut" or "rest")."""
        cpus = self.sut if role == "sut" else self.rest
        return ["taskset", "-c", cpus] if cpus else []


def parse_cpu_list(spec: str) -> list[int]:
    """Parse a taskset-style list such as "0", "1-3" or "0,2-3"."""
    cpus: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def default_layout(sut: str | None = None, rest: str | None = None) -> CpuLayout:
    """CPU 0 for the system under test, the remaining CPUs for everything else, if possible."""
    available = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(available) < 2:
        return CpuLayout(None, None)
    first, others = available[0], available[1:]
    return CpuLayout(
        sut or str(first),
        rest or ",".join(str(c) for c in others),
    )


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

_LIVE: set[ManagedProcess] = set()


def _cleanup_all() -> None:
    for proc in list(_LIVE):
        proc.stop()


def install_cleanup() -> None:
    """Kill every started process group on exit, Ctrl-C or SIGTERM (no stray servers)."""
    atexit.register(_cleanup_all)

    def on_signal(signum: int, _frame: object) -> None:
        _cleanup_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


class ManagedProcess:
    """A server started in its own session, so stopping it kills its workers too."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = PROJECT_ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Servers write to a file, not a pipe: a full pipe would stall them mid-benchmark.
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        ok: Callable[[int], bool] = lambda status: status == 200,
    ) -> None:
        """Poll ``url`` until it answers with a status ``ok`` accepts; fail fast if we died."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
                time.sleep(0.05)
                continue
            if ok(status):
                return
            last = f"HTTP {status}"
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.name} not ready at {url} after {timeout}s ({last}):\n{self.log_tail()}"
        )

    def wait_tcp(self, port: int, *, timeout: float = 15.0) -> None:
        """Wait until something accepts connections on ``port`` (for non-HTTP servers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not listening on {port} after {timeout}s")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``grace`` seconds."""
        _LIVE.discard(self)
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace)
            # Workers may outlive a leader that exited on SIGTERM: sweep the group regardless.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        finally:
            self._log.close()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_redis(log_dir: Path, layout: CpuLayout) -> tuple[ManagedProcess, str]:
    """A throwaway redis-server (no persistence) on a free port; returns it and its URL."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not found on PATH")
    port = free_port()
    argv = [
        *layout.prefix("rest"),
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    proc = ManagedProcess("redis", argv, log_dir=log_dir)
    proc.wait_tcp(port)
    return proc, f"redis://127.0.0.1:{port}/0"


# --------------------------------------------------------------------------------------------
# CPU accounting from /proc
# --------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and ')' -- everything after the last ')' is space-separated.
    return raw[raw.rindex(")") + 2 :].split()


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in process group ``pgid`` (a server and its workers)."""
    total_ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # fields[0] is state, so pgrp is [2], utime [11], stime [12] (man 5 proc, minus 3).
        if fields is not None and int(fields[2]) == pgid:
            total_ticks += int(fields[11]) + int(fields[12])
    return total_ticks / _CLK_TCK


class CpuMeter:
    """CPU seconds used by a set of process groups between ``start()`` and ``stop()``."""

    def __init__(self, procs: Iterable[ManagedProcess]) -> None:
        self._pgids = [p.pid for p in procs]
        self._start = 0.0
        self.seconds = 0.0

    def _now(self) -> float:
        return sum(group_cpu_seconds(pgid) for pgid in self._pgids)

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> float:
        self.seconds = self._now() - self._start
        return self.seconds


def cpus_busy_seconds(cpus: Iterable[int]) -> float:
    """Non-idle time of the given CPUs from /proc/stat, summed (whoever ran on them)."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in wanted:
            ticks = [int(v) for v in values]
            busy += sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / _CLK_TCK


def wait_until_quiet(max_busy: float = 0.15, timeout: float = 30.0, window: float = 0.5) -> float:
    """Wait until all CPUs together are at most ``max_busy`` busy over ``window``; return it.

    On a shared machine someone's test suite can take most of a core for a minute; starting a
    measurement then only measures them. Gives up after ``timeout`` (the run then says so).
    """
    cpus = sorted(os.sched_getaffinity(0))
    deadline = time.monotonic() + timeout
    while True:
        before = cpus_busy_seconds(cpus)
        time.sleep(window)
        busy = (cpus_busy_seconds(cpus) - before) / (window * len(cpus))
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy


class Interference:
    """CPU time *other* processes took on the SUT's CPUs during a measurement.

    On a shared machine this is the noise: a proxy that lost 30% of its core to someone's test
    suite shows a lower req/s, while its CPU per request stays honest.
    """

    def __init__(self, layout: CpuLayout) -> None:
        self._cpus = parse_cpu_list(layout.sut) if layout.sut else []
        self._start = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        self._start, self._t0 = cpus_busy_seconds(self._cpus), time.monotonic()

    def stop(self, own_cpu_s: float) -> float | None:
        """Fraction of the SUT CPUs' wall time used by processes other than the SUT."""
        if not self._cpus:
            return None
        wall = (time.monotonic() - self._t0) * len(self._cpus)
        foreign = cpus_busy_seconds(self._cpus) - self._start - own_cpu_s
        return max(0.0, foreign / wall) if wall > 0 else None


# --------------------------------------------------------------------------------------------
# Statistics and output
# --------------------------------------------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that exist (a failed repetition contributes None)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table, so the output pastes straight into a README."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays the result."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def processes() -> Iterator[list[ManagedProcess]]:
    """Collect processes started in a block and stop them all (reverse order) when it ends."""
    started: list[ManagedProcess] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.stop()

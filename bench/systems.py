"""The systems a benchmark compares, and the upstreams they forward to.

A system is one column of a comparison: direct calls, the minimal forwarder, Sluice in some
configuration. Adding one (say Sluice with two workers) is adding a ``SystemSpec`` to ``SYSTEMS``;
runners (``passthrough.py``, later ``scenarios.py``) only iterate over them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common import BENCH_DIR, PROJECT_ROOT, CpuLayout, ManagedProcess, free_port

PY = sys.executable

#: Sluice re-signs towards the upstream with credentials from the standard AWS chain.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCH",
    "AWS_SECRET_ACCESS_KEY": "benchsecret",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for IMDS on a machine without one
}


# --------------------------------------------------------------------------------------------
# Systems under test: adding one is adding an entry to SYSTEMS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyContext:
    """What a proxy command needs to know about this measurement."""

    port: int
    upstream_url: str
    redis_url: str | None


@dataclass(frozen=True)
class SystemSpec:
    """One column of the comparison: how to start it (None = clients call the upstream)."""

    name: str
    description: str
    command: Callable[[ProxyContext], list[str]] | None
    needs_redis: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/healthz"


def _sluice(
    config: Path, *, redis: bool, tree: Path | None = None
) -> Callable[[ProxyContext], list[str]]:
    # Another checkout's Sluice (``tree``) runs its own package: put it first on sys.path.
    run = ["-m", "proxy"] if tree is None else ["-c", _FROM_TREE.format(tree=str(tree))]

    def argv(ctx: ProxyContext) -> list[str]:
        cmd = [
            PY,
            *run,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(ctx.port),
            "--upstream",
            ctx.upstream_url,
            "--config",
            str(config),
        ]
        if redis:
            assert ctx.redis_url is not None
            cmd += ["--redis-url", ctx.redis_url]
        return cmd

    return argv


def _forwarder(ctx: ProxyContext) -> list[str]:
    cmd = [PY, str(BENCH_DIR / "forwarder.py"), "--port", str(ctx.port)]
    cmd += ["--upstream", ctx.upstream_url]
    return cmd + (["--redis-url", ctx.redis_url] if ctx.redis_url else [])


_FROM_TREE = (
    "import runpy, sys; sys.path.insert(0, {tree!r}); "
    "runpy.run_module('proxy', run_name='__main__', alter_sys=True)"
)


def _old_tree_systems(tree: Path) -> tuple[SystemSpec, ...]:
    """``sluice@old`` and ``sluice+redis@old``: the same two systems from another checkout
    (``SLUICE_BENCH_OLD_TREE``, its own policy files), measured in the same interleaved run."""
    policies = tree / "bench" / "policies"
    return (
        SystemSpec(
            "sluice@old",
            f"Sluice pass-through from {tree}",
            _sluice(policies / "passthrough.yaml", redis=False, tree=tree),
            env=AWS_ENV,
        ),
        SystemSpec(
            "sluice+redis@old",
            f"Sluice with Redis quotas from {tree}",
            _sluice(policies / "quotas.yaml", redis=True, tree=tree),
            needs_redis=True,
            env=AWS_ENV,
        ),
    )


POLICIES = BENCH_DIR / "policies"
_OLD = os.environ.get("SLUICE_BENCH_OLD_TREE")


def _with_redis(name: str, description: str, policy: str) -> SystemSpec:
    """Sluice with a policy of ``bench/policies`` and ``--redis-url``."""
    return SystemSpec(
        name, description, _sluice(POLICIES / policy, redis=True), needs_redis=True, env=AWS_ENV
    )


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in (
        SystemSpec("direct", "client -> upstream, no proxy", None),
        SystemSpec(
            "forwarder", "minimal aiohttp+uvloop forwarder (bench/forwarder.py)", _forwarder
        ),
        SystemSpec(
            "forwarder+redis",
            "the forwarder + one unbatched Redis EVALSHA per request (issue 12's baseline)",
            _forwarder,
            needs_redis=True,
        ),
        SystemSpec(
            "sluice",
            "Sluice pass-through, embedded store (bench/policies/passthrough.yaml)",
            _sluice(POLICIES / "passthrough.yaml", redis=False),
            env=AWS_ENV,
        ),
        SystemSpec(
            "sluice+quotas",
            "the quotas of sluice+redis on the embedded store (the bookkeeping without Redis)",
            _sluice(POLICIES / "quotas.yaml", redis=False),
            env=AWS_ENV,
        ),
        _with_redis(
            "sluice+redis",
            "Sluice, never-binding quotas enforced in Redis (bench/policies/quotas.yaml)",
            "quotas.yaml",
        ),
        _with_redis(
            "sluice+redis-ahead",
            "sluice+redis with server.grants_ahead: 2 (bench/policies/quotas-ahead.yaml)",
            "quotas-ahead.yaml",
        ),
        # The same two on CPython's own allocator (``sluice serve`` otherwise re-executes on
        # jemalloc where it is installed: proxy/allocator.py), to price that choice.
        SystemSpec(
            "sluice-pymalloc",
            "sluice on CPython's allocator (SLUICE_ALLOCATOR=pymalloc)",
            _sluice(POLICIES / "passthrough.yaml", redis=False),
            env={**AWS_ENV, "SLUICE_ALLOCATOR": "pymalloc"},
        ),
        SystemSpec(
            "sluice+redis-pymalloc",
            "sluice+redis on CPython's allocator (SLUICE_ALLOCATOR=pymalloc)",
            _sluice(POLICIES / "quotas.yaml", redis=True),
            needs_redis=True,
            env={**AWS_ENV, "SLUICE_ALLOCATOR": "pymalloc"},
        ),
        *(_old_tree_systems(Path(_OLD)) if _OLD else ()),
    )
}


# --------------------------------------------------------------------------------------------
# Upstreams
# --------------------------------------------------------------------------------------------


def simulator_available() -> bool:
    """Whether ``python -m proxy simulate`` can start in this tree (it may be half-built)."""
    probe = [PY, "-c", "import proxy.cli, proxy.simulator; proxy.simulator.build_simulator_app"]
    return subprocess.run(probe, cwd=PROJECT_ROOT, capture_output=True, check=False).returncode == 0


def start_upstream(
    kind: str, delay_ms: float, role: str, layout: CpuLayout, workdir: Path
) -> tuple[ManagedProcess, str]:
    """Start the stub or the simulator on a free port; returns the process and its base URL.

    The simulator has no fixed-delay knob (its delays scale with prompt and reply size), so a
    delayed upstream is always the stub; the runner records which upstream each test used.
    """
    port = free_port()
    if kind == "simulator" and delay_ms == 0:
        config = workdir / "simulator.yaml"
        config.write_text("latency_scale: 0\n")
        argv = [
            PY,
            "-m",
            "proxy",
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--config",
            str(config),
        ]
    else:
        argv = [
            PY,
            str(BENCH_DIR / "stub_upstream.py"),
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
        ]
    proc = ManagedProcess(f"upstream-{kind}", [*layout.prefix(role), *argv], log_dir=workdir)
    base = f"http://127.0.0.1:{port}"
    # Any HTTP answer means the simulator is serving; it need not have a /healthz of its own.
    proc.wait_http(base + "/healthz", ok=lambda status: status < 500)
    return proc, base


def upstream_kind_for(test: str, requested: str) -> str:
    return requested if test == "saturation" else "stub"

"""``sluice serve --workers N``: N single-worker processes on one port (SO_REUSEPORT),
supervised by this one, which forwards its signals to them."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys

from proxy.commands.serve import banner, fleet
from proxy.config import Policy


def serve_workers(args: argparse.Namespace, policy: Policy) -> int:
    """Start the workers (and the simulator they share, if asked); exit with the worst code."""
    if not args.redis_url:
        print(
            "sluice: --workers > 1 needs --redis-url: the embedded store cannot be shared "
            "between processes, so each worker would enforce the limits alone",
            file=sys.stderr,
        )
        return 2
    children: list[subprocess.Popen[bytes]] = []
    upstream = args.upstream
    if upstream == "simulator":
        simulator, upstream = _start_simulator(args.simulator_config)
        children.append(simulator)
    command = _worker_command(args, upstream)
    children += [subprocess.Popen(command) for _ in range(args.workers)]
    print(banner(args, policy, upstream), file=sys.stderr, flush=True)
    return _supervise(children)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_simulator(config: str | None) -> tuple[subprocess.Popen[bytes], str]:
    """One simulator process for all workers, and its URL."""
    sim_port = _free_port()
    cmd = [sys.executable, "-m", "proxy", "simulate", "--port", str(sim_port)]
    if config:
        cmd += ["--config", config]
    return subprocess.Popen(cmd), f"http://127.0.0.1:{sim_port}"


def _worker_command(args: argparse.Namespace, upstream: str | None) -> list[str]:
    """``sluice serve`` for one worker: this command's flags, one worker, the port shared."""
    base = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
        "--reuse-port",
        "--redis-url",
        args.redis_url,
        "--log-level",
        args.log_level,
    ]
    for flag, value in (
        ("--config", args.config),
        ("--upstream", upstream),
        ("--region", args.region),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--fleet", fleet(args)),
    ):
        if value:
            base += [flag, value]
    if args.no_fleet:
        base.append("--no-fleet")
    return base


def _supervise(children: list[subprocess.Popen[bytes]]) -> int:
    """Forward SIGTERM, SIGINT and SIGHUP (policy reload) to every child; wait for all."""

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)  # policy reload in every worker
    codes = [child.wait() for child in children]
    return max(codes, default=0)

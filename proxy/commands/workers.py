"""``sluice serve --workers N``: N single-worker processes on one port (SO_REUSEPORT),
supervised by this one, which forwards its signals to them and replaces a worker that dies."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Final

from proxy import hangup
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
    simulator = None
    upstream = args.upstream
    if upstream == "simulator":
        simulator, upstream = _start_simulator(args.simulator_config)
    command = _worker_command(args, upstream)
    # The URL may carry Redis's password: in the workers' environment, never on their
    # command lines (which every user of the host can read with ps).
    env = dict(os.environ) if simulator is None else _simulator_env()
    env["SLUICE_REDIS_URL"] = args.redis_url
    supervisor = Supervisor(lambda: subprocess.Popen(command, env=env), simulator)
    supervisor.start(args.workers)
    print(banner(args, policy, upstream), file=sys.stderr, flush=True)
    return supervisor.run()


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


def _simulator_env() -> dict[str, str]:
    """Workers calling the shared simulator sign with its keys, as one process does: never
    the operator's real credentials, and none needed."""
    from proxy.app import SIMULATOR_CREDENTIALS

    env = {k: v for k, v in os.environ.items() if k not in _REAL_CREDENTIALS}
    env["AWS_ACCESS_KEY_ID"] = SIMULATOR_CREDENTIALS.access_key_id
    env["AWS_SECRET_ACCESS_KEY"] = SIMULATOR_CREDENTIALS.secret_access_key
    return env


#: What would make a worker's credential chain pick anything but the simulator's keys.
_REAL_CREDENTIALS: Final = frozenset(
    {"AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_BEARER_TOKEN_BEDROCK"}
)


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


#: How a worker ends when told to stop (Sluice exits 0 on SIGTERM and SIGINT; a process
#: without its handlers yet dies of them).
_DELIBERATE: Final = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


def exit_code(returncode: int) -> int:
    """A child's exit as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Keeps ``n`` workers running: forwards SIGTERM and SIGINT to every child (stop) and
    SIGHUP (policy reload) to the workers only (the simulator has no policy to reload);
    starts a new worker when one dies unexpectedly, unless workers keep dying
    (:data:`MAX_DEATHS` within :data:`DEATH_WINDOW_S`: then it stops them all); exits with
    the worst exit code."""

    #: Unexpected worker deaths tolerated within :data:`DEATH_WINDOW_S` before giving up.
    MAX_DEATHS = 5
    DEATH_WINDOW_S = 60.0
    POLL_S = 0.2
    #: A child still running this long after the stop was forwarded is killed: longer than a
    #: worker's own graceful shutdown (aiohttp's 60 s), so only a hung one meets it.
    STOP_GRACE_S = 90.0

    def __init__(
        self,
        spawn: Callable[[], subprocess.Popen[bytes]],
        simulator: subprocess.Popen[bytes] | None,
    ) -> None:
        self._spawn = spawn
        self.simulator = simulator
        self.workers: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._stop_at = 0.0  # time.monotonic() when the stop began
        self._deaths: list[float] = []
        self._worst = 0
        self._gone: set[subprocess.Popen[bytes]] = set()  # stopped on purpose, not replaced

    def start(self, n: int) -> None:
        # Workers start with SIGHUP blocked (mask inherited through fork and exec): one
        # forwarded while a worker is still starting stays pending until it listens
        # (proxy/hangup.py). The supervisor's own is delivered to forward() below.
        hangup.block()
        try:
            self.workers = [self._spawn() for _ in range(n)]
        finally:
            signal.signal(signal.SIGTERM, self._forward)
            signal.signal(signal.SIGINT, self._forward)
            signal.signal(signal.SIGHUP, self._forward)
            hangup.unblock()
        if hangup.taken():  # one came before the supervisor listened
            self._forward(signal.SIGHUP, None)

    def _start_worker(self) -> subprocess.Popen[bytes]:
        """A worker started with SIGHUP blocked (see :meth:`start`); the supervisor's own
        pending one, if any, reaches :meth:`_forward` after."""
        hangup.block()
        try:
            return self._spawn()
        finally:
            hangup.unblock()

    def _children(self) -> list[subprocess.Popen[bytes]]:
        return self.workers + ([self.simulator] if self.simulator is not None else [])

    def _forward(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            self._begin_stop()
        for child in self.workers if signum == signal.SIGHUP else self._children():
            if child.poll() is None:
                child.send_signal(signum)

    def _begin_stop(self) -> None:
        if not self._stopping:
            self._stopping, self._stop_at = True, time.monotonic()

    def _stop_all(self) -> None:
        self._begin_stop()
        for child in self._children():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Supervise until every child has exited; the worst exit code."""
        killed = False
        while True:
            self._check()
            if all(child.poll() is not None for child in self._children()):
                break
            if (
                self._stopping
                and not killed
                and time.monotonic() - self._stop_at > self.STOP_GRACE_S
            ):
                killed = True
                for child in self._children():
                    if child.poll() is None:
                        print(
                            f"sluice: pid {child.pid} still running {self.STOP_GRACE_S:g} s "
                            "after the stop; killing it",
                            file=sys.stderr,
                            flush=True,
                        )
                        child.kill()
            time.sleep(self.POLL_S)
        # (a child that ended as told to, the simulator killed by SIGTERM say, is no failure)
        codes = [
            0 if child.returncode in _DELIBERATE else exit_code(child.returncode)
            for child in self._children()
        ]
        return max([self._worst, *codes])

    def _check(self) -> None:
        if self._stopping:
            return
        sim = self.simulator
        if sim is not None and sim.poll() is not None:
            print(
                f"sluice: the simulator (pid {sim.pid}) exited with {exit_code(sim.returncode)}; "
                "stopping the workers",
                file=sys.stderr,
                flush=True,
            )
            self._worst = max(self._worst, exit_code(sim.returncode) or 1)
            self._stop_all()
            return
        for i, worker in enumerate(self.workers):
            if worker.poll() is None or worker in self._gone:
                continue
            code = exit_code(worker.returncode)
            if worker.returncode in _DELIBERATE:
                # Stopped on purpose (a signal to the process group or to this worker
                # alone, which the supervisor may see before its own): not replaced.
                self._gone.add(worker)
                print(
                    f"sluice: worker {worker.pid} stopped (exit {code}); not replaced",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < self.DEATH_WINDOW_S] + [now]
            self._worst = max(self._worst, code or 1)  # reported at exit, not lost
            if len(self._deaths) > self.MAX_DEATHS:
                print(
                    f"sluice: worker {worker.pid} exited with {code}, the "
                    f"{len(self._deaths)}th worker to exit within {self.DEATH_WINDOW_S:g} s; "
                    "stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                self._stop_all()
                return
            self.workers[i] = replacement = self._start_worker()
            print(
                f"sluice: worker {worker.pid} exited with {code}; started worker "
                f"{replacement.pid} in its place",
                file=sys.stderr,
                flush=True,
            )
            if self._stopping:  # a stop signal arrived while it was being started
                replacement.send_signal(signal.SIGTERM)
        if not self._stopping and all(w.poll() is not None for w in self.workers):
            self._stop_all()  # every worker stopped on purpose: so does the instance

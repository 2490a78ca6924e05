"""Real redis-server processes for tests and benchmarks (no mocks, no fixed ports).

Fixtures:
  ``redis_server``   session-scoped standalone server (``--save "" --appendonly no``);
  ``redis_cluster``  session-scoped 3-master Redis Cluster, ``cluster_state:ok``;
  ``redis_factory``  start throwaway standalone servers inside one test (fault tests);
                     all are killed at the end of the test.

The classes :class:`RedisServerProcess` and :class:`RedisClusterProcesses` work without
pytest too (``bench/`` uses them).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.admission_helpers import Backend

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_port(*, bus: bool = False) -> int:
    """A currently free TCP port on 127.0.0.1 (with ``bus``: port + 10000 free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not bus:
            return port
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServerProcess:
    """One redis-server on a free loopback port, in its own temp dir, no persistence."""

    def __init__(
        self,
        *extra_args: str,
        port: int | None = None,
        cluster: bool = False,
        node_timeout_ms: int = 5000,
    ) -> None:
        self.port = port or free_port(bus=cluster)
        self.dir = Path(tempfile.mkdtemp(prefix=f"sluice-redis-{self.port}-"))
        self.extra_args = list(extra_args)
        if cluster:
            self.extra_args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(node_timeout_ms),
            ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServerProcess:
        """Start the server and wait until it answers PING."""
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
            "--protected-mode", "no", *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while not _ping(self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server on {self.port} exited: {err}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on {self.port} did not answer PING")
            time.sleep(0.02)
        return self

    def cli(self, *args: str) -> str:
        """Run ``redis-cli -p <port> args...`` and return its stdout."""
        out = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args], capture_output=True, check=True, timeout=30
        )
        return out.stdout.decode()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def restart(self) -> RedisServerProcess:
        """Start again on the same port (empty: no persistence)."""
        self.kill()
        return self.start()

    def cleanup(self) -> None:
        """Kill and remove the temp dir."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterProcesses:
    """A 3-master Redis Cluster of :class:`RedisServerProcess` on free ports; with
    ``replicas``, that many replicas per master (which fail over in about
    ``node_timeout_ms`` when their master dies)."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 5000) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisServerProcess(cluster=True, node_timeout_ms=node_timeout_ms)
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<first port>`` (the store's cluster URL)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout_s: float = 30.0) -> RedisClusterProcesses:
        """Start the nodes, create the cluster and wait for ``cluster_state:ok`` on all."""
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [REDIS_CLI, "--cluster", "create",
                 *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, check=True, timeout=60,
            )  # fmt: skip
            deadline = time.monotonic() + timeout_s
            while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("cluster did not reach cluster_state:ok")
                time.sleep(0.1)
            # A replica that never synced refuses to fail over (its data has no age).
            synced = "master_link_status:up"
            while self.replicas and sum(
                synced in n.cli("info", "replication") for n in self.nodes
            ) < (len(self.nodes) * self.replicas // (1 + self.replicas)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the replicas did not sync with their masters")
                time.sleep(0.1)
        except BaseException:
            self.cleanup()
            raise
        return self

    def master_of(self, hash_tag: str) -> RedisServerProcess:
        """The node serving the slot of ``{hash_tag}`` now (as a live node sees the map)."""
        live = next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        slot = int(live.cli("cluster", "keyslot", "{" + hash_tag + "}").strip())
        for line in live.cli("cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if not part.startswith("[") and int(lo) <= slot <= int(hi or lo):
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves the slot of {{{hash_tag}}}")

    def cleanup(self) -> None:
        """Kill every node and remove their dirs."""
        for node in self.nodes:
            node.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServerProcess]:
    """A standalone redis-server shared by the session; tests use distinct key names."""
    server = RedisServerProcess().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A 3-master Redis Cluster shared by the session."""
    cluster = RedisClusterProcesses().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(params=["embedded", "redis", pytest.param("cluster", marks=pytest.mark.cluster)])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each admission-store test runs on the embedded store, one Redis and a 3-master cluster."""
    if request.param == "embedded":
        return Backend("embedded", None)
    server = request.getfixturevalue(
        "redis_server" if request.param == "redis" else "redis_cluster"
    )
    return Backend(request.param, server.url)


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServerProcess]]:
    """Start private servers inside a test: ``redis_factory(*extra_args)``; killed at the end."""
    started: list[RedisServerProcess] = []

    def start(*extra_args: str) -> RedisServerProcess:
        server = RedisServerProcess(*extra_args).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.cleanup()

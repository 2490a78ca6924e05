"""A SIGHUP (policy reload) sent while Sluice is starting neither kills it nor its workers
(``proxy/hangup.py``): from the first lines of ``sluice serve`` it is blocked (pending, across
the re-execution on jemalloc too), then noted until the reloader listens; a supervisor starts
its workers with it blocked and forwards it to workers only (the simulator has no policy).
And a ``--workers`` supervisor replaces a worker that dies, and says so in its exit code."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy import hangup
from proxy.allocator import SAVED
from tests.support.processes import Proc, Simulator, _env, free_port
from tests.support.redis_fixtures import RedisServerProcess

_HUP_BIT = 1 << (signal.SIGHUP - 1)


def _hup_handled(pid: int) -> bool:
    """The process blocks, ignores or catches SIGHUP (``/proc/<pid>/status``)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    masks = {
        k: int(v, 16)
        for k, _, v in (ln.partition(":\t") for ln in lines)
        if k in ("SigBlk", "SigIgn", "SigCgt")
    }
    return bool(
        (masks.get("SigBlk", 0) | masks.get("SigIgn", 0) | masks.get("SigCgt", 0)) & _HUP_BIT
    )


def _reexecuted(pid: int) -> bool:
    """``sluice serve`` re-executed itself (on jemalloc): the new image's environment says so."""
    try:
        return SAVED.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _start(tmp_path: Path, args: list[str]) -> tuple[Proc, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "proxy", "serve", "--port", str(port), *args]
    env = _env(
        {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
    )
    return Proc(f"sluice-{port}", cmd, tmp_path, env), f"http://127.0.0.1:{port}"


def _start_workers(tmp_path: Path, redis: RedisServerProcess) -> tuple[Proc, str]:
    """``sluice serve --workers 2`` with the simulator: a supervisor and three children."""
    args = ["--upstream", "simulator", "--workers", "2", "--no-fleet"]
    return _start(tmp_path, [*args, "--redis-url", redis.url])


def _hup_until_serving(proc: Proc, url: str, then_s: float = 1.0) -> int:
    """SIGHUP every 10 ms from the moment it handles one (or has just re-executed itself:
    the new interpreter's start) until it serves, and ``then_s`` after; returns how many
    were sent before it served."""
    deadline = time.monotonic() + 30
    while not (_hup_handled(proc.pid) or _reexecuted(proc.pid)):
        assert proc.popen.poll() is None, proc.stderr()
        assert time.monotonic() < deadline, "never handled SIGHUP"
        time.sleep(0.001)
    sent = 0
    while not _healthy(url):
        assert proc.popen.poll() is None, f"died of SIGHUP while starting:\n{proc.stderr()}"
        assert time.monotonic() < deadline, proc.stderr()
        os.kill(proc.pid, signal.SIGHUP)
        sent += 1
        time.sleep(0.002 if sent < 20 else 0.01)
    end = time.monotonic() + then_s
    while time.monotonic() < end:
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(0.01)
    return sent


def test_sighup_while_starting_does_not_kill_a_single_instance(
    tmp_path: Path, sim: Simulator
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text((Path(__file__).parents[1] / "policies" / "default.yaml").read_text())
    proc, url = _start(tmp_path, ["--upstream", sim.url, "--config", str(policy)])
    try:
        sent = _hup_until_serving(proc, url)
        # It handled SIGHUP long before it could serve (not only once the reloader listened).
        assert sent >= 5
        assert proc.popen.poll() is None and _healthy(url)
    finally:
        proc.stop()


@pytest.mark.timeout(90)
def test_sighup_while_workers_start_kills_neither_workers_nor_the_simulator(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    proc, url = _start_workers(tmp_path, redis_server)
    try:
        _hup_until_serving(proc, url)
        children = _children(proc.pid)
        assert len(children) == 3, proc.stderr()  # the simulator and two workers, all alive
        assert all(Path(f"/proc/{c}").exists() for c in children)
        assert proc.popen.poll() is None and _healthy(url)
        assert "Traceback" not in proc.stderr()
    finally:
        proc.stop()


def test_a_sighup_noted_before_the_reloader_listens_is_taken_once() -> None:
    before = signal.getsignal(signal.SIGHUP)
    try:
        hangup.hold()
        assert not hangup.taken()
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.01)  # (the handler runs between bytecodes of the main thread)
        assert hangup.taken()
        assert not hangup.taken()
    finally:
        signal.signal(signal.SIGHUP, before)


def _workers(pid: int) -> list[int]:
    """The supervisor's worker processes (its other child is the simulator)."""
    return [c for c in _children(pid) if b"serve" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_a_worker_that_dies_is_replaced_and_the_exit_code_says_so(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    proc, url = _start_workers(tmp_path, redis_server)
    try:
        _wait(lambda: proc.stderr().count('"sluice ready"') == 2, 30, "workers never ready")
        before = _workers(proc.pid)
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        _wait(
            lambda: len(_workers(proc.pid)) == 2 and before[0] not in _workers(proc.pid),
            30,
            "the dead worker was not replaced",
        )
        # (said right after the new worker starts: waited for, not read at once)
        said = f"worker {before[0]} exited with 137; started worker"
        _wait(lambda: said in proc.stderr(), 10, "the replacement was not reported")
        replacement = next(w for w in _workers(proc.pid) if w != before[0] and w != before[1])
        _wait(lambda: _hup_handled(replacement) and _healthy(url), 30, "replacement not serving")
        os.kill(proc.pid, signal.SIGHUP)  # still forwarded, to the new worker too
        time.sleep(0.5)
        assert sorted(_workers(proc.pid)) == sorted([before[1], replacement])
        # A stop of the supervisor alone stops everything; its code reports the crash.
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 137
    finally:
        proc.stop()


@pytest.mark.timeout(90)
def test_workers_stopped_on_purpose_are_not_replaced_and_a_dead_simulator_stops_all(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    proc, url = _start_workers(tmp_path, redis_server)
    try:
        _wait(lambda: proc.stderr().count('"sluice ready"') == 2, 30, "workers never ready")
        workers = _workers(proc.pid)
        os.kill(workers[0], signal.SIGTERM)  # an operator stopping one worker
        _wait(
            lambda: f"worker {workers[0]} stopped (exit 0); not replaced" in proc.stderr(),
            30,
            f"a worker stopped on purpose was replaced or not reported ({workers}, "
            f"children {_children(proc.pid)}):\n{proc.stderr()}",
        )
        assert _workers(proc.pid) == [workers[1]]
        assert _healthy(url)  # the other worker still serves
        simulator = next(c for c in _children(proc.pid) if c != workers[1])
        os.kill(simulator, signal.SIGKILL)
        assert proc.popen.wait(30) == 137  # the simulator's death, reported
        assert "the simulator" in proc.stderr() and "stopping the workers" in proc.stderr()
    finally:
        proc.stop()

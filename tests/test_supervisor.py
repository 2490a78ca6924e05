"""The ``--workers`` supervisor (``proxy/commands/workers.py``) over real child processes:
small Python programs that crash, or ignore the stop, in place of Sluice workers (the
end-to-end cases with real workers are in tests/test_hangup.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from proxy.commands.workers import Supervisor, exit_code


@pytest.fixture(autouse=True)
def _signals_restored() -> Iterator[None]:
    # Supervisor.start installs its forwarding handlers in this (the test's) process.
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _child(code: str) -> Callable[[], subprocess.Popen[bytes]]:
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def test_exit_codes_read_like_a_shells() -> None:
    assert [exit_code(c) for c in (0, 3, -9, -15)] == [0, 3, 137, 143]


def test_workers_that_keep_dying_stop_the_instance_with_their_code() -> None:
    started: list[subprocess.Popen[bytes]] = []
    crash = _child("import sys; sys.exit(3)")

    def spawn() -> subprocess.Popen[bytes]:
        started.append(crash())
        return started[-1]

    sup = Supervisor(spawn, None)
    sup.MAX_DEATHS, sup.POLL_S = 2, 0.05
    sup.start(1)
    assert sup.run() == 3
    assert len(started) == 3  # the first and two replacements; the third death stops it


def test_a_child_that_ignores_the_stop_is_killed_and_reported() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )

    def stubborn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)

    sup = Supervisor(stubborn, None)
    sup.STOP_GRACE_S, sup.POLL_S = 0.5, 0.05
    sup.start(2)
    for w in sup.workers:  # (each ignores SIGTERM from here on)
        assert w.stdout is not None and w.stdout.readline() == b"up\n"
    signal.raise_signal(signal.SIGTERM)  # delivered to the supervisor's own handler
    assert sup.run() == 137  # killed after the grace: a hang is not a clean exit
    assert all(w.returncode == -signal.SIGKILL for w in sup.workers)

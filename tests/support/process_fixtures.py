"""pytest plugin: the simulator and Sluice as real processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import Simulator, Sluice, TLSFiles


@pytest.fixture(scope="session")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """One simulator for the session (verifying Sluice's signatures); reset per test."""
    sim = Simulator(tmp_path_factory.mktemp("sim"))
    yield sim
    sim.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA and a 127.0.0.1 certificate for serving Sluice over HTTPS."""
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def sim(simulator: Simulator) -> Simulator:
    """The session simulator with its stats and runtime config reset."""
    simulator.reset()
    return simulator


@pytest.fixture
def make_simulator(tmp_path: Path) -> Iterator[Callable[..., Simulator]]:
    """Start a dedicated simulator with its own config (quotas, faults, latency)."""
    started: list[Simulator] = []

    def make(config: dict[str, Any] | None = None) -> Simulator:
        s = Simulator(tmp_path / "sim", config)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def make_sluice(tmp_path: Path) -> Iterator[Callable[..., Sluice]]:
    """Start Sluice processes; all are stopped when the test ends."""
    started: list[Sluice] = []

    def make(**kwargs: Any) -> Sluice:
        p = Sluice(tmp_path / "sluice", **kwargs)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()

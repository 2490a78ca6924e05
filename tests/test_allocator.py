"""``sluice serve`` runs on jemalloc where the machine has it (``proxy/allocator.py``):
it re-executes itself once, same pid, and says so in its banner and metrics; an operator's
``SLUICE_ALLOCATOR`` and ``MALLOC_CONF`` are honoured, a bad one is a clear exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import allocator
from proxy.allocator import (
    FELL_BACK,
    MALLOC_CONF,
    SAVED,
    AllocatorError,
    reexec_environment,
    restore_environment,
)
from tests.support.jobs_helpers import wait_until
from tests.support.processes import ROOT, Proc, Simulator, Sluice, _env, free_port
from tests.support.redis_fixtures import RedisServerProcess

HAVE_JEMALLOC = allocator.find_jemalloc() is not None
needs_jemalloc = pytest.mark.skipif(not HAVE_JEMALLOC, reason="libjemalloc2 is not installed")


def _found() -> str:
    return "libjemalloc.so.2"


def _missing() -> None:
    return None


def _on_pymalloc() -> str:
    return "pymalloc"


def _env_for(environ: dict[str, str], find: Any = _found, **kw: Any) -> dict[str, str] | None:
    """reexec_environment for a process on pymalloc (whatever the test itself runs on)."""
    return reexec_environment(environ, find, _on_pymalloc, **kw)


def test_auto_preloads_jemalloc_and_keeps_the_operators_preload() -> None:
    env = _env_for({"LD_PRELOAD": "libfoo.so", "PATH": "/bin"})
    assert env is not None
    assert env["LD_PRELOAD"] == "libjemalloc.so.2:libfoo.so"
    assert env["PYTHONMALLOC"] == "malloc"
    assert env["MALLOC_CONF"] == MALLOC_CONF
    assert env["PATH"] == "/bin"
    # What it changed, as it was: put back once the new process runs.
    assert json.loads(env[SAVED]) == {
        "LD_PRELOAD": "libfoo.so",
        "PYTHONMALLOC": None,
        "MALLOC_CONF": None,
    }


def test_the_operators_malloc_conf_is_appended_so_it_wins() -> None:
    env = _env_for({"MALLOC_CONF": "narenas:2"})
    assert env is not None and env["MALLOC_CONF"] == f"{MALLOC_CONF},narenas:2"


def test_jemalloc_already_preloaded_is_not_preloaded_twice() -> None:
    env = _env_for({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert env is not None
    assert env["LD_PRELOAD"] == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_an_operators_choice_and_a_missing_library_stay_as_they_are() -> None:
    assert _env_for({"SLUICE_ALLOCATOR": "pymalloc"}) is None
    assert _env_for({}, _missing) is None  # auto: as started where there is none
    assert _env_for({"SLUICE_ALLOCATOR": "  AUTO "}, _missing) is None
    for chosen in ("malloc", "debug", "pymalloc_debug"):  # PYTHONMALLOC set: theirs
        assert _env_for({"PYTHONMALLOC": chosen}) is None
    # Asked for by name, jemalloc overrides it.
    env = _env_for({"PYTHONMALLOC": "debug", "SLUICE_ALLOCATOR": "jemalloc"})
    assert env is not None and env["PYTHONMALLOC"] == "malloc"
    # Already on jemalloc (preloaded by the operator): nothing to do.
    assert reexec_environment({}, _found, lambda: "jemalloc") is None


def test_jemalloc_asked_for_and_missing_is_an_error_saying_how_to_install() -> None:
    with pytest.raises(AllocatorError, match=r"SLUICE_ALLOCATOR=jemalloc.*libjemalloc2"):
        _env_for({"SLUICE_ALLOCATOR": "jemalloc"}, _missing)


def test_python_ignoring_its_environment_is_never_re_executed() -> None:
    assert _env_for({}, ignores_environment=True) is None
    with pytest.raises(AllocatorError, match="-E or -I"):
        _env_for({"SLUICE_ALLOCATOR": "jemalloc"}, ignores_environment=True)


def test_a_second_attempt_is_never_made() -> None:
    """Re-executed already and jemalloc still absent: no exec loop."""
    tried = {SAVED: "{}"}
    assert _env_for(tried) is None
    with pytest.raises(AllocatorError, match="did not load"):
        _env_for({**tried, "SLUICE_ALLOCATOR": "jemalloc"})


@pytest.mark.parametrize("value", ["tcmalloc", "1", "yes"])
def test_a_bad_value_names_the_variable_and_the_choices(value: str) -> None:
    with pytest.raises(AllocatorError, match=r"SLUICE_ALLOCATOR='.*' is not one of auto, jemalloc"):
        _env_for({"SLUICE_ALLOCATOR": value})


def test_the_operators_environment_comes_back_as_it_was() -> None:
    before = {"LD_PRELOAD": "libfoo.so", "PATH": "/bin"}
    env = _env_for(dict(before))
    assert env is not None
    restore_environment(env)
    assert env == before
    restore_environment(env)  # not re-executed: nothing to do
    assert env == before


def test_a_malformed_marker_changes_nothing() -> None:
    for marker in ("not json", '["LD_PRELOAD"]', '{"PATH": "/tmp"}', '{"LD_PRELOAD": 3}'):
        env = {SAVED: marker, "PATH": "/bin", "LD_PRELOAD": "libfoo.so"}
        restore_environment(env)
        assert env == {"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@needs_jemalloc
def test_serve_runs_on_jemalloc_in_the_same_process(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    sim = make_simulator()
    proxy = make_sluice(upstream=sim.url)
    # The pid the test started is the one serving: exec, not a child.
    assert "libjemalloc" in _maps(proxy.popen.pid)
    assert 'sluice_allocator_info{allocator="jemalloc"} 1.0' in proxy.metrics()
    assert "memory: jemalloc" in proxy.stderr()
    started_with = _environ(proxy.popen.pid)  # the environment of the re-execution
    assert started_with["MALLOC_CONF"] == MALLOC_CONF
    assert started_with["PYTHONMALLOC"] == "malloc"


@needs_jemalloc
def test_the_console_script_re_executes_too(tmp_path: Path) -> None:
    """``sluice serve`` as installed (what ``make run`` runs), not ``python -m proxy``."""
    script = Path(sys.executable).parent / "sluice"
    if not script.exists():
        pytest.skip("no sluice console script next to this python")
    port = free_port()
    proc = Proc(
        "sluice-script",
        [str(script), "serve", "--upstream", "simulator", "--port", str(port)],
        tmp_path,
        _env(None),
    )
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/healthz")
        assert "libjemalloc" in _maps(proc.popen.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert 'sluice_allocator_info{allocator="jemalloc"} 1.0' in resp.read().decode()
    finally:
        proc.stop()


@needs_jemalloc
def test_operator_settings_reach_the_process(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    sim = make_simulator()
    proxy = make_sluice(upstream=sim.url, env={"MALLOC_CONF": "narenas:2,dirty_decay_ms:500"})
    conf = _environ(proxy.popen.pid)["MALLOC_CONF"]
    assert conf == f"{MALLOC_CONF},narenas:2,dirty_decay_ms:500"  # theirs last: theirs win
    assert 'sluice_allocator_info{allocator="jemalloc"} 1.0' in proxy.metrics()


def test_pymalloc_when_asked(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    sim = make_simulator()
    proxy = make_sluice(upstream=sim.url, env={"SLUICE_ALLOCATOR": "pymalloc"})
    assert "libjemalloc" not in _maps(proxy.popen.pid)
    assert SAVED not in _environ(proxy.popen.pid)  # never re-executed
    assert 'sluice_allocator_info{allocator="pymalloc"} 1.0' in proxy.metrics()
    assert "memory: pymalloc" in proxy.stderr()


@needs_jemalloc
def test_what_serve_starts_starts_from_the_operators_environment(
    make_simulator: Callable[..., Simulator],
    make_sluice: Callable[..., Sluice],
    redis_server: RedisServerProcess,
) -> None:
    """The supervisor of --workers re-executes, then puts the environment back: its
    workers (and any credential_process) start without its preload, each worker choosing
    its own allocator."""
    sim = make_simulator()
    proxy = make_sluice(upstream=sim.url, redis_url=redis_server.url, workers=2)
    assert "libjemalloc" in _maps(proxy.popen.pid)
    children = Path(f"/proc/{proxy.popen.pid}/task/{proxy.popen.pid}/children").read_text()
    pids = [int(c) for c in children.split()]
    assert len(pids) == 2
    for pid in pids:
        # /healthz answered from one worker: the other may still be re-executing.
        wait_until(lambda pid=pid: SAVED in _environ(pid), 30, f"worker {pid} re-executed")
        assert "libjemalloc" in _maps(pid)
        started_with = _environ(pid)  # its own re-execution's environment
        assert json.loads(started_with[SAVED]) == {
            "LD_PRELOAD": None,  # started without the supervisor's preload
            "PYTHONMALLOC": None,
            "MALLOC_CONF": None,
        }
        assert started_with["LD_PRELOAD"].count("libjemalloc") == 1


@pytest.mark.parametrize("value", ["bogus", "jemalloc-please"])
def test_serve_refuses_a_bad_allocator_with_exit_2(value: str) -> None:
    env = _env({"SLUICE_ALLOCATOR": value})
    cmd = [sys.executable, "-m", "proxy", "serve", "--upstream", "simulator", "--port", "1"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"SLUICE_ALLOCATOR={value!r} is not one of auto, jemalloc, pymalloc" in done.stderr


def test_a_preload_that_did_not_load_falls_back_to_the_operators_environment(
    make_simulator: Callable[..., Simulator], make_sluice: Callable[..., Sluice]
) -> None:
    """As if re-executed (SAVED set) with jemalloc absent: rather than stay on the C
    library's malloc, which nobody chose, it re-executes once more as the operator started
    it (same pid) and says so; no third time."""
    sim = make_simulator()
    unset = json.dumps({"LD_PRELOAD": None, "PYTHONMALLOC": None, "MALLOC_CONF": None})
    proxy = make_sluice(
        upstream=sim.url, env={SAVED: unset, "PYTHONMALLOC": "malloc", "LD_PRELOAD": ""}
    )
    assert "libjemalloc" not in _maps(proxy.popen.pid)
    started_with = _environ(proxy.popen.pid)  # the environment of the last exec
    assert started_with.get(FELL_BACK) == "1"
    assert "PYTHONMALLOC" not in started_with and SAVED not in started_with
    assert "did not load when preloaded; running on pymalloc" in proxy.stderr()
    assert 'sluice_allocator_info{allocator="pymalloc"} 1.0' in proxy.metrics()


def test_after_falling_back_it_never_tries_jemalloc_again() -> None:
    assert _env_for({FELL_BACK: "1", "PATH": "/bin"}) is None
    # jemalloc asked for outright is still tried (the marker is auto's only).
    assert _env_for({FELL_BACK: "1", "SLUICE_ALLOCATOR": "jemalloc"}) is not None


def test_jemalloc_asked_for_that_did_not_load_is_exit_2() -> None:
    env = _env({SAVED: "{}", "SLUICE_ALLOCATOR": "jemalloc", "PYTHONMALLOC": "malloc"})
    cmd = [sys.executable, "-m", "proxy", "serve", "--upstream", "simulator", "--port", "1"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "SLUICE_ALLOCATOR=jemalloc: libjemalloc.so.2 did not load" in done.stderr

"""The memory allocator ``sluice serve`` runs on: jemalloc where the machine has it.

Why: CPython's own allocator (pymalloc) gives a 1 MiB arena back only once every block in
it is free. A burst of held streams fills many arenas; the few objects made during and
after it that live on (a timer handle, a metric's float, a history point) sit scattered
across them and keep nearly all mapped: a minute after 5,000 streams ended, RSS was still
1.9-2.1x its idle value. With ``PYTHONMALLOC=malloc`` and jemalloc, which returns freed
4 KiB pages after ``dirty_decay_ms``, the same burst leaves 1.1x (bench/README.md, "Held
streams").

The allocator is chosen before the interpreter starts, so ``sluice serve`` run as a
program re-executes itself once (same pid, same command line) with jemalloc preloaded,
then puts the operator's environment back, so what it starts (``--workers``, the
simulator, a ``credential_process``) starts from that. ``SLUICE_ALLOCATOR`` says how:

* ``auto`` (the default): jemalloc when ``libjemalloc.so.2`` is installed (Debian/Ubuntu
  ``libjemalloc2``, which ``redis-server`` already depends on) and the operator has not
  chosen an allocator (``PYTHONMALLOC`` unset); else as started;
* ``jemalloc``: jemalloc or exit 2 saying why;
* ``pymalloc``: as started, no re-execution.

An operator's ``MALLOC_CONF`` is appended to :data:`MALLOC_CONF` (jemalloc: later wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Final

log = logging.getLogger("sluice.memory")

ENV: Final = "SLUICE_ALLOCATOR"
CHOICES: Final = ("auto", "jemalloc", "pymalloc")
LIBRARY: Final = "libjemalloc.so.2"
#: One arena (Sluice is one event-loop thread; more arenas only hold more free pages),
#: freed pages back to the OS after a second, and no second ("muzzy") stage before that.
MALLOC_CONF: Final = "narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0"
#: What the re-execution changed, as the operator had it (JSON; null: unset). Its presence
#: also marks the re-executed process, so a jemalloc that did not load is never retried.
SAVED: Final = "SLUICE_ALLOCATOR_SAVED"
_CHANGED: Final = ("LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF")
#: Set on the second re-execution, back to the operator's environment after jemalloc did
#: not load under ``auto``: no third.
FELL_BACK: Final = "SLUICE_ALLOCATOR_FELL_BACK"


class AllocatorError(Exception):
    """``SLUICE_ALLOCATOR`` cannot be honoured (exit 2 with this message)."""


@functools.cache
def mallctl() -> Callable[..., int] | None:
    """jemalloc's ``mallctl`` when jemalloc serves this process's ``malloc``."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError, TypeError):  # (TypeError: no CDLL(None) on Windows)
        return None
    pointer = ctypes.c_void_p
    mallctl.argtypes = [ctypes.c_char_p, pointer, pointer, pointer, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


@functools.cache
def current() -> str:
    """``jemalloc`` when Python's objects come from jemalloc, else ``pymalloc`` (CPython's
    own) or ``malloc`` (the C library's). Read once, at the first call: the environment
    that chose it is put back afterwards (:func:`restore_environment`)."""
    if not sys.flags.ignore_environment and os.environ.get("PYTHONMALLOC") == "malloc":
        return "jemalloc" if mallctl() is not None else "malloc"
    return "pymalloc"


def find_jemalloc() -> str | None:
    """jemalloc 5's shared library as the dynamic loader finds it, or None (an older
    soname would refuse :data:`MALLOC_CONF`'s decay settings)."""
    found = ctypes.util.find_library("jemalloc")
    return found if found is not None and os.path.basename(found) == LIBRARY else None


def _mode(environ: Mapping[str, str]) -> str:
    """``SLUICE_ALLOCATOR``, checked (AllocatorError names it and the choices)."""
    mode = environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in CHOICES:
        raise AllocatorError(
            f"{ENV}={environ[ENV]!r} is not one of {', '.join(CHOICES)} "
            "(the memory allocator sluice serve runs on)"
        )
    return mode


def reexec_environment(
    environ: Mapping[str, str],
    find: Callable[[], str | None] = find_jemalloc,
    running: Callable[[], str] = current,
    ignores_environment: bool = False,
) -> dict[str, str] | None:
    """The environment to re-execute with for jemalloc, or None to run as this process is.

    Raises :class:`AllocatorError` for a bad ``SLUICE_ALLOCATOR``, or ``jemalloc`` asked for
    and not possible."""
    mode = _mode(environ)
    if mode == "pymalloc" or running() == "jemalloc":
        return None
    if mode == "auto" and FELL_BACK in environ:
        return None  # jemalloc did not load when preloaded: as the operator started it
    if SAVED in environ:  # re-executed already, and jemalloc did not load: never again
        if mode == "jemalloc":
            raise AllocatorError(
                f"{ENV}=jemalloc: {LIBRARY} did not load when preloaded "
                f"(LD_PRELOAD={environ.get('LD_PRELOAD')!r})"
            )
        return None
    if mode == "auto" and environ.get("PYTHONMALLOC"):
        return None  # the operator chose an allocator
    if ignores_environment:
        if mode == "jemalloc":
            raise AllocatorError(
                f"{ENV}=jemalloc: python runs with -E or -I, so it would ignore PYTHONMALLOC"
            )
        return None
    library = find()
    if library is None:
        if mode == "jemalloc":
            raise AllocatorError(
                f"{ENV}=jemalloc: {LIBRARY} is not installed "
                "(Debian/Ubuntu: apt-get install libjemalloc2)"
            )
        return None
    preload = environ.get("LD_PRELOAD", "")
    conf = environ.get("MALLOC_CONF")
    return {
        **environ,
        # (already preloaded by the operator, without PYTHONMALLOC: not twice)
        "LD_PRELOAD": preload if LIBRARY in preload else f"{library}:{preload}".rstrip(":"),
        "PYTHONMALLOC": "malloc",
        "MALLOC_CONF": f"{MALLOC_CONF},{conf}" if conf else MALLOC_CONF,
        SAVED: json.dumps({name: environ.get(name) for name in _CHANGED}),
    }


def restore_environment(environ: MutableMapping[str, str]) -> None:
    """Put back what the re-execution changed, as the operator had it."""
    saved = environ.pop(SAVED, None)
    if saved is None:
        return
    try:
        values = json.loads(saved)
    except ValueError:
        values = None
    if not isinstance(values, dict) or any(
        name not in _CHANGED or not (value is None or isinstance(value, str))
        for name, value in values.items()
    ):
        # Not one this module wrote (copied from another process's environment, say):
        # nothing of it is applied.
        log.warning("ignoring a malformed %s", SAVED)
        return
    for name, value in values.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


def choose() -> None:
    """``sluice serve`` run as a program: re-execute on jemalloc if wanted (never returns
    then), else note how this process runs and restore the operator's environment.
    Raises AllocatorError (exit 2) when ``SLUICE_ALLOCATOR`` cannot be honoured."""
    reexecuted = SAVED in os.environ
    env = reexec_environment(os.environ, ignores_environment=bool(sys.flags.ignore_environment))
    if env is not None and sys.argv[0] not in ("-", ""):  # (a script read from stdin is gone)
        _exec(env)  # returns only if it failed
    elif reexecuted and current() != "jemalloc" and _mode(os.environ) == "auto":
        # auto (jemalloc asked for raised above): PYTHONMALLOC=malloc without jemalloc is
        # the C library's malloc, which nobody chose. Once more, as the operator started it.
        restore_environment(os.environ)
        _exec({**os.environ, FELL_BACK: "1"})
        print(f"sluice: {LIBRARY} did not load; running on {current()}", file=sys.stderr)
    elif os.environ.pop(FELL_BACK, None) is not None:
        print(
            f"sluice: {LIBRARY} did not load when preloaded; running on {current()}",
            file=sys.stderr,
        )
    current()  # read before the environment that decided it goes back
    restore_environment(os.environ)


def _exec(env: dict[str, str]) -> None:
    """This command again with ``env`` (same pid); returns only if that failed."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except (OSError, ValueError) as exc:  # (ValueError: an empty argv, no executable)
        if _mode(os.environ) == "jemalloc":
            raise AllocatorError(f"{ENV}=jemalloc: re-executing failed: {exc}") from exc
        print(f"sluice: staying on {current()}: re-executing failed: {exc}", file=sys.stderr)

"""SIGHUP before anything listens for it: held, never fatal.

SIGHUP asks a running Sluice to re-read its policy (:mod:`proxy.ops.reload`); a supervisor
(``--workers``) forwards it to every worker. Its default action ends the process, so a
SIGHUP sent while a process was still starting (the re-execution on jemalloc, imports, the
policy loading) used to kill it.

So ``sluice serve`` blocks SIGHUP first thing (:func:`block`): a blocked signal stays
pending, and the mask and the pending signal both survive ``exec`` and are inherited by
children started meanwhile. :func:`hold` then installs a handler that notes it and unblocks,
so one that came in the meantime is noted at once; the reloader (or the supervisor) takes
over and asks :func:`taken` whether one came. What no Python code can cover is the
interpreter's own start, before ``sluice serve``'s first line runs (a few tens of ms).
"""

from __future__ import annotations

import signal
import threading

_pending = False


def _main_thread() -> bool:
    # (signals are set and delivered on the main thread only; no SIGHUP on Windows)
    return hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()


def block() -> None:
    """Keep SIGHUP pending (not lost, not fatal) until :func:`hold`; across ``exec`` too."""
    if _main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def unblock() -> None:
    """Deliver a SIGHUP held by :func:`block` to the handler in place now."""
    if _main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def hold() -> None:
    """Note a SIGHUP instead of dying of it, one pending since :func:`block` included (a
    caught signal is reset by ``exec``: children start with the default)."""
    if _main_thread():
        signal.signal(signal.SIGHUP, _note)
        unblock()


def _note(_signum: int, _frame: object) -> None:
    global _pending
    _pending = True


def taken() -> bool:
    """True once if a SIGHUP was noted since :func:`hold` (its owner acts on it now)."""
    global _pending
    pending, _pending = _pending, False
    return pending

"""``store_error`` log lines at a bounded rate: an outage is one line a second per operation
and pool, not one per failed batch.

During a Redis failover every admit batch fails until a master answers: at 500 requests a
second that was ~4,500 WARNING lines in 9 s, which buries the lines that say what happened
(and costs the log pipeline). The first failure of an operation on a pool is logged at
once; failures in the second after it are summed (``batches``, and each count such as
``requests`` or ``settles``) into one line at the end of that second, with the latest
error; the metric (``sluice_store_errors_total``) still counts every one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Final

from proxy.backend.runner import event

__all__ = ["FailureLog"]

#: One line per operation and pool at most this often.
LOG_EVERY_S: Final = 1.0


@dataclass(slots=True)
class _Held:
    """Failures of one operation and pool since its last line."""

    level: int
    batches: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""


class FailureLog:
    """Logs store failures, summing those within :data:`LOG_EVERY_S` of the last line."""

    def __init__(self, log: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = log
        self._every = every_s
        #: (operation, pool) -> failures since its last line; present while its second runs.
        self._held: dict[tuple[str, str], _Held] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def failed(self, op: str, pool: str, error: object, level: int, **counts: int) -> None:
        """One failed call of ``op`` on ``pool`` (``counts``: what it carried)."""
        key = (op, pool)
        held = self._held.get(key)
        if held is not None:
            held.batches += 1
            held.error = str(error)
            for name, n in counts.items():
                held.counts[name] = held.counts.get(name, 0) + n
            return
        self._line(key, level, str(error), 1, counts)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (closing, or a test): every failure has its line
            return
        self._held[key] = _Held(level)
        self._timers[key] = loop.call_later(self._every, self._flush, key)

    def _flush(self, key: tuple[str, str]) -> None:
        held = self._held.pop(key)
        self._timers.pop(key, None)
        if held.batches:  # failures went on: their line, and a new second starts
            self._line(key, held.level, held.error, held.batches, held.counts)
            self._held[key] = _Held(held.level)
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self._every, self._flush, key)

    def _line(
        self, key: tuple[str, str], level: int, error: str, batches: int, counts: dict[str, int]
    ) -> None:
        op, pool = key
        extra = {"batches": batches} if batches > 1 else {}
        event(self._log, level, "store_error", operation=op, pool=pool, **counts, **extra,
              error=error)  # fmt: skip

    def close(self) -> None:
        """Log what is held now (the process may stop before its second ends)."""
        for key, timer in list(self._timers.items()):
            timer.cancel()
            held = self._held.pop(key)
            if held.batches:
                self._line(key, held.level, held.error, held.batches, held.counts)
        self._timers.clear()

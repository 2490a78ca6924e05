"""Priority hold: while Bedrock throttles a class on a pool, lower classes wait (issue 9).

Bedrock does not know Sluice's classes. Once it throttles, every call sent competes for
the same spent quota, so a P2 call sent now takes the request a P0 retry needs: on a
requests/min quota whose burst has just run dry, P0 then fails while P2 is served. So
while Bedrock throttles calls of a class on a pool, Sluice sends no new call of a lower
class there: those with a degradation chain go down it, those without wait (up to their
``max_wait_ms``) or are refused with Retry-After. Calls already in flight finish.

The hold is the fleet's: an instance holds on its own throttles at once and on any
other instance's within a tick or two (the fleet exchange carries throttles per class; each
tick reads the current bucket and the one before, which another instance may have written
after this one read it). It ends :data:`HOLD_TICKS` ticks after the higher class's last
throttle was heard (so up to a tick more after the throttle itself), as long as Bedrock
keeps throttling that class and no longer. Only throttles of the pool's own
quota count (a tier with a quota of its own says nothing about it), and only on pools
that shed (an adaptive limit or a breaker).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Final

from prometheus_client import Gauge

from proxy.control.window import PoolWindow

#: Ticks a hold outlives the last throttle of the class holding: one for the fleet to
#: hear of it, one for the limit cut that answers it.
HOLD_TICKS: Final = 2


class PriorityHold:
    """Per pool, until when each class (by rank) holds back the classes below it.

    Lives on the event loop; :meth:`holder` is the request path (a dict read while no
    hold is on), :meth:`throttled` is called per throttle, :meth:`prune` once per tick.
    """

    __slots__ = ("_hold_s", "_until")

    def __init__(self, hold_s: float) -> None:
        self._hold_s = hold_s
        #: pool -> rank -> monotonic time the hold of that rank ends.
        self._until: dict[str, dict[int, float]] = {}

    def throttled(self, pool: str, rank: int, now: float | None = None) -> None:
        """Bedrock throttled a call of class ``rank`` on ``pool``: hold the classes below."""
        until = (time.monotonic() if now is None else now) + self._hold_s
        ranks = self._until.setdefault(pool, {})
        if ranks.get(rank, 0.0) < until:
            ranks[rank] = until

    def holder(self, pool: str, rank: int, now: float | None = None) -> int | None:
        """The highest class (lowest rank) holding class ``rank`` back on ``pool``, else None."""
        ranks = self._until.get(pool)
        if not ranks:
            return None
        now = time.monotonic() if now is None else now
        held = [r for r, until in ranks.items() if r < rank and until > now]
        return min(held) if held else None

    def holding(self, pool: str, now: float | None = None) -> set[int]:
        """The ranks holding the classes below them on ``pool`` now."""
        now = time.monotonic() if now is None else now
        return {r for r, until in self._until.get(pool, {}).items() if until > now}

    def show(self, pool: str, ranks: Mapping[str, int], gauge: Gauge) -> None:
        """Set ``gauge`` (labels pool, class) to 1 for each class holding others now."""
        holding = self.holding(pool)
        for name, rank in ranks.items():
            gauge.labels(pool, name).set(int(rank in holding))

    def prune(self, now: float | None = None) -> None:
        """Forget holds that ended (so an idle pool's check is one empty dict read)."""
        now = time.monotonic() if now is None else now
        for pool in list(self._until):
            ranks = self._until[pool]
            for rank in [r for r, until in ranks.items() if until <= now]:
                del ranks[rank]
            if not ranks:
                del self._until[pool]

    def hear(self, pool: str, window: PoolWindow, ranks: Mapping[str, int]) -> None:
        """Hold on every class the fleet saw throttled in ``window`` (a tick's buckets)."""
        for cls, counts in window.by_class.items():
            rank = ranks.get(cls)
            if counts.throttles > 0 and rank is not None:
                self.throttled(pool, rank)


async def poll_until(ready: Callable[[], bool], wait_s: float, poll_s: float) -> bool:
    """Wait up to ``wait_s`` for ``ready()``, checked every ``poll_s``; True once it is."""
    deadline = time.monotonic() + wait_s
    while not ready():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, poll_s))
    return True

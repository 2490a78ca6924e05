"""The fleet-wide wait queue of a pool as pure rules and data, apart from any I/O.

Mirrored line for line by ``scripts/admit.lua`` and ``scripts/settle.lua`` (the embedded
store runs these directly). A pool has two sets of waiting requests:

* the *queue* (``sluice:{pool}:waiters``): waiters held back by a pool-level limit, scored
  ``rank * RANK_SPAN + arrival``; arrival is drawn once per waiter from the pool's
  counter (field ``wseq`` of the pool hash), so FIFO holds across instances exactly.
  While it is not empty, a request whose limits have room is still refused with
  ``pool.queue`` unless it is at the queue's head: higher classes first, FIFO within a class;
* the *expiries* (``sluice:{pool}:waiters:exp``): EVERY waiting request, queued or not,
  with the time it may be reaped. A release publishes a wake-up only while this is not
  empty, so an idle fleet pays nothing for the feature.

A waiter held back only by its own workload's limit waits without joining the queue: its
cap is no reason to hold back other workloads (no head-of-line blocking across workloads).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from proxy.admission.model import (
    EXACT_CODES,
    RANK_SPAN,
    REAP_MAX,
    WAIT_FLEET,
    WAIT_LOCAL,
    WAIT_NO,
    WAITER_GRACE_MS,
    WL_CONC,
    WL_RPM,
    WL_TPM,
)

_WORKLOAD_CODES = frozenset((WL_RPM, WL_TPM, WL_CONC))


@dataclass(slots=True)
class WaitTicket:
    """One waiting request as the store sees it; the store fills in the two outputs.

    ``remaining_ms`` is set by the caller before each attempt; ``arrival`` (the pool's
    waiter sequence number at the first refusal, 0 = none yet) fixes the request's place
    in its class for good, and ``verdict`` says what the last attempt decided (``WAIT_*``).
    """

    id: str
    remaining_ms: int
    arrival: int = 0
    verdict: int = WAIT_NO

    @property
    def listed(self) -> bool:
        """True when the store may hold an entry for this waiter (withdraw it when done)."""
        return self.verdict != WAIT_NO


def waiter_score(rank: int, arrival: int) -> float:
    """Queue score: rank first, then arrival; a request without an arrival yet (0) is
    behind every waiter of its rank, so newcomers never overtake the queue."""
    return float(rank * RANK_SPAN + (arrival or RANK_SPAN - 1))


def queue_blocks(head: tuple[float, str] | None, own_score: float, own_id: str | None) -> bool:
    """True when the queue's ``head`` is another request ahead of ``own_score``."""
    return head is not None and head[1] != own_id and head[0] < own_score


def wait_verdict(code: int, retry_ms: int, remaining_ms: int) -> int:
    """What a refused waiter does: ``WAIT_NO`` (refuse now), ``WAIT_FLEET`` or ``WAIT_LOCAL``.

    Bucket refusals know exactly when there will be room: a deadline before that is
    refused at once. Concurrency and queue refusals can clear with any release.
    """
    if code == 0 or remaining_ms <= 0 or (code in EXACT_CODES and retry_ms > remaining_ms):
        return WAIT_NO
    return WAIT_LOCAL if code in _WORKLOAD_CODES else WAIT_FLEET


def waiter_expiry(now: float, remaining_ms: int) -> int:
    """When an entry may be reaped: its deadline plus a grace for its own withdrawal."""
    return math.floor(now) + remaining_ms + WAITER_GRACE_MS


class WaitEntries:
    """The two sets of one pool in memory (the embedded store's copy of the Redis zsets)."""

    __slots__ = ("_earliest", "expiry", "queue", "score")

    def __init__(self) -> None:
        self.queue: list[tuple[float, str]] = []  # sorted (score, id): the blocking queue
        self.score: dict[str, float] = {}  # id -> score of the entries in ``queue``
        self.expiry: dict[str, int] = {}  # id -> expiry ms of every waiting request
        self._earliest = math.inf

    def head(self) -> tuple[float, str] | None:
        """The queue's first entry, if any."""
        return self.queue[0] if self.queue else None

    def reap(self, now: float) -> int:
        """Drop up to ``REAP_MAX`` entries expired at ``floor(now)``; how many went."""
        cut = math.floor(now)
        if cut < self._earliest:
            return 0
        dead = sorted((e, i) for i, e in self.expiry.items() if e <= cut)[:REAP_MAX]
        for _, wid in dead:
            self.remove(wid)
        self._earliest = min(self.expiry.values(), default=math.inf)
        return len(dead)

    def enqueue(self, wid: str, score: float, expiry: int) -> None:
        """Add or move ``wid`` in the queue (ZADD waiters + ZADD exp)."""
        self.unqueue(wid)
        bisect.insort(self.queue, (score, wid))
        self.score[wid] = score
        self.list_only(wid, expiry)

    def list_only(self, wid: str, expiry: int) -> None:
        """Record ``wid`` as waiting without a place in the queue (ZADD exp)."""
        self.expiry[wid] = expiry
        self._earliest = min(self._earliest, expiry)

    def unqueue(self, wid: str) -> bool:
        """Take ``wid`` out of the queue only (ZREM waiters); True if it was there."""
        score = self.score.pop(wid, None)
        if score is None:
            return False
        del self.queue[bisect.bisect_left(self.queue, (score, wid))]
        return True

    def remove(self, wid: str) -> bool:
        """Forget ``wid`` entirely (ZREM both); True if it was in the queue."""
        self.expiry.pop(wid, None)
        return self.unqueue(wid)

    def __len__(self) -> int:
        """Waiting requests, queued or not (ZCARD exp)."""
        return len(self.expiry)

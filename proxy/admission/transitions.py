"""The state changes of admission as pure functions: the twins of the scripts' writes.

:func:`~proxy.admission.model.evaluate` decides; these say what a decision *changes*:

* :func:`grant` — ``admit.lua`` on a grant: every bucket of the plan takes its cost;
* :func:`give_back` — ``settle.lua``: the tokens reserved but not used go back to the token
  buckets (a negative amount charges an overrun);
* :func:`enlist` — ``admit.lua`` for a refused waiter: its verdict, its arrival number
  (drawn once from the pool's sequence) and where it is listed.

The embedded store applies them to its in-memory state; the agreement test folds them over
random sequences and checks the embedded store and Redis end in the same decisions.
"""

from __future__ import annotations

from typing import NamedTuple

from proxy.admission.model import WAIT_FLEET, WAIT_NO, Params, refund, take
from proxy.admission.waitqueue import (
    wait_verdict,
    waiter_expiry,
    waiter_score,
)


class Tats(NamedTuple):
    """The four bucket TATs (ms) one plan touches; an absent bucket's TAT stays as it is."""

    p_rtat: float
    p_ttat: float
    w_rtat: float
    w_ttat: float


def grant(p: Params, tats: Tats, tokens: float, now: float) -> Tats:
    """The buckets after a grant of one request reserving ``tokens`` at ``now``."""
    return Tats(
        take(tats.p_rtat, now, 1.0, p.p_rrate) if p.p_rburst > 0 else tats.p_rtat,
        take(tats.p_ttat, now, tokens, p.p_trate) if p.p_tburst > 0 else tats.p_ttat,
        take(tats.w_rtat, now, 1.0, p.w_rrate) if p.w_rburst > 0 else tats.w_rtat,
        take(tats.w_ttat, now, tokens, p.w_trate) if p.w_tburst > 0 else tats.w_ttat,
    )


def give_back(p: Params, tats: Tats, amount: float, now: float) -> Tats:
    """The buckets after a settle returns ``amount`` tokens (reserved minus used)."""
    if not amount:
        return tats
    return tats._replace(
        p_ttat=refund(tats.p_ttat, now, amount, p.p_trate) if p.p_tburst > 0 else tats.p_ttat,
        w_ttat=refund(tats.w_ttat, now, amount, p.w_trate) if p.w_tburst > 0 else tats.w_ttat,
    )


class Enlisted(NamedTuple):
    """Where a refused waiter stands after one attempt."""

    verdict: int  # WAIT_NO (refused now: remove its entries), WAIT_FLEET or WAIT_LOCAL
    arrival: int  # its place in the pool's arrival order (0 = never drawn)
    wseq: int  # the pool's waiter sequence after drawing it
    expiry: int  # when its entries may be reaped (0 with WAIT_NO)
    score: float | None  # its score in the fleet's queue (WAIT_FLEET), else not queued


def enlist(
    rank: int, arrival: int, remaining_ms: int, code: int, retry: int, now: float, wseq: int
) -> Enlisted:
    """A waiter refused with ``code``/``retry`` while ``remaining_ms`` of its wait is left."""
    verdict = wait_verdict(code, retry, remaining_ms)
    if verdict == WAIT_NO:
        return Enlisted(verdict, arrival, wseq, 0, None)
    if not arrival:
        wseq += 1
        arrival = wseq
    score = waiter_score(rank, arrival) if verdict == WAIT_FLEET else None
    return Enlisted(verdict, arrival, wseq, waiter_expiry(now, remaining_ms), score)

"""From a decision code to what the caller is told: the binding limit and remaining counts.

Both stores end a decision here: the embedded store with the :class:`Snapshot` of its
own state, the Redis store with the levels ``admit.lua`` returns. Nothing in it is
mirrored in Lua (the scripts return numbers; the words and headers are built here).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from proxy.admission.model import (
    CLASS_CONC,
    EPS,
    LIMIT_NAMES,
    POOL_CONC,
    POOL_RPM,
    POOL_TPM,
    QUEUE,
    TIGHT_ROOM,
    TIGHT_SHARE,
    WL_CONC,
    WL_RPM,
    WL_TPM,
    AdmitPlan,
    Decision,
    Params,
    PoolView,
    class_limit,
    level,
)


def snapshot(p: Params, now: float, v: PoolView) -> Snapshot:
    """Levels and counts of ``v`` at ``now`` for :func:`make_decision`."""
    return Snapshot(
        level(v.p_rtat, now, p.p_rrate, p.p_rburst) if p.p_rburst > 0 else 0.0,
        level(v.p_ttat, now, p.p_trate, p.p_tburst) if p.p_tburst > 0 else 0.0,
        v.p_in,
        v.p_limit,
        level(v.w_rtat, now, p.w_rrate, p.w_rburst) if p.w_rburst > 0 else 0.0,
        level(v.w_ttat, now, p.w_trate, p.w_tburst) if p.w_tburst > 0 else 0.0,
        v.w_in,
    )


class Snapshot(NamedTuple):
    """State after a decision (after the admission when admitted), for headers.

    Levels are in requests / tokens; ``p_limit`` is the effective pool concurrency
    (-1 = none); in-flight counts include the admitted request.
    """

    p_rlevel: float
    p_tlevel: float
    p_in: int
    p_limit: int
    w_rlevel: float
    w_tlevel: float
    w_in: int


_Candidate = tuple[int, float, float, float, float]


def _candidates(plan: AdmitPlan, s: Snapshot) -> list[_Candidate]:
    """(code, quota, remaining, remaining fraction, ms to full) of each limit in force."""
    p, share = plan.params, plan.share
    out: list[_Candidate] = []
    if p.p_rburst > 0:
        _bucket(out, POOL_RPM, s.p_rlevel, p.p_rrate, p.p_rburst, share)
    if p.p_tburst > 0:
        _bucket(out, POOL_TPM, s.p_tlevel, p.p_trate, p.p_tburst, share)
    if s.p_limit >= 0:
        lim, code = s.p_limit, POOL_CONC
        if share < 1.0:
            lim, code = class_limit(lim, share), CLASS_CONC
        rem = lim - s.p_in
        out.append((code, lim, rem, rem / lim if lim else 0.0, 0.0))
    if p.w_rburst > 0:
        _bucket(out, WL_RPM, s.w_rlevel, p.w_rrate, p.w_rburst, 1.0)
    if p.w_tburst > 0:
        _bucket(out, WL_TPM, s.w_tlevel, p.w_trate, p.w_tburst, 1.0)
    if p.w_conc >= 0:
        rem = p.w_conc - s.w_in
        out.append((WL_CONC, p.w_conc, rem, rem / p.w_conc if p.w_conc else 0.0, 0.0))
    return out


def _bucket(
    out: list[_Candidate],
    code: int,
    lvl: float,
    rate: float,
    burst: float,
    share: float,
) -> None:
    reset = (burst - lvl) / rate
    if share < 1.0:
        # The class sees the bucket minus the headroom reserved for higher classes.
        rem = lvl - (1.0 - share) * burst
        out.append((code + 3, rate * 60000 * share, rem, rem / (share * burst), reset))
    else:
        out.append((code, rate * 60000, lvl, lvl / burst, reset))


def make_decision(
    plan: AdmitPlan, code: int, retry: int, lease: str | None, s: Snapshot
) -> Decision:
    """Build the caller's :class:`Decision` from a script/evaluator result."""
    rem_req = rem_tok = math.inf
    best = None
    refused = code != 0 and code != QUEUE
    tight = False
    for c in _candidates(plan, s):
        kind = c[0] % 3  # 1 = requests, 2 = tokens, 0 = concurrency (codes 1..9)
        if kind == 1:
            rem_req = min(rem_req, c[2])
        elif kind == 2:
            rem_tok = min(rem_tok, c[2])
        elif c[2] <= max(TIGHT_ROOM, TIGHT_SHARE * c[1]):
            tight = True
        if refused:
            if best is None and c[0] == code:
                best = c
        # Admitted, or refused by the queue (no limit is out of room): the tightest limit.
        elif best is None or c[3] < best[3]:
            best = c
    if best is None:
        binding, limit, remaining, reset_ms = None, 0.0, 0.0, 0
    else:
        binding, limit = LIMIT_NAMES[best[0]], float(best[1])
        remaining, reset_ms = max(0.0, float(best[2])), max(0, math.ceil(best[4]))
    return Decision(
        code == 0,
        lease if code == 0 else None,
        LIMIT_NAMES[code],
        retry if code else 0,
        binding,
        limit,
        remaining,
        reset_ms,
        None if rem_req == math.inf else max(0, math.floor(rem_req + EPS)),
        None if rem_tok == math.inf else max(0, math.floor(rem_tok + EPS)),
        tight and code == 0,
    )


def roomy(plan: AdmitPlan, s: Snapshot, tokens: int, more: int) -> bool:
    """True when every limit of ``plan`` in ``s`` keeps at least half of its capacity free
    after ``more`` further grants of ``tokens`` each (see :mod:`proxy.backend.ahead`).

    Capacity is a bucket's burst (its class's part of it) or a concurrency limit; a
    limit in debt or at zero is never roomy.
    """
    for code, _quota, remaining, fraction, _reset in _candidates(plan, s):
        if fraction <= 0.0:
            return False
        cost = tokens if code % 3 == 2 else 1
        if remaining - more * cost < 0.5 * (remaining / fraction):
            return False
    return True

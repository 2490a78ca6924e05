"""KEYS and ARGV of the admission scripts, and their replies, for batches of requests.

The scripts (``proxy/admission/scripts/*.lua``) document each argument; this module is
the Python side of that contract, kept apart from the batching in :mod:`.redis_store`.
"""

from __future__ import annotations

import asyncio
from typing import Final

from proxy.admission.decision import Snapshot
from proxy.admission.leases import Group
from proxy.admission.model import AdmitPlan, Decision, plan_keys
from proxy.admission.waitqueue import WaitTicket
from proxy.backend.runner import Arg

#: Requests per script call: bounds one script's run time (Redis is single-threaded).
MAX_BATCH: Final = 256
#: Integers the admit script returns per request.
STRIDE: Final = 11
#: A queued admit: plan, tokens, lease id, waiter ticket, the caller's future (None: a
#: grant asked for ahead of demand, see :mod:`.ahead`).
Admit = tuple[AdmitPlan, int, str, WaitTicket | None, "asyncio.Future[Decision] | None"]
#: A queued settle: plan, lease id, tokens to give back, requests to give back (1 for an
#: unused grant ahead, else 0).
Settle = tuple[AdmitPlan, str, int, int]
Call = tuple[list[str], list[Arg]]


class Queue:
    """Pending work of one pool, with a flag per kind: a call is in flight or scheduled."""

    __slots__ = (
        "admit_busy",
        "admits",
        "ahead",
        "ahead_busy",
        "confirms",
        "keys",
        "settle_busy",
        "settles",
        "withdraws",
    )

    def __init__(self, pool: str) -> None:
        self.keys = plan_keys(pool, "")
        self.admits: list[Admit] = []
        #: Grants asked for ahead of demand: they ride behind every request queued with
        #: them, or go on their own (``ahead_busy``) without holding real admits back.
        self.ahead: list[Admit] = []
        self.ahead_busy = False  # a call made only of asks is in flight
        self.settles: list[Settle] = []
        #: Callers waiting for the settles queued so far to land (see ``confirm``).
        self.confirms: list[asyncio.Future[None]] = []
        self.withdraws: list[str] = []  # waiter ids; they go out with the settles
        self.admit_busy = False  # a call is in flight or a kick is scheduled
        self.settle_busy = False


def admit_call(batch: list[Admit]) -> Call:
    """``admit.lua``'s KEYS and ARGV for a batch of one pool (plans sent once each)."""
    k0 = batch[0][0].keys
    index: dict[int, int] = {}
    keys = [k0.pool, k0.pool_leases, k0.waiters, k0.waiters_exp]
    plan_args: list[Arg] = []
    items: list[Arg] = []
    for plan, tokens, lease, ticket, _ in batch:
        i = index.get(id(plan))
        if i is None:
            i = index[id(plan)] = len(keys) - 3
            plan_args += (plan.arg, plan.workload, plan.rank)
            keys.append(plan.keys.workload_leases)
        spec = "" if ticket is None else f"{ticket.remaining_ms} {ticket.arrival} {ticket.id}"
        items += (i, tokens, lease, spec)
    return keys, [len(keys) - 4, k0.channel, *plan_args, *items]


def snapshot_at(res: list[int], b: int) -> Snapshot:
    """The state the admit script saw for the request whose reply starts at ``res[b]``."""
    return Snapshot(
        res[b + 2] / 1000.0,
        res[b + 3] / 1000.0,
        res[b + 4],
        res[b + 5],
        res[b + 6] / 1000.0,
        res[b + 7] / 1000.0,
        res[b + 8],
    )


def granted(res: list[int]) -> int:
    """How many requests of an admit reply were granted."""
    return sum(1 for b in range(0, len(res), STRIDE) if res[b] == 0)


def settle_call(q: Queue, batch: list[Settle], gone: list[str]) -> Call:
    """``settle.lua``'s KEYS and ARGV: refunds and leases grouped per plan, withdrawn waiters."""
    groups: dict[int, tuple[AdmitPlan, list[int], list[str]]] = {}
    for plan, lease, amount, back in batch:
        g = groups.get(id(plan))
        if g is None:
            g = groups[id(plan)] = (plan, [0, 0], [])
        g[1][0] += amount
        g[1][1] += back
        g[2].append(lease)
    k = q.keys
    keys = [k.pool, k.pool_leases, k.waiters, k.waiters_exp]
    args: list[Arg] = [len(groups), k.channel, len(gone), *gone]
    for plan, total, leases in groups.values():
        keys.append(plan.keys.workload_leases)
        args += (plan.arg, plan.workload, total[0], total[1], len(leases), *leases)
    return keys, args


#: Leases per heartbeat call. An instance can hold thousands on one pool (held streams);
#: one call for all of them exceeded what Lua's ``unpack`` takes (~8,000 values, so ~4,000
#: leases) and the whole heartbeat failed: every lease of the pool then expired. Bounded
#: calls also bound how long one script holds Redis.
MAX_EXTEND: Final = 1000


def extend_calls(
    pool: str, groups: list[Group], epoch: str = "", most: int = MAX_EXTEND
) -> list[Call]:
    """``extend.lua``'s KEYS and ARGV for every lease of this instance in ``pool``, in calls
    of at most ``most`` leases (a group larger than that is split over calls). ``epoch``:
    the data's epoch this instance saw at its last heartbeat ('' for none yet)."""
    calls: list[Call] = []
    keys: list[str] = []
    args: list[Arg] = []
    room = 0
    scope = plan_keys(pool, "")
    for plan, leases in groups:
        for start in range(0, len(leases), most):
            part = leases[start : start + most]
            if len(part) > room:  # (a new call: the first, or this part would not fit)
                keys, args, room = [scope.pool_leases, scope.pool], [0, epoch], most
                calls.append((keys, args))
            keys.append(plan.keys.workload_leases)
            args[0] = int(args[0]) + 1
            args += (plan.lease_ttl_ms, int(plan.params.w_conc >= 0), len(part), *part)
            room -= len(part)
    return calls

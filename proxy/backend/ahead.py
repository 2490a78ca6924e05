"""Grants taken ahead of demand: an admission with no Redis round trip on the request's path.

At low load every request admitted through Redis waits one round trip for its grant: on a
loopback Redis about as much added p99 as the rest of Sluice together (bench/README.md).
So while a plan is far from every one of its limits, the Redis store asks for up to
``per_plan`` more grants of it in the background: ordinary admits that ride in the usual
batches, behind every request of the batch, each debited (one request, its tokens) and
holding a concurrency lease like any request. The plan's next request whose token estimate
fits takes one at once, and a replacement is asked for in the background.

Why no limit can be exceeded and no decision that matters changes:

* a grant ahead is debited in Redis before anyone uses it: whatever the number of
  instances holding some, they were granted by the same atomic script as every request;
* one is granted only while every pool-wide limit stays at least half free after it,
  decided by Redis in the same script (the ask goes as the plan with half its class
  share, so ``admit.lua``'s share rule holds the other half back for requests), and kept
  only while every limit of its plan, the workload's too, stays half free
  (:func:`proxy.admission.decision.roomy`): near any limit (where refusals, waiting and
  priority shares decide) no new one is granted or kept, requests decide in Redis as
  before, and those already held are used up or given back within ``ttl_s``;
* one not used within ``ttl_s`` is given back whole: its lease, its tokens and its request
  (``settle.lua`` refunds the request too);
* a request that was refused and waits never takes one: it decides in Redis, in queue
  order (its first attempt, before any refusal, may);
* the moment this instance sees a sign of contention on a pool (Bedrock throttled a call,
  Redis refused a request on a pool-wide limit or its queue, a request waits for room in
  the pool), every grant it holds ahead on that pool goes back and none is taken for
  ``ttl_s`` (a refusal by, or a wait on, a workload's own limit gives back its plan's only);
* none is held on a pool with adaptive concurrency (``AdmitPlan.hold_ahead``): its control
  law and throttle reflex read the pool's in-flight count, which unused grants would inflate.

The cost, and why it is off by default (``server.grants_ahead: 0``): while a plan is far
from its limits, each instance holds up to ``per_plan`` grants of it that no call uses yet,
for at most ``ttl_s``. Each instance decides on its own, so a fleet of N instances with P
plans on a pool can hold up to N x P x ``per_plan`` of the pool's slots (and requests and
token reservations), never more than the half of each limit that ``roomy`` keeps free. A
burst that takes the pool from there to full within ``ttl_s`` finds those slots held until
they are used, expire, or the instance holding them sees contention. Worth it where N x P x
``per_plan`` is small against the limits (a few instances, large quotas).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

from proxy.admission.decision import Snapshot, make_decision, roomy
from proxy.admission.model import AdmitPlan, Decision
from proxy.metrics import Metrics

#: Grants held ahead per plan and instance (``server.grants_ahead``): two cover a pair of
#: requests arriving together, which one would leave to a round trip.
DEFAULT_PER_PLAN: Final = 2
#: An unused grant ahead goes back after this long.
#: Also how long a pool takes none after a sign of contention.
DEFAULT_TTL_S: Final = 1.0


class Spare(NamedTuple):
    """One grant held ahead: its lease, the tokens it reserved, what its caller is told."""

    lease: str
    tokens: int
    decision: Decision  # built when granted, so the request that takes it does not
    until: float  # time.monotonic() after which it goes back
    snap: Snapshot  # the plan's state right after Redis granted it


class _Stash:
    __slots__ = ("ask_plan", "pending", "plan", "spares")

    def __init__(self, plan: AdmitPlan) -> None:
        self.plan = plan
        #: What an ask sends: the plan with half its share (see the module doc).
        self.ask_plan = dataclasses.replace(plan, share=plan.share / 2)
        self.spares: deque[Spare] = deque()
        self.pending = 0  # asked for, not answered yet


class Ahead:
    """The grants one store holds ahead, per plan (keyed by the plan object itself)."""

    __slots__ = ("_asked_as", "_quiet", "_stashes", "per_plan", "ttl_s")

    def __init__(self, per_plan: int = DEFAULT_PER_PLAN, ttl_s: float = DEFAULT_TTL_S) -> None:
        if per_plan < 1:
            raise ValueError(f"grants ahead per plan must be >= 1, got {per_plan}")
        if not ttl_s > 0:
            raise ValueError(f"grants ahead ttl must be > 0, got {ttl_s}")
        self.per_plan = per_plan
        self.ttl_s = ttl_s
        # id(plan) -> stash: plans are frozen dataclasses whose hash walks every field;
        # the stash holds the plan, so its id cannot be reused while the entry lives.
        self._stashes: dict[int, _Stash] = {}
        #: id(ask plan) -> the plan it asks for (the stash keeps both alive).
        self._asked_as: dict[int, AdmitPlan] = {}
        #: pool -> time.monotonic() until which no grant of it is asked for or kept.
        self._quiet: dict[str, float] = {}

    def _stash(self, plan: AdmitPlan) -> _Stash:
        stash = self._stashes.get(id(plan))
        if stash is None:
            stash = self._stashes[id(plan)] = _Stash(plan)
            self._asked_as[id(stash.ask_plan)] = plan
        return stash

    def ask_plan(self, plan: AdmitPlan) -> AdmitPlan:
        """The plan an ask for ``plan`` is sent as (half its class share)."""
        return self._stash(plan).ask_plan

    def original(self, plan: AdmitPlan) -> AdmitPlan:
        """The plan an ask was sent for (``plan`` itself if it is not an ask plan)."""
        return self._asked_as.get(id(plan), plan)

    def take(self, plan: AdmitPlan, tokens: int) -> Spare | None:
        """A live grant of ``plan`` that reserved at least ``tokens``, or None."""
        stash = self._stashes.get(id(plan))
        if stash is None or not stash.spares:
            return None
        now = time.monotonic()
        spares = stash.spares
        for i, spare in enumerate(spares):
            if spare.tokens >= tokens and spare.until > now:
                del spares[i]
                return spare
        return None

    def quiet(self, plan: AdmitPlan) -> bool:
        """True while ``plan``'s pool takes no grant ahead (after :meth:`shed`)."""
        if not self._quiet:
            return False
        until = self._quiet.get(plan.pool)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._quiet[plan.pool]
            return False
        return True

    def _empty(self, match: Callable[[AdmitPlan], bool]) -> list[tuple[AdmitPlan, Spare]]:
        """Remove and return the grants held for every plan ``match`` accepts."""
        out: list[tuple[AdmitPlan, Spare]] = []
        for stash in self._stashes.values():
            if stash.spares and match(stash.plan):
                out += [(stash.plan, s) for s in stash.spares]
                stash.spares = deque()
        return out

    def shed(self, pool: str) -> list[tuple[AdmitPlan, Spare]]:
        """Remove and return every grant held on ``pool`` (any plan, any tier); the pool
        takes none for ``ttl_s``."""
        self._quiet[pool] = time.monotonic() + self.ttl_s
        return self._empty(lambda p: p.pool == pool)

    def shed_workload(self, plan: AdmitPlan) -> list[tuple[AdmitPlan, Spare]]:
        """Remove and return the grants held for ``plan``'s workload in its scope (every
        plan sharing its workload buckets and leases: other classes, caps)."""
        return self._empty(lambda p: p.scope == plan.scope and p.workload == plan.workload)

    def wanted(self, plan: AdmitPlan) -> int:
        """How many more to ask for now (counted as pending until :meth:`answered`)."""
        if self.quiet(plan):
            return 0
        stash = self._stash(plan)
        n = self.per_plan - len(stash.spares) - stash.pending
        if n <= 0:
            return 0
        stash.pending += n
        return n

    def answered(self, plan: AdmitPlan, spare: Spare | None) -> None:
        """One asked-for grant came back: kept (``spare``) or not (None)."""
        stash = self._stash(self.original(plan))
        stash.pending = max(0, stash.pending - 1)
        if spare is not None:
            stash.spares.append(spare)

    def expired(self) -> list[tuple[AdmitPlan, Spare]]:
        """Remove and return the grants past their time (to be given back)."""
        now = time.monotonic()
        out: list[tuple[AdmitPlan, Spare]] = []
        for key, stash in list(self._stashes.items()):
            live = deque(s for s in stash.spares if s.until > now)
            out += [(stash.plan, s) for s in stash.spares if s.until <= now]
            stash.spares = live
            if not live and not stash.pending:
                del self._stashes[key]  # a reloaded policy's old plans go with their grants
                self._asked_as.pop(id(stash.ask_plan), None)
        return out

    def drain(self) -> list[tuple[AdmitPlan, Spare]]:
        """Remove and return every grant held (the store is closing)."""
        out = self._empty(lambda p: True)
        self._stashes.clear()
        self._asked_as.clear()
        return out

    def held(self, scope: str | None = None) -> int:
        """Grants held ahead right now: in ``scope`` (a pool, or a tier of one), or in all."""
        stashes = self._stashes.values()
        return sum(len(st.spares) for st in stashes if scope is None or st.plan.scope == scope)

    def next_expiry(self) -> float | None:
        """The earliest ``until`` of the grants held (None: none held)."""
        return min((s.until for st in self._stashes.values() for s in st.spares), default=None)


#: ``ask(plan, tokens, n)``: queue n admits of ``plan`` asked for ahead (future None).
Ask = Callable[[AdmitPlan, int, int], None]
#: ``give(plan, lease, tokens)``: queue the settle that returns an unused grant whole.
Give = Callable[[AdmitPlan, str, int], None]


class AheadDesk:
    """The Redis store's side of grants ahead: use, ask, keep or give back, sweep.

    The store owns the Redis calls (``ask`` and ``give`` queue them in its batches); this
    decides which grants to ask for, keeps them, and gives back what is not used in time.
    Outcomes in ``sluice_grants_ahead_total``: ``kept``, then ``used`` or ``returned``;
    ``declined`` (granted, but contention or a tight limit by then: given back at once),
    ``refused`` (by Redis: nothing was debited), ``lost`` (the ask failed).
    """

    __slots__ = ("_ask", "_count", "_give", "_sweep", "ahead")

    def __init__(self, ahead: Ahead, metrics: Metrics, ask: Ask, give: Give) -> None:
        self.ahead = ahead
        self._ask, self._give = ask, give
        self._count = {
            outcome: metrics.grants_ahead.labels(outcome=outcome)
            for outcome in ("kept", "used", "returned", "declined", "refused", "lost")
        }
        self._sweep: asyncio.TimerHandle | None = None

    def use(self, plan: AdmitPlan, tokens: int) -> Spare | None:
        """A held grant for a request of ``plan`` (its replacement is asked for), or None."""
        spare = self.ahead.take(plan, tokens)
        if spare is None:
            return None
        self._count["used"].inc()
        if roomy(plan, spare.snap, tokens, self.ahead.per_plan):  # as of its grant
            self.ask(plan, tokens)
        return spare

    def granted(self, plan: AdmitPlan, tokens: int, snap: Snapshot) -> None:
        """A request of ``plan`` was granted by Redis with ``snap`` after it: when the
        plan stays roomy with a full set held ahead, ask for what is missing."""
        if roomy(plan, snap, tokens, self.ahead.per_plan):
            self.ask(plan, tokens)

    def ask(self, plan: AdmitPlan, tokens: int) -> None:
        n = self.ahead.wanted(plan) if plan.hold_ahead else 0
        if n > 0:
            self._ask(self.ahead.ask_plan(plan), tokens, n)

    def answered(
        self, asked: AdmitPlan, tokens: int, lease: str, code: int, snap: Snapshot
    ) -> None:
        """Redis's answer to an ask sent as ``asked`` (``code`` 0: granted, with a lease)."""
        plan = self.ahead.original(asked)
        if code != 0:
            self._count["refused"].inc()
            self.ahead.answered(plan, None)
            if code != 7 and code != 8 and code != 9:  # not the workload's own limit
                self.shed(plan.pool)
            return
        if self.ahead.quiet(plan) or not roomy(plan, snap, tokens, 0):  # contention since
            self.ahead.answered(plan, None)
            self._count["declined"].inc()
            self._give(plan, lease, tokens)
            return
        decision = make_decision(plan, 0, 0, lease, snap)
        until = time.monotonic() + self.ahead.ttl_s
        self.ahead.answered(plan, Spare(lease, tokens, decision, until, snap))
        self._count["kept"].inc()
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.ahead.ttl_s, self._sweep_now)

    def refused(self, plan: AdmitPlan, code: int) -> None:
        """Redis refused a request of ``plan`` with ``code`` (a model.LIMIT_NAMES index)."""
        if code == 7 or code == 8 or code == 9:  # the workload's own limit: its grants only
            self.shed_workload(plan)
        else:
            self.shed(plan.pool)

    def shed_workload(self, plan: AdmitPlan) -> None:
        """``plan``'s workload is at one of its own limits: give back its grants (every plan
        of it in the scope), and nobody else's."""
        for p, spare in self.ahead.shed_workload(plan):
            self.give_back(p, spare.lease, spare.tokens)

    def shed(self, pool: str) -> None:
        """A sign of contention on ``pool``: give back what is held there, take none for a while."""
        for plan, spare in self.ahead.shed(pool):
            self.give_back(plan, spare.lease, spare.tokens)

    def lost(self, asked: AdmitPlan) -> None:
        """An ask sent as ``asked`` got no answer (the store failed)."""
        self._count["lost"].inc()
        self.ahead.answered(asked, None)

    def give_back(self, plan: AdmitPlan, lease: str, tokens: int) -> None:
        """Return a kept, unused grant whole: lease, tokens and its request."""
        self._count["returned"].inc()
        self._give(plan, lease, tokens)

    def _sweep_now(self) -> None:
        self._sweep = None
        for plan, spare in self.ahead.expired():
            self.give_back(plan, spare.lease, spare.tokens)
        first = self.ahead.next_expiry()
        if first is not None:  # at the next grant's own time, not a fixed period after
            delay = max(0.0, first - time.monotonic()) + 0.001
            self._sweep = asyncio.get_running_loop().call_later(delay, self._sweep_now)

    def close(self) -> None:
        """Give every held grant back (the store is closing)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for plan, spare in self.ahead.drain():
            self.give_back(plan, spare.lease, spare.tokens)

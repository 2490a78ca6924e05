"""The pure model, the embedded store and Redis agree on random sequences (hypothesis).

Each sequence mixes plain admits, waiter attempts (which enlist), withdrawals and settles
(which give tokens back) on plans of three classes. Nothing refills (rates of 1e-9 per
minute), so the decisions are deterministic: the pure model (:mod:`tests.support.
admission_twin`, evaluate + grant + give_back + enlist on a frozen clock), the embedded
store on the same frozen clock and Redis running the Lua scripts must answer alike, and
the embedded store must hold exactly the model's bucket TATs and leases.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.admission import AdmitPlan
from proxy.admission.waitqueue import WaitTicket
from proxy.backend.store import EmbeddedStore, RedisStore
from tests.support.admission_helpers import new_pool, per_min, plan
from tests.support.admission_twin import NOW, TwinStore
from tests.support.redis_fixtures import RedisServerProcess

SLOW = 1e-9
#: (what, plan index, tokens, remaining ms of a waiter, used share of the reservation)
Op = tuple[str, int, int, int, float]
ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "wait", "wait", "retry", "settle", "settle", "withdraw"]),
        st.integers(0, 2),
        st.sampled_from([0, 50, 400, 1500, 6000, 15_000]),
        st.sampled_from([60_000, 60_000, 5]),
        st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    ),
    min_size=1,
    max_size=60,
)


def _plans(pool: str) -> list[AdmitPlan]:
    def mk(wl: str, pri: str, rank: int, share: float) -> AdmitPlan:
        return plan(
            pool,
            wl,
            pri,
            share,
            rank=rank,
            pool_requests=per_min(SLOW, 40),
            pool_tokens=per_min(SLOW, 40_000),
            pool_concurrency=5,
            workload_requests=per_min(SLOW, 25),
            workload_tokens=per_min(SLOW, 25_000),
            workload_concurrency=3,
        )

    return [mk("a", "P0", 0, 1.0), mk("b", "P1", 1, 0.85), mk("c", "batch", 2, 0.4)]


async def _run(store: Any, seq: list[Op]) -> list[tuple[Any, ...]]:
    """Play ``seq``; the answers (decisions and waiter states) in a comparable form."""
    ps = _plans(new_pool())
    held: list[tuple[AdmitPlan, str, int]] = []
    tickets: list[tuple[AdmitPlan, WaitTicket]] = []
    out: list[tuple[Any, ...]] = []
    for step, (what, i, tokens, remaining, used) in enumerate(seq):
        if what == "settle" and held:
            p, lease, reserved = held.pop(i % len(held))
            store.settle(p, lease, reserved, int(reserved * used))
            await store.flush()
            continue
        if what == "withdraw" and tickets:
            p, t = tickets.pop(i % len(tickets))
            store.withdraw(p, t)
            await store.flush()
            continue
        if what == "retry" and tickets:
            p, t = tickets.pop(i % len(tickets))  # a woken waiter tries again
        else:
            p, t = ps[i], (WaitTicket(f"w{step}", 0) if what != "admit" else None)
        if t is not None:
            t.remaining_ms = remaining
        d = await store.attempt(p, tokens, t)
        waiter = None if t is None else (t.verdict, t.arrival)
        out.append((d.admitted, d.refused_by, d.remaining_requests, d.remaining_tokens, waiter))
        if d.admitted:
            assert d.lease is not None
            held.append((p, d.lease, tokens))
        elif t is not None and t.listed:
            tickets.append((p, t))
    return out


def _state_of_embedded(store: EmbeddedStore) -> list[Any]:
    return [
        (
            pool.rtat,
            pool.ttat,
            len(pool.leases.by_id),
            sorted(
                (name, w.rtat, w.ttat, len(w.leases.by_id)) for name, w in pool.workloads.items()
            ),
        )
        for pool in store._pools.values()
    ]


def _state_of_twin(twin: TwinStore) -> list[Any]:
    out = []
    for scope, (rtat, ttat) in twin.pool_tats.items():
        workloads = sorted(
            (wl, t.w_rtat, t.w_ttat, len(twin.wl_leases[scope, wl]))
            for (s, wl), t in twin.tats.items()
            if s == scope
        )
        out.append((rtat, ttat, len(twin.leases[scope]), workloads))
    return out


@settings(max_examples=150, deadline=None)
@given(seq=ops)
def test_embedded_store_is_the_pure_model(seq: list[Op]) -> None:
    async def both() -> None:
        twin = TwinStore()
        embedded = EmbeddedStore(clock=lambda: NOW)
        await embedded.start()
        try:
            assert await _run(embedded, seq) == await _run(twin, seq)
            assert _state_of_embedded(embedded) == _state_of_twin(twin)
        finally:
            await embedded.close()

    asyncio.run(both())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seq=ops)
def test_redis_scripts_decide_as_the_pure_model(
    redis_server: RedisServerProcess, seq: list[Op]
) -> None:
    async def both() -> None:
        store = RedisStore(redis_server.url, timeout_s=5.0)
        await store.start()
        try:
            assert await _run(store, seq) == await _run(TwinStore(), seq)
        finally:
            await store.close()

    asyncio.run(both())


def test_sequences_reach_every_transition() -> None:
    """The ops can reach every outcome: grants, each refusal kind, every wait verdict."""
    seq: list[Op] = [("wait", 0, 15_000, 60_000, 0.0)] * 2  # grant, then tokens: refuse now
    seq += [("wait", 0, 50, 60_000, 0.0)] * 3  # two grants, then workload.concurrency: local
    seq += [("wait", 1, 50, 60_000, 0.0)] * 3  # two grants, then pool.concurrency: fleet
    seq += [("settle", 0, 0, 0, 0.5), ("retry", 0, 50, 60_000, 0.0)]
    answers = asyncio.run(_run(TwinStore(), seq))
    assert {a[0] for a in answers} == {True, False}
    assert {a[4][0] for a in answers if a[4] is not None} == {0, 1, 2}, answers
    refused = {a[1] for a in answers}
    assert {"workload.tokens_per_minute", "workload.concurrency", "pool.concurrency"} <= refused

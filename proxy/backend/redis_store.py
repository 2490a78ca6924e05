"""The Redis store: one script call decides every limit of a batch of requests of one pool.

Round trips are the cost (see ``/work/shared/baselines.md``), so requests are coalesced:

* admits of one pool queued in the same event-loop tick go out as ONE ``EVALSHA`` of
  ``admit.lua``; while that call is in flight, new arrivals queue and go out together as
  soon as it returns (group commit: at most one admit call in flight per pool);
* settles are never awaited by the request path: they queue and go out the same way;
* with ``server.grants_ahead`` (off by default), while a plan is far from its limits a few
  grants are taken ahead of demand, so most requests are admitted with no round trip on
  their path (:mod:`.ahead`);
* the heartbeat extends all of this instance's leases of a pool in one call per TTL/3;
* waiting (:meth:`RedisStore.admit_waiting`) costs no extra call: a waiter's attempts
  ride in the admit batches (the script enlists it in the pool's queue), its withdrawal
  rides in the settle batches, and releases wake it through pub/sub (:mod:`.wakeups`).

Every call is bounded by ``timeout_s``; a failed admit raises :class:`StoreUnavailable`,
a failed settle or heartbeat is counted in ``sluice_store_errors`` and logged.

URLs: ``redis://host:port/db`` (also ``rediss://``, ``unix://``) for one server;
``redis+cluster://host:port`` (or ``rediss+cluster://``) for a Redis Cluster, any node
as the seed. In a cluster all keys of a pool share the hash tag ``{pool}``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
from typing import Any, Final

from proxy.admission.decision import Snapshot, make_decision
from proxy.admission.leases import Group, LeaseBook
from proxy.admission.model import (
    WAIT_LOCAL,
    WAIT_NO,
    AdmitPlan,
    Decision,
    plan_keys,
)
from proxy.admission.protocol import StoreUnavailable
from proxy.admission.waiting import WaitMetrics, WaitRoom
from proxy.admission.waitqueue import WaitTicket
from proxy.backend.admit_wire import (
    MAX_BATCH,
    STRIDE,
    Admit,
    Queue,
    Settle,
    admit_call,
    extend_calls,
    granted,
    settle_call,
    snapshot_at,
)
from proxy.backend.ahead import Ahead, AheadDesk
from proxy.backend.batch_call import BatchCall
from proxy.backend.client import FAILURES, RedisCluster, redis_client
from proxy.backend.failure_log import FailureLog
from proxy.backend.inflight import InFlight
from proxy.backend.late_release import LateReleases
from proxy.backend.runner import Arg, ScriptRunner, event, why
from proxy.backend.wakeups import WakeListener
from proxy.metrics import Metrics
from proxy.tasks import stop_tasks

log = logging.getLogger("proxy.admission")


def _first_try(ticket: WaitTicket | None) -> bool:
    """A request's first attempt (it may wait if refused, but has not been refused yet)."""
    return ticket is None or (ticket.arrival == 0 and not ticket.listed)


_SCRIPT_NAMES: Final = ("admit", "settle", "extend", "stats")


class RedisStore:
    """:class:`~proxy.admission.protocol.Store` shared by every instance using one Redis."""

    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics | None = None,
        instance_id: str | None = None,
        timeout_s: float = 0.25,
        wait_metrics: WaitMetrics | None = None,
        max_waiters: int = 1000,
        wait_safety_s: float = 2.0,
        ahead: Ahead | None = None,
    ) -> None:
        """``max_waiters`` bounds the waiters per pool on this instance; ``wait_safety_s``
        is the mean interval at which a waiter re-checks without a wake-up message;
        ``ahead`` holds grants taken ahead of demand (None: every request asks Redis)."""
        self._client = redis_client(url, timeout_s)
        self._timeout = timeout_s
        self._runner = ScriptRunner(self._client, _SCRIPT_NAMES, timeout_s, log)
        metrics = metrics or Metrics()
        self._desk = None if ahead is None else AheadDesk(ahead, metrics, self._ask, self._give)
        #: Tokens a request's grant ahead reserved beyond its own estimate, by lease: its
        #: settle gives them back too.
        self._extra: dict[str, int] = {}
        self._errors = {
            op: metrics.store_errors.labels(operation=op)
            for op in ("admit", "settle", "heartbeat", "control", "wakeup")
        }
        self.instance_id = instance_id or f"{socket.gethostname()}-{os.getpid()}-" + (
            secrets.token_hex(3)
        )
        self._lease_prefix = self.instance_id + ":"
        self._seq = itertools.count(1)
        self._queues: dict[str, Queue] = {}
        self._book = LeaseBook()
        #: Scope -> the epoch of Redis's data at this instance's last heartbeat there, and
        #: when (the loop's clock, read before the call).
        self._epochs: dict[str, tuple[str, float]] = {}
        self._restored = metrics.store_leases_restored
        self._inflight = InFlight(self._runner.late)
        #: Timed-out admit calls still waiting for Redis's reply (see :mod:`.inflight`).
        self._late = self._runner.late
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        #: Settles lost to store failures (also in ``sluice_store_errors{operation=settle}``).
        self.settle_failures = 0
        #: Their log lines, at most one a second per operation and pool.
        self._failures = FailureLog(log)
        #: Their leases, released again once Redis answers (see :mod:`.late_release`).
        self._releases = LateReleases(self._runner, log)
        self._room, self._wakeups = self._wait_room(url, max_waiters, wait_safety_s, wait_metrics)

    def _wait_room(
        self, url: str, max_waiters: int, safety_s: float, metrics: WaitMetrics | None
    ) -> tuple[WaitRoom, WakeListener]:
        """Waiters of this instance, and the pub/sub listener that wakes them."""
        room = WaitRoom(
            self.attempt,
            self.withdraw,
            id_prefix=self._lease_prefix + "w",
            prepare=self._subscribe,
            max_waiters=max_waiters,
            safety_s=safety_s,
            metrics=metrics,
        )
        failed = self._errors["wakeup"].inc
        nodes = None
        if isinstance(self._client, RedisCluster):
            cluster = self._client

            def nodes() -> list[str]:  # every node relays pub/sub: any of them will do
                return [
                    f"[{n.host}]:{n.port}" if ":" in n.host else f"{n.host}:{n.port}"
                    for n in cluster.get_nodes()
                ]

        return room, WakeListener(
            url, room.wake, room.wake_all, failed, timeout_s=self._timeout, nodes=nodes
        )

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts (every master of a cluster) and start the heartbeat."""
        self._loop = asyncio.get_running_loop()
        await self._runner.start()
        if self._heartbeat is None:
            self._heartbeat = self._loop.create_task(self._book.run_heartbeat(self._extend))

    async def close(self) -> None:
        """Apply queued settles, stop the heartbeat, close the connections."""
        if self._closed:
            return
        desk, self._desk = self._desk, None  # grants answered from now on go straight back
        if desk is not None:
            desk.close()
            for q in self._queues.values():
                q.ahead.clear()  # not sent yet: nothing was debited
        await self.flush()
        self._closed = True
        await self._releases.close()
        if self._heartbeat is not None:
            await stop_tasks([self._heartbeat], "lease heartbeat")
        while self._inflight:
            await self._inflight.one_moved()
        self._runner.abandon()  # their leases expire with the TTL: no heartbeat renews them
        self._failures.close()
        await self._wakeups.close()
        await self._runner.aclose()

    def _queue(self, pool: str) -> Queue:
        q = self._queues.get(pool)
        if q is None:
            q = self._queues[pool] = Queue(pool)
        return q

    # --- admit -------------------------------------------------------------------------

    async def admit(self, plan: AdmitPlan, tokens: int) -> Decision:
        """Queue for this tick's batch of ``plan.scope`` and wait for its decision."""
        return await self.attempt(plan, tokens, None)

    async def admit_waiting(self, plan: AdmitPlan, tokens: int, max_wait_ms: int) -> Decision:
        """Admit, waiting up to ``max_wait_ms`` for room; see :meth:`Store.admit_waiting`."""
        return await self._room.admit_waiting(plan, tokens, max_wait_ms)

    def waiting(self, pool: str) -> int:
        """Requests of ``pool`` waiting (or attempting) on this instance."""
        return self._room.waiting(pool)

    async def attempt(self, plan: AdmitPlan, tokens: int, ticket: WaitTicket | None) -> Decision:
        """One request of this tick's batch; ``ticket`` marks a waiter (updated in place)."""
        loop = self._loop
        if loop is None or self._closed:
            raise StoreUnavailable("store is not started" if loop is None else "store is closed")
        if self._desk is not None:
            held = self._from_ahead(plan, tokens, ticket)
            if held is not None:
                return held
        q = self._queues.get(plan.scope) or self._queue(plan.scope)
        fut: asyncio.Future[Decision] = loop.create_future()
        q.admits.append((plan, tokens, self._lease_prefix + str(next(self._seq)), ticket, fut))
        if not q.admit_busy:
            q.admit_busy = True
            loop.call_soon(self._send_admits, q)
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelled after the batch delivered a grant but before this task resumed:
            # the caller never sees the decision, so the store still owns the slot.
            # (Cancelled earlier, the future is cancelled and _deliver gives it back.)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                decision = fut.result()
                if decision.admitted and decision.lease is not None:
                    self.settle(plan, decision.lease, tokens, 0)
            raise

    def _send_admits(self, q: Queue) -> None:
        if not q.admits:
            q.admit_busy = False
            self._send_asks(q)
            return
        batch = q.admits[:MAX_BATCH]
        del q.admits[:MAX_BATCH]
        if q.ahead and len(batch) < MAX_BATCH:  # asks ride behind the batch's requests
            room = MAX_BATCH - len(batch)
            batch += q.ahead[:room]
            del q.ahead[:room]
        self._admit(q, batch, asks_only=False)

    def _send_asks(self, q: Queue) -> None:
        """Asks with no request to ride with go on their own, one such call at a time; a
        request never waits behind one (it goes in a call of its own meanwhile)."""
        if q.admit_busy or q.ahead_busy or not q.ahead:
            return
        q.ahead_busy = True
        batch = q.ahead[:MAX_BATCH]
        del q.ahead[:MAX_BATCH]
        self._admit(q, batch, asks_only=True)

    def _admit(self, q: Queue, batch: list[Admit], asks_only: bool) -> None:
        """Send ``batch``: without a task on one Redis server (:mod:`.batch_call`), in a
        task of its own on a cluster (:meth:`_admit_batch`)."""
        keys, args = admit_call(batch)
        if not self._runner.direct:
            self._inflight.spawn(self._admit_batch(q, batch, keys, args, asks_only))
            return

        def answer(res: list[int] | StoreUnavailable, late: bool) -> None:
            try:
                self._answer(batch, res, late)
            finally:
                if not late:  # (at the timeout the call's connection was retired first)
                    self._next_batch(q, asks_only)

        call = BatchCall(
            self._runner, self._inflight, "admit", keys, args, self._timeout, answer,
            wait_late=True,
        )  # fmt: skip
        call.start()

    async def _admit_batch(
        self, q: Queue, batch: list[Admit], keys: list[str], args: list[Arg], asks_only: bool
    ) -> None:
        late = False
        task = asyncio.current_task()
        assert task is not None
        me: asyncio.Future[Any] = task

        def timed_out(exc: StoreUnavailable) -> None:
            # Its callers are answered now and the queue goes on; this task keeps waiting
            # for the reply (a stalled Redis runs the script when it resumes), now counted
            # with the runner's late calls, not the store's (flush does not wait for it).
            nonlocal late
            late = True
            self._inflight.timed_out(me)
            self._admit_failed(batch, exc)
            self._next_batch(q, asks_only)

        try:
            res = await self._runner.run_past("admit", keys, args, timed_out)
        except StoreUnavailable as exc:
            self._answer(batch, exc, late)
        else:
            self._answer(batch, res, late)
        finally:
            if not late:
                self._next_batch(q, asks_only)

    def _answer(self, batch: list[Admit], res: list[int] | StoreUnavailable, late: bool) -> None:
        """Answer ``batch`` with the script's reply or the call's failure; ``late``: its
        callers were answered at the timeout."""
        if isinstance(res, StoreUnavailable):
            # Late: what it granted (if it ran) expires with the lease TTL, never renewed.
            if not late:
                self._admit_failed(batch, res)
        elif late:
            self._admitted_late(batch, res)
        else:
            self._deliver(batch, res)

    def _admit_failed(self, batch: list[Admit], exc: StoreUnavailable) -> None:
        """Answer every request of ``batch`` with ``exc``; its asks ahead are lost."""
        asked = sum(1 for *_, fut in batch if fut is not None)
        if asked:
            self._failed("admit", batch[0][0].scope, exc, asked, requests=asked)
        for plan, *_, fut in batch:
            if fut is None:
                if self._desk is not None:
                    self._desk.lost(plan)
            elif not fut.done():
                fut.set_exception(exc)

    def _next_batch(self, q: Queue, asks_only: bool) -> None:
        if asks_only:
            q.ahead_busy = False
            self._send_asks(q)
        else:
            # Arrivals during the call go out now, together (group commit).
            self._send_admits(q)

    def _admitted_late(self, batch: list[Admit], res: list[int]) -> None:
        # The batch timed out and its callers were answered, but Redis ran the script
        # after all: every grant goes straight back (_deliver settles grants nobody waits
        # for), instead of holding slots and tokens for a whole lease TTL.
        event(
            log, logging.WARNING, "store_late_admit", pool=batch[0][0].pool, released=granted(res)
        )
        self._deliver(batch, res, late=True)

    def _deliver(self, batch: list[Admit], res: list[int], late: bool = False) -> None:
        """Answer each request of ``batch`` from the script's reply ``res``; ``late``: the
        batch timed out (its callers were answered, its grants ahead counted as lost)."""
        b = 0
        for plan, tokens, lease, ticket, fut in batch:
            code = res[b]
            snap = snapshot_at(res, b)
            if fut is None:  # asked for ahead of demand
                b += STRIDE
                self._answered_ahead(plan, tokens, lease, code, snap, late)
                continue
            decision = make_decision(plan, code, res[b + 1], lease, snap)
            if ticket is not None:
                ticket.verdict, arrival = res[b + 9], res[b + 10]
                ticket.arrival = arrival or ticket.arrival
                if fut.done() and ticket.verdict != WAIT_NO:
                    # The waiter was cancelled while we decided: leave nothing behind.
                    self.withdraw(plan, ticket)
            b += STRIDE
            if code == 0:
                self._book.add(plan, lease)
                if fut.done():
                    # The caller was cancelled while we decided: give the slot straight back.
                    self.settle(plan, lease, tokens, 0)
                    continue
                if self._desk is not None and _first_try(ticket):
                    self._desk.granted(plan, tokens, snap)
            elif self._desk is not None:
                self._desk.refused(plan, code)  # near a limit: nothing may sit held ahead
            if not fut.done():
                fut.set_result(decision)

    # --- grants ahead of demand (see proxy.backend.ahead) ------------------------------

    def _from_ahead(
        self, plan: AdmitPlan, tokens: int, ticket: WaitTicket | None
    ) -> Decision | None:
        """A grant held ahead for a first attempt; a waiter's later attempt sheds instead."""
        assert self._desk is not None
        if _first_try(ticket):
            spare = self._desk.use(plan, tokens)
            if spare is None:
                return None
            if spare.tokens > tokens:
                self._extra[spare.lease] = spare.tokens - tokens
            return spare.decision
        if ticket is not None and ticket.verdict == WAIT_LOCAL:
            self._desk.shed_workload(plan)  # waiting on its workload's own limit
        else:  # someone waits for room in the pool: nothing may sit in an unused grant
            self._desk.shed(plan.pool)
        return None

    def _ask(self, plan: AdmitPlan, tokens: int, n: int) -> None:
        """Queue ``n`` admits of ``plan`` asked for ahead: they ride behind the next batch's
        requests, or go on their own (:meth:`_send_asks`)."""
        assert self._loop is not None
        q = self._queues.get(plan.scope) or self._queue(plan.scope)
        prefix = self._lease_prefix
        q.ahead += [(plan, tokens, prefix + str(next(self._seq)), None, None) for _ in range(n)]
        if not q.admit_busy and not q.ahead_busy:
            self._loop.call_soon(self._send_asks, q)

    def _answered_ahead(
        self, plan: AdmitPlan, tokens: int, lease: str, code: int, snap: Snapshot, late: bool
    ) -> None:
        if code == 0:
            self._book.add(plan, lease)
        if self._desk is not None and not late:
            self._desk.answered(plan, tokens, lease, code, snap)
        elif code == 0:
            # Closing, or the ask timed out and was counted lost: nothing holds it.
            self._give(plan, lease, tokens)

    def _give(self, plan: AdmitPlan, lease: str, tokens: int) -> None:
        """Queue the settle that returns an unused grant ahead: lease, tokens and request."""
        self._queue_settle(plan, lease, tokens, 1)

    def shed_ahead(self, pool: str) -> None:
        """See :meth:`Store.shed_ahead`."""
        if self._desk is not None:
            self._desk.shed(pool)

    # --- settle ------------------------------------------------------------------------

    def settle(
        self,
        plan: AdmitPlan,
        lease: str,
        reserved_tokens: int,
        actual_tokens: int,
        *,
        confirm: bool = False,
    ) -> asyncio.Future[None] | None:
        """Queue the settle; it goes out with the others of this pool (see :meth:`flush`).

        With ``confirm``, the returned future is done once its batch has been applied (or
        failed): the caller can hold its answer until the slot is free fleet-wide.
        """
        amount = reserved_tokens - actual_tokens
        if self._extra:
            amount += self._extra.pop(lease, 0)
        return self._queue_settle(plan, lease, amount, 0, confirm)

    def _queue_settle(
        self, plan: AdmitPlan, lease: str, amount: int, back: int, confirm: bool = False
    ) -> asyncio.Future[None] | None:
        self._book.remove(plan.scope, lease)
        if self._closed or self._loop is None:
            self._settle_lost(plan.scope, 1, "store is closed" if self._closed else "not started")
            return None
        q = self._queues.get(plan.scope) or self._queue(plan.scope)
        q.settles.append((plan, lease, amount, back))
        done = None
        if confirm:
            done = self._loop.create_future()
            q.confirms.append(done)
        if not q.settle_busy:
            q.settle_busy = True
            self._loop.call_soon(self._send_settles, q)
        return done

    def withdraw(self, plan: AdmitPlan, ticket: WaitTicket) -> None:
        """Queue the removal of a waiter's entries; it goes out with the next settle batch."""
        ticket.verdict = WAIT_NO
        if self._closed or self._loop is None:
            return  # the entries expire on their own (deadline + grace)
        q = self._queues.get(plan.scope) or self._queue(plan.scope)
        q.withdraws.append(ticket.id)
        if not q.settle_busy:
            q.settle_busy = True
            self._loop.call_soon(self._send_settles, q)

    async def _subscribe(self, pool: str) -> None:
        await self._wakeups.subscribe(pool)

    def _send_settles(self, q: Queue) -> None:
        if not q.settles and not q.withdraws:
            q.settle_busy = False
            return
        batch = q.settles[:MAX_BATCH]
        del q.settles[:MAX_BATCH]
        gone = q.withdraws[:MAX_BATCH]
        del q.withdraws[:MAX_BATCH]
        # A confirm waits for every settle queued before it: release them with the batch
        # only when the batch takes the whole queue.
        confirms: list[asyncio.Future[None]] = []
        if not q.settles:
            confirms, q.confirms = q.confirms, []
        keys, args = settle_call(q, batch, gone)
        if not self._runner.direct:
            self._inflight.spawn(self._settle_batch(q, batch, keys, args, confirms))
            return

        def answer(res: Any, late: bool) -> None:
            try:
                if isinstance(res, StoreUnavailable):
                    self._settle_failed(q, batch, res)
            finally:
                self._settled(q, confirms)

        call = BatchCall(
            self._runner, self._inflight, "settle", keys, args, self._timeout, answer,
            wait_late=False,
        )  # fmt: skip
        call.start()

    async def _settle_batch(
        self,
        q: Queue,
        batch: list[Settle],
        keys: list[str],
        args: list[Arg],
        confirms: list[asyncio.Future[None]],
    ) -> None:
        try:
            await self._runner.run("settle", keys, args)
        except StoreUnavailable as exc:
            self._settle_failed(q, batch, exc)
        finally:
            self._settled(q, confirms)

    def _settle_failed(self, q: Queue, batch: list[Settle], exc: StoreUnavailable) -> None:
        # Lost withdrawals are not counted: those entries expire at their deadline.
        if batch:
            self._settle_lost(batch[0][0].scope, len(batch), str(exc))
            self._releases.lost(q, batch)

    def _settled(self, q: Queue, confirms: list[asyncio.Future[None]]) -> None:
        """A settle batch was applied or failed: its confirms are released."""
        for done in confirms:
            if not done.done():
                done.set_result(None)
        # The next batch also takes what the loop reads this turn: a settle is never
        # urgent (a confirmed one is waited for by its own caller only), and fewer,
        # larger batches cost Redis less (the admit's next batch goes at once).
        assert self._loop is not None
        self._loop.call_soon(self._send_settles, q)

    def _settle_lost(self, pool: str, n: int, error: str) -> None:
        # Refunds are lost; the leases are released again (LateReleases) until they land
        # or expire: held until then, finished calls would refuse new ones for a lease TTL
        # after Redis is back (a failover, a restart with its data).
        self.settle_failures += n
        self._failed("settle", pool, error, n, settles=n)

    def _failed(self, op: str, pool: str, error: object, n: int = 1, **counts: int) -> None:
        """Count a failed store call in ``sluice_store_errors`` and log it."""
        self._errors[op].inc(n)
        level = logging.WARNING if op == "admit" else logging.ERROR
        self._failures.failed(op, pool, error, level, **counts)

    async def flush(self) -> None:
        """Wait until every settle queued so far is applied or counted as failed.

        Admit batches in flight are waited for too: one whose caller was cancelled meanwhile
        gives its grant back with a settle, which this then waits for as well.
        """
        while any(
            q.settles
            or q.withdraws
            or q.settle_busy
            or q.admits
            or q.ahead
            or q.admit_busy
            or q.ahead_busy
            for q in self._queues.values()
        ):
            if self._inflight:
                await self._inflight.one_moved()
            else:
                await asyncio.sleep(0)  # a send is scheduled with call_soon: let it run

    # --- heartbeat, control, readiness -------------------------------------------------

    async def _extend(self, pool: str, groups: list[Group]) -> None:
        # One call per MAX_EXTEND leases: a failed one loses its own leases' renewal only.
        # Every call of one heartbeat names the epoch seen at the last one, if that one is
        # younger than the shortest lease TTL here (so none of the leases can have been
        # reaped meanwhile): when Redis lost its data since, each adds its leases back.
        seen, restored = "", 0
        last = self._epochs.get(pool)
        now = asyncio.get_running_loop().time()  # local: no decision reads this clock
        if last is not None and now - last[1] < min(p.lease_ttl_ms for p, _ in groups) / 1000:
            seen = last[0]
        epochs: set[str] = set()
        failed = False
        for keys, args in extend_calls(pool, groups, seen):
            try:
                n, epoch, added_back = await self._runner.run("extend", keys, args)
            except StoreUnavailable as exc:
                failed = True
                # (ARGV: g, epoch, then per group ttl, flag, c, ids)
                leases = len(args) - 2 - 3 * int(args[0])
                self._failed("heartbeat", pool, exc, leases=leases)
            else:
                epochs.add(epoch.decode() if isinstance(epoch, bytes) else str(epoch))
                restored += int(n) if added_back else 0
        # The stamp moves only when every lease here was renewed under one epoch: a call
        # that failed left its leases' expiry where it was, and data lost between two calls
        # left the first call's leases out (the next heartbeat, naming the old epoch, adds
        # them back).
        if not failed and len(epochs) == 1:
            self._epochs[pool] = (epochs.pop(), now)
        if restored:
            self._restored.labels(pool=pool).inc(restored)
            event(log, logging.WARNING, "store_leases_restored", pool=pool, leases=restored)

    async def ping(self) -> bool:
        """True when Redis answers PING within the timeout."""
        return await self._runner.ping()

    async def set_pool_limit(self, pool: str, limit: int | None) -> None:
        """Set (or clear with ``None``) the pool's dynamic concurrency limit for the fleet."""
        key = plan_keys(pool, "").pool
        try:
            async with asyncio.timeout(self._timeout):
                # Without the controller's change time: its ticks see a move, time unknown.
                if limit is None:
                    await self._client.hdel(key, "lim", "lim_ms")
                else:
                    await self._client.hset(key, "lim", int(limit))
                    await self._client.hdel(key, "lim_ms")
        except FAILURES as exc:
            self._errors["control"].inc()
            raise StoreUnavailable(f"redis set_pool_limit failed: {why(exc)}") from exc

    async def holds_lease(self, pool: str, lease: str) -> bool:
        """See :meth:`Store.holds_lease`."""
        key = plan_keys(pool, "").pool_leases
        try:
            async with asyncio.timeout(self._timeout):
                return await self._client.zscore(key, lease) is not None
        except FAILURES as exc:
            self._errors["control"].inc()
            raise StoreUnavailable(f"redis holds_lease failed: {why(exc)}") from exc

    async def pool_stats(self, pool: str) -> dict[str, float]:
        """See :meth:`Store.pool_stats`."""
        k = plan_keys(pool, "")
        r = await self._runner.run("stats", [k.pool, k.pool_leases], [])
        # Grants this instance holds ahead are slots, not calls: they are counted apart.
        ahead = self._desk.ahead.held(pool) if self._desk is not None else 0
        return {
            "in_flight": float(max(0, r[1] - ahead)),
            "dynamic_limit": float(r[2]),
            "held_here": float(max(0, self._book.count(pool) - ahead)),
            "held_ahead": float(ahead),
        }

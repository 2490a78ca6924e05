"""Workers that drain the batch queue at the pace admission allows, in every instance.

A slot asks admission first and only then claims a record, so records wait in the
queue (not in a worker) while the batch class has no room: the queue-side twin of
Lambda's MaximumConcurrency. Attempts are counted in the store, not inferred from
redeliveries; a record's lease is renewed while it is processed or backing off; a
retryable failure is retried with full-jitter backoff up to the workload's
``batch.max_attempts``, a permanent one is dead-lettered at once with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import defaultdict

from proxy.admission.estimate import estimate, reservation, settled_tokens
from proxy.admission.fit import reserve
from proxy.config import BatchRule
from proxy.errors import BedrockError
from proxy.jobs.admit import Grant, RecordAdmission
from proxy.jobs.call import Outcome, call_model
from proxy.jobs.metrics import JobMetrics
from proxy.jobs.queue import (
    SUBMIT_GRACE_MS,
    BatchMeta,
    Claimed,
    DeadLetter,
    JobQueue,
    QueueUnavailable,
    Stream,
)
from proxy.jobs.queue import new_id as _new_id
from proxy.jobs.records import (
    CREDENTIAL_TYPES,
    backoff_s,
    error_line,
    is_retryable,
    success_line,
)
from proxy.policy import CompiledPolicy, PolicyRef, PoolInfo, WorkloadInfo
from proxy.tasks import stop_tasks
from proxy.upstream import Upstream

log = logging.getLogger("sluice.jobs")
#: How often idle queues are looked at for new records, and gauges refreshed.
POLL_S = 0.5
GAUGES_S = 5.0
_META_TTL_S = 2.0
_ERROR_PAUSE_S = 1.0
#: A batch's credential refusals are logged at most this often (with their count).
CREDENTIAL_LOG_S = 60.0


class Worker:
    """``slots`` records at most in flight on this instance; admission decides the pace."""

    def __init__(
        self,
        queue: JobQueue,
        policy: PolicyRef,
        admission: RecordAdmission,
        upstream: Upstream,
        metrics: JobMetrics,
        *,
        slots: int,
        lease_s: float,
    ) -> None:
        self.queue = queue
        self._policy = policy
        self.admission = admission
        self.upstream = upstream
        self.metrics = metrics
        self.slots = slots
        self.lease_ms = int(lease_s * 1000)
        self.consumer = f"{uuid.uuid4().hex[:12]}"
        self._rng = random.Random()
        self._active: list[Stream] = []
        self._known: set[Stream] = set()
        self._ready = asyncio.Event()
        #: Set (and replaced) when a reload swaps the policy: wakes slots napping on a refusal.
        self._swapped = asyncio.Event()
        self._turn = 0
        self._held: dict[Stream, set[str]] = defaultdict(set)
        self._metas: dict[str, tuple[float, BatchMeta]] = {}
        self._estimates: dict[Stream, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Credential refusals not logged yet, and when each was last logged, by (batch,
        #: error code): see :meth:`_credential_refused`.
        self._refusals: dict[tuple[str, str], int] = {}
        self._refusals_logged: dict[tuple[str, str], float] = {}

    async def start(self) -> None:
        """Start the slots, the lease heartbeat and the queue watcher."""
        self._tasks = [asyncio.create_task(self._slot()) for _ in range(self.slots)]
        self._tasks.append(asyncio.create_task(self._renew_loop()))
        self._tasks.append(asyncio.create_task(self._watch_loop()))

    async def close(self) -> None:
        """Stop; records held now stay pending and are taken over after their lease."""
        await stop_tasks(self._tasks, "batch worker")

    @property
    def policy(self) -> CompiledPolicy:
        """The policy in force (hot reload swaps it)."""
        return self._policy.current

    def wake(self, stream: Stream) -> None:
        """A batch was just submitted here: start on it without waiting for the watcher."""
        self._known.add(stream)
        self._activate(stream)

    def policy_swapped(self) -> None:
        """A reload: slots napping on the old policy's refusal (a closed schedule, a pause:
        up to its Retry-After) look again now, under the new one."""
        swapped, self._swapped = self._swapped, asyncio.Event()
        swapped.set()

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the policy is swapped."""
        swapped = self._swapped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(swapped.wait(), seconds)

    def _activate(self, stream: Stream) -> None:
        if stream not in self._active:
            self._active.append(stream)
        self._ready.set()

    async def _pick(self) -> Stream:
        while not self._active:
            self._ready.clear()
            await self._ready.wait()
        self._turn = (self._turn + 1) % len(self._active)
        return self._active[self._turn]

    async def _slot(self) -> None:
        while True:
            stream = await self._pick()
            try:
                await self._one(stream)
            except QueueUnavailable as exc:
                log.warning("batch queue unavailable: %s", exc)
                await asyncio.sleep(_ERROR_PAUSE_S)
            except Exception:
                log.exception("batch worker failed; the record is retried after its lease")
                await asyncio.sleep(_ERROR_PAUSE_S)

    def _stream_pool(self, stream: Stream) -> PoolInfo:
        return self.policy.pools.get(stream.pool) or self.policy.resolve_pool(stream.pool)

    async def _one(self, stream: Stream) -> None:
        """Admission first, then a record; no record means the queue is idle for now."""
        workload = self.policy.workloads.get(stream.workload)
        if workload is None:
            self._idle(stream)  # the policy no longer has this workload: leave its records
            return
        got = await self.admission.try_admit(workload, *self._stream_ask(stream))
        if not isinstance(got, Grant):
            await self._nap(got)
            return
        try:
            claimed = await self.queue.claim(stream, self.consumer, self.lease_ms)
        except BaseException:
            self.admission.settle(got, 0)
            raise
        if claimed is None:
            self.admission.settle(got, 0)
            self._idle(stream)
            return
        held: tuple[Claimed, Grant] | None = (claimed, got)
        while held is not None:
            claimed, got = held
            self._held[stream].add(claimed.entry_id)
            try:
                held = await self._process(claimed, got)
            finally:
                self._held[stream].discard(claimed.entry_id)

    def _stream_ask(self, stream: Stream) -> tuple[PoolInfo, int]:
        """The pool to admit a stream's next record on, and the tokens to reserve for it
        (the last record's reservation; settle corrects it with the real usage)."""
        pool = self._stream_pool(stream)
        tokens = self._estimates.get(stream) or reservation(
            0, pool.default_max_tokens, pool.output_weight
        )
        return pool, tokens

    def _idle(self, stream: Stream) -> None:
        if stream in self._active:
            self._active.remove(stream)

    async def _meta(self, batch_id: str) -> BatchMeta | None:
        hit = self._metas.get(batch_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < _META_TTL_S:
            return hit[1]
        meta = await self.queue.batch(batch_id)
        # A batch still submitting is read afresh each time: it turns running any moment.
        if meta is not None and not meta.submitting:
            self._metas[batch_id] = (now, meta)
        return meta

    async def _context(self, c: Claimed, grant: Grant) -> tuple[BatchMeta, WorkloadInfo] | None:
        """The record's batch and workload; None (the grant given back) when either is gone.

        Whatever fails here gives the grant back: one dropped is renewed by the store's
        heartbeat for as long as the process lives.
        """
        try:
            meta = await self._meta(c.batch_id)
        except BaseException:
            self.admission.settle(grant, 0)
            raise
        workload = self.policy.workloads.get(c.stream.workload)
        if workload is None:
            # A reload removed the workload since admission: leave its record, free the slot.
            self.admission.settle(grant, 0)
            self._idle(c.stream)
            return None
        if meta is not None and meta.submitting:
            self.admission.settle(grant, 0)
            await self._unsubmitted(c, meta)
            return None
        if meta is None or meta.cancelled:
            if meta is None:  # deleted (on request or by retention) while it waited
                log.warning(
                    "batch record dropped: its batch no longer exists",
                    extra={"fields": {"batch_id": c.batch_id, "record_id": c.record_id}},
                )
            self.admission.settle(grant, 0)
            await self.queue.complete(c, None, False, (0, 0))
            self.metrics.records.labels(c.stream.workload, "cancelled").inc()
            return None
        return meta, workload

    async def _unsubmitted(self, c: Claimed, meta: BatchMeta) -> None:
        """A record of a batch whose submit has not finished: never run it. Its submit may
        still fail (and answer 503, the client then submitting again), so running it could
        run it twice. Left pending for a lease, or dropped with its batch once the submit
        is long dead (it failed and could not clean up)."""
        age_ms = int(time.time() * 1000) - meta.created_ms
        if age_ms < SUBMIT_GRACE_MS:
            await self.queue.release(c)
            return
        dropped = await self.queue.abandon(c.batch_id)
        if dropped is None:  # its submit finished just now: run the record after its lease
            await self.queue.release(c)
            return
        self.metrics.records.labels(c.stream.workload, "abandoned").inc(dropped)
        log.warning(
            "batch abandoned: its submit never finished (it failed, was answered 503 and "
            "could not clean up, or its process died); its records were never run and are "
            "dropped",
            extra={"fields": {"batch_id": c.batch_id, "workload": c.stream.workload,
                              "dropped_records": dropped, "age_s": age_ms // 1000}},
        )  # fmt: skip

    async def _process(self, c: Claimed, grant: Grant) -> tuple[Claimed, Grant] | None:
        """Call, retry, finish or dead-letter one record; may hand back the next one, held."""
        found = await self._context(c, grant)
        if found is None:
            return None
        meta, workload = found
        model = c.model or meta.model
        rule = self.policy.policy.workloads[workload.name].batch
        try:
            pool = self.policy.resolve_pool(model)
            self._check_allowed(workload, pool)
            est = estimate(
                "Converse" if meta.invocation == "converse" else "InvokeModel", c.model_input
            )
            # Capped like a live call's: one record with an absurd output cap must not
            # reserve (and so lock) a pool's tokens/min; one that can never fit is permanent.
            plan = self.policy.plan(workload, pool, workload.priority, None, grant.tier)
            tokens = reserve(plan, pool, est.input_tokens, est)
        except BedrockError as exc:
            self.admission.settle(grant, 0)
            await self._dead(
                c, meta, model, exc.error_type, exc.error_type, exc.message, c.attempts, exc.status
            )
            return None
        self._estimates[c.stream] = tokens
        if pool.name != grant.plan.pool:
            # A replay moved the record to another model: admit it where it will run.
            self.admission.settle(grant, 0)
            grant = await self.admission.admit(workload, pool, tokens)
        return await self._attempts(c, meta, model, workload, pool, tokens, rule, grant)

    @staticmethod
    def _check_allowed(workload: WorkloadInfo, pool: PoolInfo) -> None:
        """The workload's ``models:`` allow-list, as a live call and a submit check it: a
        reload may have narrowed it since the record was queued (or a replay named a model)."""
        allowed = workload.allowed_pools
        if allowed is not None and pool.name not in allowed:
            raise BedrockError(
                "AccessDeniedException",
                f"workload '{workload.name}' may not call model pool '{pool.name}' "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'}; workloads.{workload.name}"
                ".models in the policy in force); the record was not sent",
                status=403,
            )

    async def _attempts(
        self,
        c: Claimed,
        meta: BatchMeta,
        model: str,
        workload: WorkloadInfo,
        pool: PoolInfo,
        tokens: int,
        rule: BatchRule,
        grant: Grant,
    ) -> tuple[Claimed, Grant] | None:
        """Call until the record succeeds, fails for good or runs out of attempts."""
        # A record claimed with attempts already counted was taken over from a worker that
        # died or lost its lease mid-record.
        attempts, reason = c.attempts, "first" if c.attempts == 1 else "redelivered"
        if attempts > rule.max_attempts:
            # Taken over more often than it may be tried: each time its worker died or lost
            # its lease mid-call (a record that crashes or stalls the process). Sent again, it
            # would go round for ever; dead-lettered instead, replayable once fixed.
            self.admission.settle(grant, 0)
            await self._dead(
                c, meta, model, "retries_exhausted", "WorkerLost",
                f"the record reached {attempts - 1} attempts, the last one interrupted (its "
                "worker died or lost its lease mid-call; batch.max_attempts is "
                f"{rule.max_attempts}); not sent again",
                attempts - 1,
            )  # fmt: skip
            return None
        while True:
            self.metrics.attempts.labels(reason).inc()
            try:
                out = await call_model(
                    self.upstream, model, meta.invocation, c.model_input, grant.tier
                )
            except BaseException as exc:
                # Stopped mid-call (shutdown): free the slot now, keep the reservation (the
                # call may have run); the record itself is retaken after its lease.
                self.admission.settle(grant, grant.reserved)
                if isinstance(exc, asyncio.CancelledError):
                    # Our own stop, not the record's doing: the attempt is uncounted, so
                    # deploys never use up a record's attempts (nor its takeover limit).
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(self.queue.release(c)), 1.0)
                raise
            self._settle(grant, pool, out)
            if out.status == 200:
                line = success_line(c.record_id, c.model_input, out.body)
                return await self._succeed(
                    c, line, (out.usage.input_tokens, out.usage.output_tokens)
                )
            if not is_retryable(out.status, out.error_type):
                await self._dead(
                    c, meta, model, out.code, out.code, out.message, attempts, out.status
                )
                return None
            if attempts >= rule.max_attempts:
                await self._dead(
                    c, meta, model, "retries_exhausted", out.code, out.message, attempts, out.status
                )
                return None
            if out.error_type in CREDENTIAL_TYPES:
                self._credential_refused(c, out.code)
            await asyncio.sleep(
                backoff_s(attempts, rule.base_backoff_ms, rule.max_backoff_ms, self._rng)
            )
            # Counted once admitted, right before the call: a worker stopped while it waits
            # for admission leaves no attempt behind that was never made.
            grant = await self.admission.admit(workload, pool, tokens)
            try:
                attempts, reason = await self.queue.next_attempt(c), out.code
            except BaseException:
                self.admission.settle(grant, 0)
                raise

    def _credential_refused(self, c: Claimed, code: str) -> None:
        """Retried (a rotation passes), but said: a key wrong for good would otherwise look
        like a batch that only waits. Once a minute per batch and error, with the count."""
        key = (c.batch_id, code)
        self._refusals[key] = self._refusals.get(key, 0) + 1
        now = time.monotonic()
        if now - self._refusals_logged.get(key, -CREDENTIAL_LOG_S) < CREDENTIAL_LOG_S:
            return
        self._refusals_logged[key] = now
        log.warning(
            "Bedrock refused Sluice's own credentials; the batch's records wait and retry",
            extra={
                "fields": {
                    "batch_id": c.batch_id,
                    "error_code": code,
                    "refusals": self._refusals.pop(key),
                }
            },
        )

    async def _succeed(
        self, c: Claimed, line: bytes, used: tuple[int, int]
    ) -> tuple[Claimed, Grant] | None:
        """Write the line; when admission already says yes to the stream's next record, take
        that record in the same round trip (finish + claim) and hand it back."""
        workload = self.policy.workloads.get(c.stream.workload)
        # A reload may have removed the workload mid-call: write the line, take no next record.
        got = (
            0.0
            if workload is None
            else await self.admission.try_admit(workload, *self._stream_ask(c.stream))
        )
        nxt: Claimed | None = None
        if not isinstance(got, Grant):
            new = await self.queue.complete(c, line, True, used)
        else:
            try:
                new, nxt = await self.queue.complete_and_claim(
                    c, line, used, self.consumer, self.lease_ms
                )
            except BaseException:
                self.admission.settle(got, 0)
                raise
            if nxt is None:
                self.admission.settle(got, 0)
                self._idle(c.stream)
        if new:
            self.metrics.records.labels(c.stream.workload, "succeeded").inc()
        return (nxt, got) if nxt is not None and isinstance(got, Grant) else None

    def _settle(self, grant: Grant, pool: PoolInfo, out: Outcome) -> None:
        u = out.usage
        if u.known:
            actual = settled_tokens(
                u.input_tokens, u.output_tokens, u.cache_write_tokens, pool.output_weight
            )
        else:
            actual = 0 if out.status != 200 else grant.reserved
        self.admission.settle(grant, actual)
        self.admission.observe(
            pool.name,
            grant.plan.priority,
            out.latency_ms,
            out.status,
            on_pool=grant.plan.tier is None,
            lease=grant.lease,
        )

    async def _dead(
        self,
        c: Claimed,
        meta: BatchMeta,
        model: str,
        reason: str,
        code: str,
        message: str,
        attempts: int,
        status: int = 500,
    ) -> None:
        """Dead-letter the record; ``status`` is its output line's ``errorCode`` (500 when
        no answer says otherwise: an attempt interrupted by its worker's death)."""
        entry = DeadLetter(
            dlq_id=_new_id(c.stream.pool),
            batch_id=c.batch_id,
            record_id=c.record_id,
            workload=c.stream.workload,
            pool=c.stream.pool,
            model=model,
            reason=reason,
            error_code=code,
            message=message,
            attempts=attempts,
            model_input=c.model_input,
            at_ms=int(time.time() * 1000),
        )
        line = error_line(c.record_id, c.model_input, status, code, message)
        if await self.queue.dead_letter(c, entry, line):
            self.metrics.records.labels(c.stream.workload, "dead_lettered").inc()
            # Never prompt bodies in logs: ids, reason and the upstream error only.
            log.warning(
                "batch record dead-lettered",
                extra={
                    "fields": {
                        "batch_id": c.batch_id,
                        "record_id": c.record_id,
                        "dlq_id": entry.dlq_id,
                        "reason": reason,
                        "error_code": code,
                        "attempts": attempts,
                    }
                },
            )

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            for stream, ids in list(self._held.items()):
                if not ids:
                    continue
                try:
                    await self.queue.renew(stream, self.consumer, sorted(ids), self.lease_ms)
                except QueueUnavailable as exc:
                    # The lease may lapse: the record is then redelivered, and its output
                    # line is still written once. Worth a line, not a crash.
                    log.warning("batch lease renewal failed: %s", exc)

    async def _watch_loop(self) -> None:
        last_gauges = 0.0
        while True:
            try:
                await self._watch_once()
                if time.monotonic() - last_gauges >= GAUGES_S:
                    last_gauges = time.monotonic()
                    await self.metrics.refresh(self.queue, self._known)
            except QueueUnavailable as exc:
                log.warning("batch queue unavailable: %s", exc)
            except Exception:
                log.exception("batch queue watcher failed; it looks again shortly")
            await asyncio.sleep(POLL_S)

    async def _watch_once(self) -> None:
        self._known.update(await self.queue.streams())
        for stream in sorted(self._known):
            if stream not in self._active and await self.queue.has_work(stream, self.lease_ms):
                self._activate(stream)

"""The request path, one stage a module: identify → admit → forward → settle.

Where things are decided, one step each from :meth:`Pipeline.handle`:

* who is calling — :func:`proxy.pipeline.intake.identify_call` (→ ``Caller | Refused``);
* a concurrency or rate limit, the schedule, the breaker, a downgrade —
  :meth:`proxy.pipeline.admit.Admission.admit` (→ ``Admitted | Degraded | Refused``);
* the upstream call and its retries — :meth:`proxy.pipeline.forward.Forwarder.forward`
  (a throttle that survived them sends a class with a chain down it:
  :meth:`proxy.pipeline.admit.Admission.after_throttle`);
* the lease release — :meth:`proxy.pipeline.settle.Settler.settle`, from the ``finally``
  of whoever runs the call (:meth:`Pipeline.handle`, or the coalesced flight);
* every answer Sluice makes itself — :mod:`proxy.pipeline.respond`.

Per-request helpers live beside the stage that uses them (budget, schedule, degrade,
coalesce, retry, cache, template, rewrite).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.admission.gate import Gate
from proxy.control.controller import Adaptivity
from proxy.errors import BedrockError
from proxy.log import AccessLog
from proxy.metrics import Metrics
from proxy.pipeline.admit import Admission
from proxy.pipeline.cache import CachedResponse, ResponseCache, cache_key, cache_operation
from proxy.pipeline.call import ADMITTED, Admitted, Call, Degraded, Refused, Throttled
from proxy.pipeline.coalesce import Coalescer
from proxy.pipeline.degrade import Fallback
from proxy.pipeline.forward import Forwarder
from proxy.pipeline.identify import PRIORITY_HEADER, WORKLOAD_HEADER, Caller
from proxy.pipeline.intake import identify_call
from proxy.pipeline.respond import Responder, internal_error
from proxy.pipeline.settle import Settler, confirmed
from proxy.policy import PolicyRef
from proxy.routes import MeteredRoute, Route
from proxy.upstream import Upstream

log = logging.getLogger("sluice.request")

#: Sees each finished request: (workload, priority, seconds) — the fleet view's latencies.
Tap = Callable[[str | None, str | None, float], None]


class Pipeline:
    """The aiohttp handler for every bedrock-runtime path."""

    def __init__(
        self,
        policy: PolicyRef,
        gate: Gate,
        upstream: Upstream,
        metrics: Metrics,
        access_log: AccessLog,
        cache: ResponseCache,
        adaptivity: Adaptivity | None = None,
    ) -> None:
        self.policy = policy
        self.admission = Admission(gate, cache, metrics, adaptivity)
        self.forwarder = Forwarder(
            upstream, metrics, cache, adaptivity, self.admission.tiers, self.requeue
        )
        self.settler = Settler(gate, metrics, access_log, adaptivity)
        self.respond = Responder(metrics)
        self.metrics = metrics
        self.access_log = access_log
        self.coalescer = Coalescer()
        #: Set by the LiveProxy serving this pipeline (the fleet view's latencies).
        self.tap: Tap | None = None
        # Request ids: a random per-process prefix and a counter, UUID-shaped, unique
        # without a syscall per request (uuid4 reads os.urandom each time).
        p = uuid.uuid4().hex[:20]
        self._id_prefix = f"{p[:8]}-{p[8:12]}-4{p[13:16]}-a{p[17:20]}-"  # sliced once
        self._id_counter = itertools.count()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one Bedrock call end to end; its lease is settled whatever happens."""
        # The policy is read once: a request is decided wholly under one policy.
        call = Call(self._request_id(), time.perf_counter(), self.policy.current)
        try:
            # identify → admit → forward: each stage returns a value, refusals included.
            caller = await identify_call(request, call)
            outcome = (
                caller if isinstance(caller, Refused) else await self.serve(request, call, caller)
            )
            if isinstance(outcome, Refused):
                outcome = self.respond.refused(call, outcome.error)
            response = outcome
        except asyncio.CancelledError:
            call.disconnected = True
            call.status = 499
            raise
        except Exception:
            log.exception("unexpected failure", extra={"fields": {"request_id": call.request_id}})
            response = self.respond.refused(call, internal_error(call))
        finally:
            # A coalesced flight runs (and settles) this call itself, maybe after we left.
            released = None if call.in_flight_group else self.settler.settle(call)
            self.settler.record(call)
        if released is not None:  # no coroutine made for the common case
            await confirmed(released)
        if self.tap is not None:  # the workload and class the answer names, and its time
            who, took = call.caller, time.perf_counter() - call.started
            if who is not None and not call.coalesced:  # annotate() wrote the caller's
                self.tap(who.workload.name, who.priority, took)
            else:  # no caller: what a refusal carried; a coalesced follower: its leader's
                headers = response.headers
                self.tap(headers.get(WORKLOAD_HEADER), headers.get(PRIORITY_HEADER), took)
        return response

    def serve(
        self, request: web.Request, call: Call, caller: Caller
    ) -> Awaitable[web.StreamResponse | Refused]:
        """admit → forward for an identified call, or the coalesced flight of identical
        cacheable calls. The coroutine is returned, not awaited: no frame of this one on
        every resumption of the request."""
        route = call.route
        assert route is not None
        # (CompiledPolicy.caching: no _cache_key call for the workloads that cache nothing)
        if isinstance(route, MeteredRoute) and caller.workload.name in call.policy.caching:
            key = self._cache_key(call, route, caller)
            if isinstance(key, Refused):
                return _ready(key)
            if key is not None:
                return self._coalesced(request, call, route, caller)
        return self._run(request, call, route, caller)

    async def _run(
        self, request: web.Request, call: Call, route: Route, caller: Caller
    ) -> web.StreamResponse | Refused:
        """admit → forward: the upstream's answer, a fallback's, or the refusal."""
        admitted: Admitted | Degraded | Refused = ADMITTED
        if isinstance(route, MeteredRoute):
            admitted = await self.admission.admit(call, route, caller)
        while True:  # twice at most: a degraded call is never degraded again
            if isinstance(admitted, Refused):
                return admitted
            if isinstance(admitted, Fallback):
                return self.respond.fallback(call, admitted)
            outcome = await self.forwarder.forward(request, call, route)
            if not isinstance(outcome, Throttled):
                return outcome
            assert isinstance(route, MeteredRoute)  # only a call with a pool degrades
            # The throttled attempt is settled first (once: Ticket.released; Bedrock charged
            # nothing), so it is not counted again when the degraded call settles.
            self.settler.settle(call)
            call.upstream_status = call.served_tier = None
            admitted = await self.admission.after_throttle(call, route, caller)

    async def requeue(
        self, call: Call, backoff: Awaitable[None], until: float
    ) -> BedrockError | None:
        """Release the grant of a call Bedrock throttled, await ``backoff`` without it, and
        queue for a new one until ``until`` (perf_counter; the retry of a class without a
        chain: :meth:`Backoff._requeue`)."""
        released = self.settler.release(call, refused=True)
        # Our own slot is free (bounded wait) before we queue for one.
        await (backoff if released is None else asyncio.gather(backoff, confirmed(released)))
        wait_ms = int((until - time.perf_counter()) * 1000)
        return await self.admission.readmit(call, max(0, wait_ms))

    def _request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter) & 0xFFFFFFFFFFFF:012x}"

    @staticmethod
    def _cache_key(call: Call, route: MeteredRoute, caller: Caller) -> str | Refused | None:
        """The exact-match cache key when this workload caches this operation."""
        rule = call.policy.policy.workloads[caller.workload.name].cache
        if rule is None or route.streaming or cache_operation(route.operation) is None:
            return None
        try:
            pool = call.policy.resolve_pool(route.model_id)
        except BedrockError as exc:
            return Refused(exc)
        call.cache_key = cache_key(
            caller.workload.name, pool.name, route.operation, call.body, headers=call.headers
        )
        return call.cache_key

    async def _coalesced(
        self, request: web.Request, call: Call, route: Route, caller: Caller
    ) -> web.StreamResponse:
        """Identical cacheable calls in flight together share one admission and upstream call.

        The shared flight runs the leader's call and owns its lease: it settles it in its
        own ``finally``, so a leader that leaves while followers wait hands it on.
        """

        async def lead() -> CachedResponse | Refused:
            try:
                outcome = await self._run(request, call, route, caller)
            finally:
                released = self.settler.settle(call)
            if released is not None:
                await confirmed(released)
            # A refusal is shared as a value: each waiter answers it under its own id.
            return outcome if isinstance(outcome, Refused) else self.respond.to_shared(outcome)

        assert call.cache_key is not None
        # From here a flight runs this call (if it leads) and settles it: not the handler.
        call.in_flight_group = True
        result, shared = await self.coalescer.run(call.cache_key, lead)
        if isinstance(result, Refused):
            return self.respond.refused(call, result.error)
        if shared:
            call.coalesced = True
            self.metrics.coalesced.labels(caller.workload.name).inc()
        return self.respond.shared(call, result, shared)

    async def close(self) -> None:
        """Wait for background cache writes and flush the access log: nothing is lost."""
        await self.forwarder.close()
        self.access_log.flush()


async def _ready(refused: Refused) -> Refused:
    return refused

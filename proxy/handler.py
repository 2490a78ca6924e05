"""The request path: identify → admit → forward → settle.

Each step is one call into its own module; nothing here decides policy. The only
state a request leaves behind is its settlement, which is queued (never awaited)
in a ``finally`` so a cancelled or failed call still releases its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.admission.estimate import (
    RequestEstimate,
    estimate,
    parse_body,
    reservation,
    settled_tokens,
)
from proxy.admission.gate import Gate, Ticket, retry_headers
from proxy.control.controller import Adaptivity
from proxy.errors import BedrockError, from_exception
from proxy.eventstream import exception_frame
from proxy.log import AccessLog
from proxy.metrics import Metrics
from proxy.pipeline.budget import enforce_budget, upstream_timeout
from proxy.pipeline.cache import (
    CachedResponse,
    CacheUnavailable,
    ResponseCache,
    cache_key,
    cache_operation,
    cacheable,
)
from proxy.pipeline.coalesce import Coalescer
from proxy.pipeline.degrade import Degrader, Fallback
from proxy.pipeline.identify import Caller, identify
from proxy.pipeline.retry import RetryBudget, next_delay, retryable
from proxy.pipeline.schedule import cap_at, describe_next_change
from proxy.policy import CompiledPolicy, PoolInfo, WorkloadInfo
from proxy.routes import Route, match
from proxy.upstream import Upstream, returnable
from proxy.usage import StreamUsage, Usage, from_body, from_headers

log = logging.getLogger("sluice.request")
#: Longest an answer waits for its release to be confirmed (see Proxy.handle).
_CONFIRM_TIMEOUT_S = 0.5

#: Retry-After for a paused workload: the pause is re-evaluated every tick.
PAUSE_RETRY_S = 5
#: Retry-After added to Bedrock's own throttles (it sends none).
UPSTREAM_RETRY_AFTER_MS = 1000


@dataclass(slots=True)
class Call:
    """What one request has learned so far; becomes its access-log line."""

    request_id: str
    started: float
    route: Route | None = None
    caller: Caller | None = None
    pool: PoolInfo | None = None
    ticket: Ticket | None = None
    status: int = 0
    error_type: str | None = None
    upstream_status: int | None = None
    upstream_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    disconnected: bool = False
    #: The body as it goes upstream (trimmed when the input budget says so).
    body: bytes = b""
    read_timeout_s: float | None = None
    retries: int = 0
    trimmed_messages: int = 0
    #: Upstream path when a downgrade rewrote the model id (else the route's own).
    path: str | None = None
    #: Headers naming what served a degraded call (x-sluice-degraded, -served-model).
    degraded: dict[str, str] | None = None
    fallback: Fallback | None = None
    #: Exact-match cache key when this workload caches this operation.
    cache_key: str | None = None
    coalesced: bool = False


def _stream_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the upstream stopped sending within the upstream read timeout"
    return f"the upstream stream failed: {type(exc).__name__}"


def _error_type(headers: Any) -> str | None:
    value = headers.get("x-amzn-ErrorType")
    return value.partition(":")[0] if value else None


class Proxy:
    """The aiohttp handler for every bedrock-runtime path."""

    def __init__(
        self,
        policy: CompiledPolicy,
        gate: Gate,
        upstream: Upstream,
        metrics: Metrics,
        access_log: AccessLog,
        cache: ResponseCache,
        adaptivity: Adaptivity | None = None,
    ) -> None:
        self.policy = policy
        self.gate = gate
        self.upstream = upstream
        self.metrics = metrics
        self.access_log = access_log
        self.cache = cache
        self.adaptivity = adaptivity
        self.degrader = Degrader(policy, gate, cache, metrics, self._breaker_allows)
        self.coalescer = Coalescer()
        self._background: set[asyncio.Task[None]] = set()
        # Request ids: a random per-process prefix and a counter, UUID-shaped, unique
        # without a syscall per request (uuid4 reads os.urandom each time).
        self._id_prefix = uuid.uuid4().hex[:20]
        self._id_counter = itertools.count()
        server = policy.policy.server
        self.max_body = server.max_body_bytes
        self.retry = server.retry
        self._retry_budgets: dict[tuple[str, str], RetryBudget] = {}
        self._rng = random.Random()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one Bedrock call end to end."""
        call = Call(request_id=self._request_id(), started=time.perf_counter())
        try:
            route = call.route = match(request.method, request.raw_path)
            body = call.body = await self._read_body(request, route)
            caller = call.caller = identify(
                self.policy, request.method, request.host, request.raw_path, request.headers, body
            )
            if route.metered and self._cacheable(call, route, caller):
                response = await self._coalesced(request, call, route, caller)
            else:
                if route.metered:
                    call.ticket = await self._admit(call, route, caller, body)
                response = await self._forward(request, call, route)
        except BedrockError as exc:
            response = self._refuse(call, exc)
        except asyncio.CancelledError:
            call.disconnected = True
            call.status = 499
            raise
        except Exception:
            log.exception("unexpected failure", extra={"fields": {"request_id": call.request_id}})
            response = self._refuse(
                call,
                BedrockError(
                    "InternalServerException",
                    f"Sluice failed unexpectedly; request id {call.request_id}",
                    status=500,
                ),
            )
        finally:
            released = self._settle(call)
            self._record(call)
        if released is not None:
            # Admitted near a concurrency cap: the caller may send its next call (to any
            # instance) the moment it has this answer, and that call must not find this
            # one still holding a slot. Bounded: a slow store must not hold the answer.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CONFIRM_TIMEOUT_S):
                    await released
        return response

    def _request_id(self) -> str:
        p, n = self._id_prefix, next(self._id_counter) & 0xFFFFFFFFFFFF
        return f"{p[:8]}-{p[8:12]}-4{p[13:16]}-a{p[17:20]}-{n:012x}"

    async def _read_body(self, request: web.Request, route: Route) -> bytes:
        if request.method != "POST":
            return b""
        length = request.content_length
        if length is not None and length > self.max_body:
            raise self._too_large(length)
        content_type = request.headers.get("Content-Type")
        # Bedrock treats a missing Content-Type as JSON (boto3's invoke_model sends none
        # unless asked); anything else that is not JSON cannot be a Bedrock body.
        if content_type is not None and "json" not in content_type and "*/*" not in content_type:
            raise BedrockError(
                "ValidationException",
                f"{route.operation} takes a JSON body; Content-Type '{content_type[:80]}' "
                "is not supported (use application/json)",
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large(None) from None
        if len(body) > self.max_body:
            raise self._too_large(len(body))
        return body

    def _too_large(self, size: int | None) -> BedrockError:
        got = f"{size} bytes" if size is not None else "larger than that"
        return BedrockError(
            "ValidationException",
            f"Request body is {got}; this Sluice accepts at most {self.max_body} bytes "
            "(server.max_body_bytes)",
            status=413,
        )

    async def _admit(self, call: Call, route: Route, caller: Caller, body: bytes) -> Ticket | None:
        assert route.model_id is not None
        pool = call.pool = self.policy.resolve_pool(route.model_id)
        workload = caller.workload
        if workload.allowed_pools is not None and pool.name not in workload.allowed_pools:
            raise BedrockError(
                "AccessDeniedException",
                f"workload '{workload.name}' may not call model pool '{pool.name}' "
                f"(allowed: {', '.join(sorted(workload.allowed_pools))})",
                status=403,
            )
        wl_cfg = self.policy.policy.workloads[workload.name]
        server = self.policy.policy.server
        self._check_paused(workload)
        plan = self.policy.plan(workload, pool, caller.priority, self._scheduled_cap(workload))
        unmetered = self.policy.unmetered(plan)
        # Asked once per request: in half-open state a True is a probe slot taken.
        breaker_open = not self._breaker_allows(pool.name)
        if (
            unmetered
            and not breaker_open
            and wl_cfg.input_budget is None
            and server.upstream_timeout is None
        ):
            # Nothing needs an estimate: skip the JSON walk (the body is validated upstream,
            # and real usage comes back in the answer).
            parse_body(body)
            return None
        est = estimate(route.operation, body)
        input_tokens = est.input_tokens
        if wl_cfg.input_budget is not None:
            trimmed = enforce_budget(
                route.operation, est.body, input_tokens, wl_cfg.input_budget, workload=workload.name
            )
            if trimmed is not None:
                call.body, input_tokens = trimmed.body, trimmed.input_tokens
                call.trimmed_messages = trimmed.dropped_messages
                self.metrics.trimmed.labels(workload.name).inc()
                self.metrics.trimmed_tokens.labels(workload.name).inc(trimmed.dropped_tokens)
        call.usage.input_tokens = input_tokens
        if server.upstream_timeout is not None:
            call.read_timeout_s = upstream_timeout(
                input_tokens, server.upstream_timeout, server.upstream_read_timeout_seconds
            )
        if breaker_open:
            refusal = self._breaker_open(pool)
            if not wl_cfg.degrade:
                raise refusal
        elif unmetered:
            return None
        else:
            tokens = reservation(
                input_tokens, est.max_tokens or pool.default_max_tokens, pool.output_weight
            )
            try:
                ticket = await self.gate.admit(
                    workload, caller.priority, pool, plan, tokens, max_wait_ms=wl_cfg.max_wait_ms
                )
                self.metrics.in_flight_of(pool.name).inc()
                return ticket
            except BedrockError as exc:
                if self.adaptivity is not None:
                    self.adaptivity.refused(pool.name, caller.priority, exc)
                if exc.status != 429 or not wl_cfg.degrade:
                    raise
                refusal = exc
        return await self._degrade(call, route, caller, pool, est, input_tokens, refusal)

    async def _degrade(
        self,
        call: Call,
        route: Route,
        caller: Caller,
        pool: PoolInfo,
        est: RequestEstimate,
        input_tokens: int,
        refusal: BedrockError,
    ) -> Ticket | None:
        """Go down the workload's chain (or raise ``refusal``); the ticket of a downgrade."""
        outcome = await self.degrader.degrade(
            route, caller, pool, est, input_tokens, call.body, refusal
        )
        if isinstance(outcome, Fallback):
            call.fallback = outcome
            call.degraded = {k: v for k, v in outcome.headers.items() if k.startswith("x-sluice")}
            return None
        call.pool, call.path, call.degraded = outcome.pool, outcome.path, outcome.headers
        self.metrics.in_flight_of(outcome.pool.name).inc()
        return outcome.ticket

    async def _degrade_throttled(
        self, call: Call, route: Route, upstream: aiohttp.ClientResponse
    ) -> bool:
        """A Bedrock throttle that survived retries sends a class with a chain down it.

        The throttled call is settled first (it charged nothing); if no step can serve, the
        caller gets Sluice's 429 with Retry-After instead of Bedrock's bare one.
        """
        caller, pool = call.caller, call.pool
        if upstream.status != 429 or caller is None or pool is None or call.degraded:
            return False
        if not self.policy.policy.workloads[caller.workload.name].degrade:
            return False
        await upstream.read()
        upstream.release()
        call.upstream_status = 429
        self._settle(call)
        call.upstream_status, call.ticket = None, None
        refusal = BedrockError(
            "ThrottlingException",
            f"Too many requests: Bedrock throttled model pool '{pool.name}' after "
            f"{call.retries} retries and no step of the degradation chain could serve",
            status=429,
            headers=retry_headers(UPSTREAM_RETRY_AFTER_MS),
        )
        est = estimate(route.operation, call.body)
        input_tokens = call.usage.input_tokens or est.input_tokens
        call.ticket = await self._degrade(call, route, caller, pool, est, input_tokens, refusal)
        return True

    async def _forward(self, request: web.Request, call: Call, route: Route) -> web.StreamResponse:
        if call.fallback is not None:
            call.status = 200
            headers = CIMultiDict(call.fallback.headers)
            self._annotate(headers, call)
            return web.Response(status=200, body=call.fallback.body, headers=headers)
        if not route.metered and request.method == "POST":
            parse_body(call.body)  # Bedrock-shaped errors for malformed JSON on every operation
        sent = time.perf_counter()
        upstream = await self._send_with_retries(request, call, route)
        if await self._degrade_throttled(call, route, upstream):
            return await self._forward(request, call, route)
        try:
            call.upstream_status = upstream.status
            headers = returnable(upstream.headers)
            self._annotate(headers, call)
            if route.streaming and upstream.status == 200:
                return await self._relay_stream(request, call, upstream, headers, sent)
            data = await self._read_upstream(upstream)
            call.upstream_s = time.perf_counter() - sent
            self._account(call, upstream.status, headers, data)
            call.status = upstream.status
            if call.cache_key is not None and call.degraded is None:
                self._cache_put(call, upstream.status, headers, data)
            return web.Response(status=upstream.status, body=data, headers=headers)
        finally:
            if call.upstream_s == 0.0:
                call.upstream_s = time.perf_counter() - sent
            upstream.release()

    async def _send_with_retries(
        self, request: web.Request, call: Call, route: Route
    ) -> aiohttp.ClientResponse:
        """Send upstream; retry throttles and 503s while the caller's deadline and budget allow.

        Retries happen only before any byte reaches the caller, so a streaming client
        never sees a half-sent stream followed by a second one.
        """
        pool = call.pool.name if call.pool else "-"
        # One budget per pool and class: a flood of throttled batch calls must not use up
        # the retries that keep real-time calls answering.
        key = (pool, call.caller.priority if call.caller else "-")
        budget = self._retry_budgets.get(key)
        if budget is None:
            budget = self._retry_budgets[key] = RetryBudget(self.retry.budget_ratio)
        budget.on_first_attempt()
        deadline = call.started + (
            self.policy.policy.workloads[call.caller.workload.name].deadline_seconds
            if call.caller
            else 60.0
        )
        while True:
            upstream = await self.upstream.send(
                request.method,
                call.path or route.path,
                route.query,
                request.headers,
                call.body,
                read_timeout_s=call.read_timeout_s,
            )
            error_type = _error_type(upstream.headers) if upstream.status != 200 else None
            if not retryable(upstream.status, error_type) or not await self._headroom(
                call, upstream
            ):
                return upstream
            remaining = deadline - time.perf_counter()
            delay = next_delay(call.retries + 1, self.retry, remaining, budget, self._rng)
            if delay is None:
                if call.retries < self.retry.max_retries and budget.tokens < 1:
                    self.metrics.retry_budget_exhausted.labels(pool).inc()
                return upstream
            await upstream.read()
            upstream.release()
            if self.adaptivity is not None and call.pool is not None:
                # Retries absorb throttles the caller never sees; the controller and the
                # breaker must still count them.
                self.adaptivity.observe(
                    call.pool.name,
                    call.caller.priority if call.caller else "-",
                    (time.perf_counter() - call.started) * 1000,
                    throttled=upstream.status == 429,
                    server_error=upstream.status >= 500,
                )
            call.retries += 1
            self.metrics.upstream_retries.labels(pool, error_type or str(upstream.status)).inc()
            await asyncio.sleep(delay)

    async def _headroom(self, call: Call, upstream: aiohttp.ClientResponse) -> bool:
        """A throttle is retried only into headroom under the pool's adaptive limit; a class
        without a chain waits for some up to its ``max_wait_ms`` (one with a chain degrades)."""
        a, pool, caller = self.adaptivity, call.pool, call.caller
        if upstream.status != 429 or a is None or pool is None or caller is None:
            return True
        wl = self.policy.policy.workloads[caller.workload.name]
        return await a.await_headroom(pool.name, 0 if wl.degrade else wl.max_wait_ms / 1000)

    def _breaker_allows(self, pool: str) -> bool:
        return self.adaptivity is None or self.adaptivity.breaker_allows(pool)

    def _breaker_open(self, pool: PoolInfo) -> BedrockError:
        breaker = self.policy.policy.models[pool.name].breaker
        wait_s = breaker.open_seconds if breaker else 1.0
        return BedrockError(
            "ThrottlingException",
            f"Too many requests: the circuit breaker of model pool '{pool.name}' is open because "
            "Bedrock throttled or failed too many recent calls; retry in "
            f"{wait_s:.0f} s",
            status=429,
            headers=retry_headers(int(wait_s * 1000)),
        )

    def _check_paused(self, workload: WorkloadInfo) -> None:
        if self.adaptivity is None or not self.adaptivity.paused(workload.name):
            return
        rule = self.policy.policy.workloads[workload.name].pause
        assert rule is not None
        self.metrics.refused.labels(workload.name, "-", workload.priority, "paused").inc()
        raise BedrockError(
            "ThrottlingException",
            f"Too many requests: workload '{workload.name}' is paused while priority class "
            f"'{rule.when_class}' answers slower than {rule.factor:g}x its p99 target; "
            f"retry in {PAUSE_RETRY_S} s",
            status=429,
            headers=retry_headers(PAUSE_RETRY_S * 1000),
        )

    def _scheduled_cap(self, workload: WorkloadInfo) -> int | None:
        """The schedule's concurrency now; a zero window refuses until it ends."""
        schedule = self.policy.policy.workloads[workload.name].schedule
        if schedule is None:
            return None
        now = datetime.now(UTC)
        cap = cap_at(schedule, now)
        if cap is None:
            return None
        if cap.concurrency == 0:
            self.metrics.refused.labels(workload.name, "-", workload.priority, "schedule").inc()
            raise BedrockError(
                "ThrottlingException",
                f"Too many requests: workload '{workload.name}' is scheduled to run no requests "
                f"during {cap.window}; retry after {describe_next_change(cap, now)}",
                status=429,
                headers=retry_headers(int(cap.seconds_left * 1000)),
            )
        return cap.concurrency

    def _cacheable(self, call: Call, route: Route, caller: Caller) -> bool:
        rule = self.policy.policy.workloads[caller.workload.name].cache
        if rule is None or route.streaming or cache_operation(route.operation) is None:
            return False
        assert route.model_id is not None
        pool = self.policy.resolve_pool(route.model_id)
        call.cache_key = cache_key(caller.workload.name, pool.name, route.operation, call.body)
        return True

    async def _coalesced(
        self, request: web.Request, call: Call, route: Route, caller: Caller
    ) -> web.StreamResponse:
        """Identical cacheable calls in flight together share one admission and upstream call."""

        async def lead() -> CachedResponse:
            call.ticket = await self._admit(call, route, caller, call.body)
            response = await self._forward(request, call, route)
            assert isinstance(response, web.Response) and response.body is not None
            body = response.body if isinstance(response.body, bytes) else b""
            return CachedResponse(response.status, tuple(response.headers.items()), body, 0.0)

        assert call.cache_key is not None
        result, shared = await self.coalescer.run(call.cache_key, lead)
        call.status = result.status
        if shared:
            call.coalesced = True
            self.metrics.coalesced.labels(caller.workload.name).inc()
        headers = CIMultiDict(result.headers)
        if shared:
            headers["x-sluice-coalesced"] = "1"
        return web.Response(status=result.status, body=result.body, headers=headers)

    def _cache_put(self, call: Call, status: int, headers: Any, data: bytes) -> None:
        assert call.cache_key is not None and call.caller is not None
        value = cacheable(status, headers, data, now=time.time())
        rule = self.policy.policy.workloads[call.caller.workload.name].cache
        if value is None or rule is None:
            return
        key, request_id = call.cache_key, call.request_id

        async def put() -> None:
            try:
                await self.cache.put(key, value, rule.ttl_seconds)
            except CacheUnavailable as exc:
                log.warning(
                    "cache put failed",
                    extra={"fields": {"request_id": request_id, "error": str(exc)}},
                )

        task = asyncio.create_task(put())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Wait for background cache writes and flush the access log: nothing is lost."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.access_log.flush()

    def _annotate(self, headers: Any, call: Call) -> None:
        headers["x-sluice-request-id"] = call.request_id
        if call.degraded is not None:
            headers.update(call.degraded)
        if call.ticket is not None:
            headers.update(call.ticket.headers)
        if call.caller is not None:
            headers["x-sluice-workload"] = call.caller.workload.name
            headers["x-sluice-priority"] = call.caller.priority
        if call.pool is not None:
            headers["x-sluice-pool"] = call.pool.name
        if call.trimmed_messages:
            headers["x-sluice-trimmed"] = f"messages={call.trimmed_messages}"
        if call.retries:
            headers["x-sluice-upstream-retries"] = str(call.retries)

    def _account(self, call: Call, status: int, headers: Any, data: bytes) -> None:
        if status in (429, 503) and "retry-after" not in headers:
            # Bedrock sends no Retry-After; Sluice has already spent its own retries, so
            # tell the caller when trying again is worth it (boto3 and the Anthropic SDK
            # read these three).
            headers.update(retry_headers(UPSTREAM_RETRY_AFTER_MS))
        if status == 200:
            if not from_headers(headers, call.usage):
                from_body(data, call.usage)
        else:
            call.error_type = _error_type(headers)
            self.metrics.upstream_errors.labels(
                call.pool.name if call.pool else "-", call.error_type or str(status)
            ).inc()

    async def _relay_stream(
        self,
        request: web.Request,
        call: Call,
        upstream: aiohttp.ClientResponse,
        headers: Any,
        sent: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=headers)
        await response.prepare(request)
        call.status = 200
        watcher = StreamUsage()
        try:
            # iter_any hands over whatever arrived: no waiting to fill a buffer, so
            # the first event leaves as soon as it comes in.
            async for chunk in upstream.content.iter_any():
                watcher.feed(chunk)
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            self._client_left(call, upstream)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The stream is open, so an HTTP error is no longer possible: end it with an
            # exception event, which boto3 raises as EventStreamError, never as truncation.
            kind = (
                "modelTimeoutException"
                if isinstance(exc, TimeoutError)
                else ("internalServerException")
            )
            call.error_type = kind
            self.metrics.upstream_errors.labels(call.pool.name if call.pool else "-", kind).inc()
            upstream.close()
            with contextlib.suppress(ConnectionResetError):
                await response.write(exception_frame(kind, _stream_failure(exc)))
                await response.write_eof()
        except asyncio.CancelledError:
            self._client_left(call, upstream)
            raise
        finally:
            call.upstream_s = time.perf_counter() - sent
            if watcher.usage.known:
                watcher.usage.input_tokens = watcher.usage.input_tokens or call.usage.input_tokens
                call.usage = watcher.usage
            call.usage.stream_error = watcher.usage.stream_error
            call.error_type = watcher.usage.stream_error
        return response

    async def _read_upstream(self, upstream: aiohttp.ClientResponse) -> bytes:
        try:
            return await upstream.read()
        except TimeoutError:
            raise BedrockError(
                "ModelTimeoutException",
                f"the upstream {self.upstream.base_url} did not finish the answer within the "
                "upstream read timeout",
                status=408,
            ) from None
        except aiohttp.ClientError as exc:
            raise BedrockError(
                "ServiceUnavailableException",
                f"the upstream {self.upstream.base_url} failed mid-answer: {type(exc).__name__}",
                status=503,
            ) from None

    def _client_left(self, call: Call, upstream: aiohttp.ClientResponse) -> None:
        call.disconnected = True
        call.status = 499
        if call.pool is not None:
            self.metrics.stream_disconnects.labels(call.pool.name).inc()
        # Closing (not releasing) drops the upstream connection, which cancels the
        # model call instead of letting it run on for nobody.
        upstream.close()

    def _refuse(self, call: Call, exc: BedrockError) -> web.Response:
        call.status = exc.status
        call.error_type = exc.error_type
        reason = exc.error_type
        workload = call.caller.workload.name if call.caller else "-"
        self.metrics.rejections.labels(reason, workload).inc()
        response = from_exception(exc, call.request_id)
        response.headers["x-sluice-request-id"] = call.request_id
        if call.caller is not None and "x-sluice-workload" not in exc.headers:
            self._annotate(response.headers, call)
        return response

    def _settle(self, call: Call) -> Awaitable[None] | None:
        status = call.upstream_status
        if self.adaptivity is not None and status is not None and call.pool is not None:
            self.adaptivity.observe(
                call.pool.name,
                call.caller.priority if call.caller else "-",
                call.upstream_s * 1000,
                throttled=status == 429,
                server_error=status >= 500,
            )
        ticket = call.ticket
        if ticket is None or call.pool is None:
            return None
        self.metrics.in_flight_of(call.pool.name).dec()
        usage = call.usage
        if usage.known:
            actual = settled_tokens(
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_write_tokens,
                call.pool.output_weight,
            )
        elif call.upstream_status is not None and call.upstream_status != 200:
            actual = 0  # Bedrock charges nothing for a call it refused or failed
        else:
            actual = ticket.reserved_tokens  # unknown usage: keep the reservation
        return self.gate.settle(
            ticket,
            actual,
            throttled=call.upstream_status == 429,
            latency_ms=call.upstream_s * 1000,
        )

    def _record(self, call: Call) -> None:
        route = call.route
        pool = call.pool.name if call.pool else "-"
        workload = call.caller.workload.name if call.caller else "-"
        operation = route.operation if route else "-"
        metrics = self.metrics
        metrics.requests_of(operation, pool, workload, str(call.status)).inc()
        if call.usage.known:
            metrics.tokens_of(workload, pool, "input").inc(call.usage.input_tokens)
            metrics.tokens_of(workload, pool, "output").inc(call.usage.output_tokens)
        if call.upstream_status is not None and route is not None:
            metrics.latency_of(pool, operation).observe(call.upstream_s)
        if not self.access_log.enabled:
            return
        total = time.perf_counter() - call.started
        self.access_log.write(
            {
                "event": "request",
                "request_id": call.request_id,
                "operation": operation,
                "model": route.model_id if route else None,
                "pool": pool,
                "workload": workload,
                "priority": call.caller.priority if call.caller else None,
                "via": call.caller.via if call.caller else None,
                "status": call.status,
                "error_type": call.error_type,
                "input_tokens": call.usage.input_tokens,
                "output_tokens": call.usage.output_tokens,
                "usage_known": call.usage.known,
                "upstream_ms": round(call.upstream_s * 1000, 2),
                "overhead_ms": round(max(0.0, total - call.upstream_s) * 1000, 3),
                "disconnected": call.disconnected,
                "retries": call.retries,
                "trimmed_messages": call.trimmed_messages,
                "degraded": call.degraded.get("x-sluice-degraded") if call.degraded else None,
                "coalesced": call.coalesced,
            }
        )

"""The forward stage: the upstream call, retries inside the deadline, the streaming relay.

Returns the response to send (Bedrock's own bytes and status, annotated) or
:class:`~proxy.pipeline.call.Refused` when Sluice itself must answer, never an HTTP error."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader

from proxy.admission.estimate import parse_body
from proxy.admission.gate import retry_headers
from proxy.control.controller import Adaptivity
from proxy.errors import BedrockError
from proxy.eventstream import exception_frame
from proxy.lean import SmallQueue
from proxy.memory import BurstTrim
from proxy.metrics import Metrics
from proxy.pipeline.backoff import Backoff
from proxy.pipeline.cache import CacheUnavailable, ResponseCache, cacheable
from proxy.pipeline.call import THROTTLED, Call, Refused, Throttled
from proxy.pipeline.requeue import Requeue
from proxy.pipeline.respond import annotate, upstream_error_type
from proxy.pipeline.retry import retryable
from proxy.pipeline.settle import observe_attempt
from proxy.pipeline.tier_quota import TierQuotas, on_pool_quota
from proxy.pipeline.tiers import TIER_HEADER, apply_tier
from proxy.routes import Route
from proxy.upstream import KEEPALIVE_S, Upstream, returnable
from proxy.upstream_http import UpstreamReply
from proxy.usage import StreamUsage, from_body, from_headers

log = logging.getLogger("sluice.request")

#: Retry-After added to Bedrock's own throttles (it sends none).
UPSTREAM_RETRY_AFTER_MS = 1000


def _stream_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the upstream stopped sending within the upstream read timeout"
    return f"the upstream stream failed: {type(exc).__name__}"


class Forwarder:
    """Sends admitted calls upstream and relays the answers."""

    def __init__(
        self,
        upstream: Upstream,
        metrics: Metrics,
        cache: ResponseCache,
        adaptivity: Adaptivity | None,
        tiers: TierQuotas,
        requeue: Requeue | None = None,
    ) -> None:
        self.upstream = upstream
        self.requeue = requeue
        self.metrics = metrics
        self.cache = cache
        self.adaptivity = adaptivity
        self.tiers = tiers
        self.backoff = Backoff(metrics, adaptivity, tiers, requeue)
        self._background: set[asyncio.Task[None]] = set()
        # RSS back to idle once a burst of held streams ends: after the idle upstream
        # connections it leaves in the pool have timed out, else they keep their pages.
        self._streams = BurstTrim(delay_s=KEEPALIVE_S + 2.0, before=upstream.expire_idle)

    async def forward(
        self, request: web.Request, call: Call, route: Route
    ) -> web.StreamResponse | Refused | Throttled:
        """Send ``call`` upstream and return the answer to relay (or the refusal to send);
        :data:`THROTTLED` when a throttle that survived retries must go down the chain."""
        if not route.metered and request.method == "POST":
            try:
                parse_body(call.body)  # Bedrock-shaped errors for malformed JSON on every op
            except BedrockError as exc:
                return Refused(exc)
        sent = time.perf_counter()
        try:
            upstream = await self._send_with_retries(request, call, route)
        except BedrockError as exc:  # the upstream cannot be reached (Upstream.send)
            return Refused(exc)
        try:
            # The tier the answer ran on: Bedrock's echo, else what was sent (Bedrock does not
            # move a call to another tier on its own; it throttles instead).
            tier = call.tier
            call.served_tier = (
                None
                if tier is None
                else upstream.headers.get(TIER_HEADER) or tier.tier or "default"
            )
            call.upstream_status = upstream.status
            if upstream.status == 429 and self._degradable(call, upstream.status):
                pool = call.pool.name if call.pool else "-"
                self.metrics.upstream_errors.labels(pool, "ThrottlingException").inc()
                # Read (a failed read changes nothing: the chain serves) and released below.
                await self._read_upstream(upstream)
                return THROTTLED
            if route.streaming and upstream.status == 200:
                return await self._relay_stream(request, call, upstream, sent)
            headers = returnable(upstream.headers)
            annotate(headers, call)
            data = await self._read_upstream(upstream)
            if isinstance(data, Refused):
                return data
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
    ) -> UpstreamReply:
        """Send upstream; retry throttles and 503s while the caller's deadline and budget allow
        (only before any byte reaches the caller: never half a stream, then a second one)."""
        pool = call.pool.name if call.pool else "-"
        budget = self.backoff.budget(call)
        while True:
            body, choice = call.body, call.tier
            headers: Mapping[str, str] = request.headers
            if choice is not None and choice.tier is not None:  # else no apply_tier call
                body, headers = apply_tier(route.operation, body, headers, choice)
            attempt_sent = time.perf_counter()
            try:
                upstream = await self.upstream.send(
                    request.method,
                    call.path or route.path,
                    route.query,
                    headers,
                    body,
                    read_timeout_s=call.read_timeout_s,
                )
            except BedrockError as exc:  # no answer: Sluice's own 408 or 503
                if exc.status == 408:
                    self._timed_out(call, time.perf_counter() - attempt_sent)
                raise
            if upstream.status == 200:  # never retried (checked first: the usual answer)
                return upstream
            if upstream.status == 429 and call.pool is not None:
                # Bedrock pushes back on this pool: the grants held ahead on it go back
                # (before any retry asks for a slot), retried or not.
                self.tiers.gate.store.shed_ahead(call.pool.name)
            error_type = upstream_error_type(upstream.headers)
            if not retryable(upstream.status, error_type):
                return upstream
            if not await self.backoff.again(call, upstream, error_type, budget, attempt_sent):
                return upstream
            call.retries += 1
            self.metrics.upstream_retries.labels(pool, error_type or str(upstream.status)).inc()

    def _timed_out(self, call: Call, seconds: float) -> None:
        """An attempt Bedrock did not answer within the read timeout (Sluice's own 408) is
        still a sample of its latency: a Bedrock that hangs raises the controller's p99,
        instead of leaving only its fast calls to be counted (the limit grew into the
        brownout). Not a served call (Little's law counts those), and as a half-open probe a
        failed one. An upstream that cannot be reached (503) is no sample: it may be this
        instance's own network, which must not open the fleet's breaker."""
        on_pool = on_pool_quota(call)
        observe_attempt(self.backoff.adaptivity, call, 408, on_pool, seconds, unanswered=True)
        call.observed = call.retries  # (settle must not count it again)

    def _degradable(self, call: Call, status: int) -> bool:
        """Does a throttle that survived retries send this call down its workload's chain?"""
        caller = call.caller
        if status != 429 or caller is None or call.pool is None or call.degraded:
            return False
        return bool(call.policy.policy.workloads[caller.workload.name].degrade)

    def _cache_put(self, call: Call, status: int, headers: Any, data: bytes) -> None:
        assert call.cache_key is not None and call.caller is not None
        value = cacheable(status, headers, data, now=time.time())
        rule = call.policy.policy.workloads[call.caller.workload.name].cache
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
        """Wait for background cache writes: nothing is lost."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

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
            call.error_type = upstream_error_type(headers)
            self.metrics.upstream_errors.labels(
                call.pool.name if call.pool else "-", call.error_type or str(status)
            ).inc()

    async def _relay_stream(
        self,
        request: web.Request,
        call: Call,
        upstream: UpstreamReply,
        sent: float,
    ) -> web.StreamResponse:
        # The headers go straight into the response's own: a held stream keeps one copy.
        response = web.StreamResponse(status=200)
        annotate(returnable(upstream.headers, into=response.headers), call)
        await response.prepare(request)
        call.status = 200
        _release_request(request, call, upstream)
        watcher = StreamUsage()
        self._streams.opened()
        try:
            # take() hands over whatever arrived: no waiting to fill a buffer, so the first
            # event leaves as soon as it comes in. (Read here, not through an async
            # generator: no generator and coroutine per held stream.)
            while (chunk := upstream.take()) is not None:
                if chunk:
                    watcher.feed(chunk)
                    await response.write(chunk)
                    continue
                try:
                    await upstream.wait()
                except BaseException as exc:  # a read timeout, or the caller left
                    upstream.abandon(exc)
                    raise
            await response.write_eof()
        except ConnectionResetError:
            self._client_left(call, upstream)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._end_stream(call, upstream, response, exc)
        except asyncio.CancelledError:
            self._client_left(call, upstream)
            raise
        finally:
            self._streams.closed()
            call.upstream_s = time.perf_counter() - sent
            if watcher.usage.known:
                watcher.usage.input_tokens = watcher.usage.input_tokens or call.usage.input_tokens
                call.usage = watcher.usage
            call.usage.stream_error = watcher.usage.stream_error
            call.error_type = watcher.usage.stream_error
        return response

    async def _end_stream(
        self,
        call: Call,
        upstream: UpstreamReply,
        response: web.StreamResponse,
        exc: BaseException,
    ) -> None:
        # The stream is open, so an HTTP error is no longer possible: end it with an
        # exception event, which boto3 raises as EventStreamError, never as truncation.
        kind = (
            "modelTimeoutException" if isinstance(exc, TimeoutError) else "internalServerException"
        )
        call.error_type = kind
        self.metrics.upstream_errors.labels(call.pool.name if call.pool else "-", kind).inc()
        upstream.close()
        with contextlib.suppress(ConnectionResetError):
            await response.write(exception_frame(kind, _stream_failure(exc)))
            await response.write_eof()

    async def _read_upstream(self, upstream: UpstreamReply) -> bytes | Refused:
        try:
            return await upstream.read()
        except TimeoutError:
            return Refused(
                BedrockError(
                    "ModelTimeoutException",
                    f"the upstream {self.upstream.base_url} did not finish the answer within "
                    "the upstream read timeout",
                    status=408,
                )
            )
        except aiohttp.ClientError as exc:
            return Refused(
                BedrockError(
                    "ServiceUnavailableException",
                    f"the upstream {self.upstream.base_url} failed mid-answer: "
                    f"{type(exc).__name__}",
                    status=503,
                )
            )

    def _client_left(self, call: Call, upstream: UpstreamReply) -> None:
        call.disconnected = True
        call.status = 499
        if call.pool is not None:
            self.metrics.stream_disconnects.labels(call.pool.name).inc()
        # Closing (not releasing) drops the upstream connection, which cancels the
        # model call instead of letting it run on for nobody.
        upstream.close()


def _release_request(request: web.Request, call: Call, upstream: UpstreamReply) -> None:
    """Let go of what a held stream would keep for its whole life but never reads again once
    its answer streams (no retry or fallback follows the first byte; usage comes from the
    events): the body, ``call.body`` and the copy aiohttp caches for ``request.read()`` (often
    tens of KB of conversation), and the upstream's headers, in the caller's response already.
    """
    call.body = b""
    request._read_bytes = None
    payload = request.content
    # Read to its end (fed its EOF, nothing left unread), it is never fed or read again:
    # its empty deque (760 bytes) goes. (Not the shared EMPTY_PAYLOAD of a bodiless call;
    # nothing where aiohttp's reader is not what this was written against.)
    if (
        type(payload) is StreamReader
        and payload.at_eof()
        and isinstance(getattr(payload, "_buffer", None), collections.deque)
    ):
        payload._buffer = SmallQueue()  # type: ignore[assignment]
    upstream.forget_headers()

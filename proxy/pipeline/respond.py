"""The one place stage outcomes become HTTP: status, headers and Bedrock-shaped bodies.

Upstream answers pass through as Bedrock sent them (plus Sluice's ``x-sluice-*``
headers); everything Sluice answers itself (a refusal, a degraded fallback, a result
shared by a coalesced group, an internal failure) is built here.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import BedrockError, from_exception
from proxy.metrics import Metrics
from proxy.pipeline.cache import CachedResponse
from proxy.pipeline.call import Call
from proxy.pipeline.degrade import Fallback
from proxy.pipeline.tiers import SERVED_HEADER


def upstream_error_type(headers: Mapping[str, str]) -> str | None:
    """Bedrock's error type of an upstream answer (``x-amzn-ErrorType`` up to the ``:``)."""
    value = headers.get("x-amzn-ErrorType")
    return value.partition(":")[0] if value else None


def annotate(headers: MutableMapping[str, str], call: Call) -> None:
    """Add the ``x-sluice-*`` headers that tell the caller how Sluice handled ``call``."""
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
    if call.served_tier is not None:
        headers[SERVED_HEADER] = call.served_tier


def internal_error(call: Call) -> BedrockError:
    """The 500 for a failure Sluice did not expect (logged by the caller with the id)."""
    return BedrockError(
        "InternalServerException",
        f"Sluice failed unexpectedly; request id {call.request_id}",
        status=500,
    )


class Responder:
    """Builds the responses Sluice answers itself, and counts its refusals."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def refused(self, call: Call, exc: BedrockError) -> web.Response:
        """A Bedrock-shaped error naming what refused, counted in ``sluice_rejections``."""
        call.status = exc.status
        call.error_type = exc.error_type
        workload = call.caller.workload.name if call.caller else "-"
        self.metrics.rejections.labels(exc.error_type, workload).inc()
        response = from_exception(exc, call.request_id)
        response.headers["x-sluice-request-id"] = call.request_id
        if call.caller is not None and "x-sluice-workload" not in exc.headers:
            annotate(response.headers, call)
        return response

    @staticmethod
    def fallback(call: Call, fallback: Fallback) -> web.Response:
        """An answer made without the upstream (cached or template), saying so in headers."""
        call.status = 200
        headers = CIMultiDict(fallback.headers)
        annotate(headers, call)
        return web.Response(status=200, body=fallback.body, headers=headers)

    @staticmethod
    def shared(call: Call, result: CachedResponse, shared: bool) -> web.Response:
        """A coalesced group's answer; a follower's says so (``x-sluice-coalesced``)."""
        call.status = result.status
        headers = CIMultiDict(result.headers)
        if shared:
            headers["x-sluice-coalesced"] = "1"
        return web.Response(status=result.status, body=result.body, headers=headers)

    @staticmethod
    def to_shared(response: web.StreamResponse) -> CachedResponse:
        """A buffered response as a coalesced group shares it."""
        assert isinstance(response, web.Response) and response.body is not None
        body = response.body if isinstance(response.body, bytes) else b""
        return CachedResponse(response.status, tuple(response.headers.items()), body, 0.0)

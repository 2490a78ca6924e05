"""One upstream call for a batch record, every failure turned into a classified outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from proxy.errors import BedrockError
from proxy.jobs.records import Invocation, upstream_path
from proxy.upstream import Upstream
from proxy.usage import Usage, from_body, from_headers

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


@dataclass(slots=True)
class Outcome:
    """What the upstream answered: status, Bedrock's error type and message, or the body."""

    status: int
    body: bytes = b""
    error_type: str | None = None
    message: str = ""
    latency_ms: float = 0.0
    usage: Usage = field(default_factory=Usage)

    @property
    def code(self) -> str:
        """The error code for the output line and the dead letter (type, else the status)."""
        return self.error_type or f"HTTP{self.status}"


def _message(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("Message") or "")[:500]
    return ""


async def call_model(
    upstream: Upstream, model: str, invocation: Invocation, model_input: bytes
) -> Outcome:
    """Send ``model_input`` to the model; network failures become 503/408 outcomes."""
    started = time.perf_counter()
    try:
        response = await upstream.send(
            "POST", upstream_path(model, invocation), "", _HEADERS, model_input
        )
    except BedrockError as exc:
        return Outcome(exc.status, b"", exc.error_type, exc.message, _ms(started))
    try:
        body = await response.read()
    except TimeoutError:
        return Outcome(408, b"", "ModelTimeoutException", "upstream read timed out", _ms(started))
    except aiohttp.ClientError as exc:
        return Outcome(503, b"", "ServiceUnavailableException", type(exc).__name__, _ms(started))
    finally:
        response.release()
    out = Outcome(response.status, body, latency_ms=_ms(started))
    if response.status == 200:
        if not from_headers(response.headers, out.usage):
            from_body(body, out.usage)
        return out
    kind = response.headers.get("x-amzn-ErrorType")
    out.error_type = kind.partition(":")[0] if kind else None
    out.message = _message(body)
    out.body = b""
    return out


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000

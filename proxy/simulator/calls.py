"""Serving one model call: faults, admission, simulated latency, reply or paced stream.

The order mirrors Bedrock: a call is refused (throttle, unavailable) before anything is
reserved; once admitted it holds a concurrency slot and a tokens/min reservation until it
ends, however it ends (reply, timeout, cut stream, client gone), and then settles what it used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from proxy.errors import BedrockError
from proxy.eventstream import exception_frame
from proxy.simulator.config import TierConfig
from proxy.simulator.models import TOO_MANY_REQUESTS, TOO_MANY_TOKENS, ModelRuntime
from proxy.simulator.parsing import Call
from proxy.simulator.responses import (
    ConverseStream,
    InvokeStream,
    Reply,
    StreamRenderer,
    converse_body,
    invoke_body,
    new_message_id,
    new_request_id,
)
from proxy.simulator.state import SimState
from proxy.simulator.text import reply_tokens
from proxy.simulator.tiers import tier_refusal

__all__ = ["Operation", "serve_call"]

Operation = Literal["invoke", "invoke_stream", "converse", "converse_stream"]

_EVENT_STREAM = "application/vnd.amazon.eventstream"
_STREAM_ERROR = (
    "The system encountered an unexpected error during processing. Try your request again."
)
# Failures answered before admission, as (error type, message).
_REFUSALS: Mapping[str, tuple[str, str]] = {
    "throttle": ("ThrottlingException", TOO_MANY_REQUESTS),
    "unavailable": ("ServiceUnavailableException", "Bedrock is unable to process your request."),
    "internal": (
        "InternalServerException",
        "The server encountered an internal error while processing the request.",
    ),
}
_TIMEOUT = "Model has timed out in processing the request. Try your request again."
# Mid-stream exception frames, by failure name: (:exception-type, message).
_CUTS: Mapping[str, tuple[str, str]] = {
    "stream_error": ("modelStreamErrorException", _STREAM_ERROR),
    "stream_throttle": ("throttlingException", TOO_MANY_TOKENS),
}
# Echoed request headers (InvokeModel and its streaming form).
_ECHO_HEADERS = ("X-Amzn-Bedrock-PerformanceConfig-Latency", "X-Amzn-Bedrock-Service-Tier")


@dataclass(slots=True)
class _Progress:
    """What an admitted call has delivered so far, for settling however it ends."""

    output_tokens: int = 0
    client_gone: bool = False


class _StreamCut(Exception):
    """The injected exception frame has been sent; the stream ends here."""


def _pick_fault(state: SimState, runtime: ModelRuntime, call: Call, streaming: bool) -> str | None:
    if call.directives.fail is not None:
        return call.directives.fail
    faults = runtime.config.faults
    rng = state.rng
    # Draw only for configured rates, so a fault-free simulator never touches the RNG.
    if faults.throttle_rate and rng.random() < faults.throttle_rate:
        return "throttle"
    if faults.unavailable_rate and rng.random() < faults.unavailable_rate:
        return "unavailable"
    if faults.timeout_rate and rng.random() < faults.timeout_rate:
        return "timeout"
    cut = streaming and faults.stream_error_after is not None
    if cut and rng.random() < faults.stream_error_rate:
        throttle = faults.stream_error_type == "throttlingException"
        return "stream_throttle" if throttle else "stream_error"
    return None


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


async def serve_call(
    request: web.Request,
    state: SimState,
    runtime: ModelRuntime,
    call: Call,
    operation: Operation,
    echo: Mapping[str, Any],
    tier: TierConfig,
) -> web.StreamResponse:
    """Answer an admitted-or-refused model call on a service tier.

    ``echo`` holds Converse fields to echo back.
    """
    streaming = operation in ("invoke_stream", "converse_stream")
    fault = _pick_fault(state, runtime, call, streaming)
    refusal = _REFUSALS.get(fault or "")
    if refusal is not None:
        raise BedrockError(*refusal)
    loop = asyncio.get_running_loop()
    start = loop.time()
    admission = tier_refusal(
        runtime, tier, call.input_tokens, call.max_tokens, start
    ) or runtime.admit(call.input_tokens, call.max_tokens, start)
    if isinstance(admission, str):
        raise BedrockError("ThrottlingException", admission)
    progress = _Progress()
    try:
        pace = tier.latency_factor
        if fault == "timeout":
            await _sleep(runtime.first_token_delay(call.input_tokens) * pace)
            raise BedrockError("ModelTimeoutException", _TIMEOUT)
        tokens = reply_tokens(call.prompt, call.output_tokens)
        reply = Reply(
            new_message_id(),
            runtime.config.name,
            tokens,
            call.input_tokens,
            call.stop_reason,
            call.tool,
        )
        if streaming:
            cut = _cut_plan(runtime, call, fault)
            return await _stream(
                request, state, runtime, reply, operation, echo, cut, progress, pace
            )
        await _sleep(
            (runtime.first_token_delay(call.input_tokens) + runtime.output_delay(len(tokens)))
            * pace
        )
        progress.output_tokens = reply.output_tokens
        latency_ms = round((loop.time() - start) * 1000)
        return _complete(request, reply, operation, echo, latency_ms)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client disconnects (handler_cancellation).
        progress.client_gone = True
        raise
    finally:
        if progress.client_gone:
            runtime.stats.cancelled += 1
        runtime.settle(admission, call.input_tokens, progress.output_tokens, loop.time())


def _cut_plan(runtime: ModelRuntime, call: Call, fault: str | None) -> tuple[int, bytes] | None:
    cut = _CUTS.get(fault or "")
    if cut is None:
        return None
    after = call.directives.stream_error_after
    if after is None:
        after = runtime.config.faults.stream_error_after
    exception_type, message = cut
    return (2 if after is None else after), exception_frame(exception_type, message)


def _complete(
    request: web.Request,
    reply: Reply,
    operation: Operation,
    echo: Mapping[str, Any],
    latency_ms: int,
) -> web.Response:
    headers = {"Content-Type": "application/json", "x-amzn-RequestId": new_request_id()}
    if operation == "converse":
        return web.Response(body=converse_body(reply, latency_ms, echo), headers=headers)
    headers["x-amzn-bedrock-invocation-latency"] = str(latency_ms)
    headers["x-amzn-bedrock-input-token-count"] = str(reply.input_tokens)
    headers["x-amzn-bedrock-output-token-count"] = str(reply.output_tokens)
    _echo_headers(request, headers)
    return web.Response(body=invoke_body(reply), headers=headers)


def _echo_headers(request: web.Request, headers: dict[str, str]) -> None:
    for name in _ECHO_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            headers[name] = value


class _FrameSender:
    """Writes frames, counting events, and cuts the stream after ``cut[0]`` events if asked."""

    __slots__ = ("_cut", "_response", "sent")

    def __init__(self, response: web.StreamResponse, cut: tuple[int, bytes] | None) -> None:
        self._response = response
        self._cut = cut
        self.sent = 0  # event frames written so far

    async def send(self, frames: list[bytes]) -> None:
        cut = self._cut
        if cut is not None and self.sent + len(frames) >= cut[0]:
            keep = frames[: max(0, cut[0] - self.sent)]
            await self._response.write(b"".join(keep) + cut[1])
            self.sent += len(keep)
            raise _StreamCut
        await self._response.write(frames[0] if len(frames) == 1 else b"".join(frames))
        self.sent += len(frames)


async def _stream(
    request: web.Request,
    state: SimState,
    runtime: ModelRuntime,
    reply: Reply,
    operation: Operation,
    echo: Mapping[str, Any],
    cut: tuple[int, bytes] | None,
    progress: _Progress,
    pace: float,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    start = loop.time()
    # Headers go out with the first event, as Bedrock's do: until then a refusal (timeout,
    # cancellation) can still be an HTTP error rather than an exception inside the stream.
    await _sleep(runtime.first_token_delay(reply.input_tokens) * pace)
    headers = {"Content-Type": _EVENT_STREAM, "x-amzn-RequestId": new_request_id()}
    renderer: StreamRenderer
    if operation == "invoke_stream":
        headers["X-Amzn-Bedrock-Content-Type"] = "application/json"
        _echo_headers(request, headers)
        renderer = InvokeStream(reply)
    else:
        renderer = ConverseStream(reply, echo)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    first_byte_ms = round((loop.time() - start) * 1000)
    sender = _FrameSender(response, cut)
    try:
        await _send_body(state, runtime, reply, renderer, sender, progress, pace)
        latency_ms = round((loop.time() - start) * 1000)
        await sender.send(renderer.tail(progress.output_tokens, latency_ms, first_byte_ms))
        await response.write_eof()
    except _StreamCut:
        runtime.stats.errors += 1
        await response.write_eof()
    except ConnectionResetError:
        progress.client_gone = True
    return response


async def _send_body(
    state: SimState,
    runtime: ModelRuntime,
    reply: Reply,
    renderer: StreamRenderer,
    sender: _FrameSender,
    progress: _Progress,
    pace: float,
) -> None:
    tokens = reply.tokens
    step = state.config.tokens_per_delta
    pause = runtime.output_delay(step) * pace
    chunks = ["".join(tokens[i : i + step]) for i in range(0, len(tokens), step)]
    head = renderer.head()
    try:
        if pause <= 0:
            # Zero-latency mode: one write for the whole body (benchmark baseline).
            await sender.send([*head, *map(renderer.delta, chunks)])
            return
        await sender.send(head)
        for i, text in enumerate(chunks):
            if i:
                await asyncio.sleep(pause)
            await sender.send([renderer.delta(text)])
    finally:
        # However the body ended (done, cut, client gone), settle what was actually sent.
        deltas_sent = max(0, sender.sent - len(head))
        progress.output_tokens = min(len(tokens), deltas_sent * step)

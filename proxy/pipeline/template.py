"""Static answers and replayed answers in the shape the caller's operation expects.

Two jobs share one set of renderers:

* :func:`render_template` — a workload's fixed answer (``Workload.template.text``) as
  InvokeModel (Anthropic Messages), Converse, or either streaming operation. The body
  names no real model (``"model": "sluice-template"``) and reports zero usage; the lead
  adds ``x-sluice-degraded: template`` so a client can tell it apart.
* :func:`as_stream` — a cached *non-streamed* answer (InvokeModel / Converse body)
  re-emitted as the event stream InvokeModelWithResponseStream / ConverseStream would
  have sent, so a streaming caller can be served from the cache too.

Streams go out in one delta per content block: nothing is being generated, so splitting
text into token-sized pieces would only cost frames. Every frame carries valid CRCs
(``proxy.eventstream``) and boto3 parses the result (``tests/test_template.py``).
"""

from __future__ import annotations

import functools
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import orjson

from proxy.eventstream import event_frame
from proxy.routes import base_model_id

__all__ = [
    "EVENT_STREAM",
    "TEMPLATE_MODEL",
    "TemplateUnsupported",
    "as_stream",
    "render_template",
]

#: Content type of every event-stream response.
EVENT_STREAM: Final = "application/vnd.amazon.eventstream"
#: What a template body gives as its model: never a real model id.
TEMPLATE_MODEL: Final = "sluice-template"
_TEMPLATE_MESSAGE_ID: Final = "msg_sluice_template"
_JSON: Final = "application/json"
_ZERO_METRICS: Final = {
    "inputTokenCount": 0,
    "outputTokenCount": 0,
    "invocationLatency": 0,
    "firstByteLatency": 0,
}


class TemplateUnsupported(ValueError):
    """The answer cannot be given in the shape this operation / model needs."""


def render_template(operation: str, text: str, model_id: str) -> tuple[bytes, dict[str, str]]:
    """``text`` as the complete response body of ``operation``, and its response headers.

    ``model_id`` (the model the caller asked for) only decides whether the native
    operations can be answered: their body is the model's own format, and Sluice renders
    Anthropic Messages only. Raises :class:`TemplateUnsupported` for a non-Anthropic model
    on InvokeModel* and for operations that are not model invocations. Output depends only
    on the arguments, so it is computed once per (operation, text, model) and reused.
    """
    body, headers = _render(operation, text, _native_ok(model_id))
    return body, dict(headers)  # a fresh dict: callers add their own headers to it


def as_stream(operation: str, cached_body: bytes) -> bytes:
    """The event-stream body of ``operation`` carrying the answer in ``cached_body``.

    ``operation`` is the streaming operation requested: ``ConverseStream`` takes a Converse
    response body, ``InvokeModelWithResponseStream`` an Anthropic Messages one. Usage and
    stop reason are the cached answer's own (a replay reports what the answer cost when it
    was made); latencies are zero. Raises :class:`TemplateUnsupported` when the body is not
    of that shape or holds a content block with no streamed form (images, documents).
    """
    converter = _STREAMERS.get(operation)
    if converter is None:
        raise TemplateUnsupported(f"{operation} is not a streaming model operation")
    try:
        doc = orjson.loads(cached_body)
    except orjson.JSONDecodeError as exc:
        raise TemplateUnsupported(f"cached body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TemplateUnsupported("cached body is not a JSON object")
    try:
        return b"".join(converter(doc))
    except TemplateUnsupported:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        # A field of the wrong type or missing: the body is not the shape claimed.
        raise TemplateUnsupported(
            f"cached body is not {_SOURCE[operation]}: {type(exc).__name__} {exc}"
        ) from None


# --- templates -------------------------------------------------------------------------


def _native_ok(model_id: str) -> bool:
    # Opaque ids (application inference profiles, provisioned models) have no vendor
    # prefix; Sluice's pools are Claude, so those are taken to be Anthropic.
    vendor, dot, _ = base_model_id(model_id).partition(".")
    return not dot or vendor == "anthropic"


@functools.lru_cache(maxsize=256)
def _render(
    operation: str, text: str, native_ok: bool
) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    if operation in ("Converse", "ConverseStream"):
        converse = _template_converse(text)
        if operation == "Converse":
            return orjson.dumps(converse), (("Content-Type", _JSON),)
        return b"".join(_converse_stream(converse)), (("Content-Type", EVENT_STREAM),)
    if operation not in ("InvokeModel", "InvokeModelWithResponseStream"):
        raise TemplateUnsupported(f"{operation} is not a model invocation; no template applies")
    if not native_ok:
        raise TemplateUnsupported(
            f"{operation} answers in the model's native format; Sluice renders templates "
            "for Anthropic models only (use Converse)"
        )
    message = _template_message(text)
    if operation == "InvokeModel":
        return orjson.dumps(message), (
            ("Content-Type", _JSON),
            ("x-amzn-bedrock-invocation-latency", "0"),
            ("x-amzn-bedrock-input-token-count", "0"),
            ("x-amzn-bedrock-output-token-count", "0"),
        )
    return b"".join(_anthropic_stream(message)), (
        ("Content-Type", EVENT_STREAM),
        ("X-Amzn-Bedrock-Content-Type", _JSON),
    )


def _template_message(text: str) -> dict[str, Any]:
    return {
        "id": _TEMPLATE_MESSAGE_ID,
        "type": "message",
        "role": "assistant",
        "model": TEMPLATE_MODEL,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }


def _template_converse(text: str) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0},
        "metrics": {"latencyMs": 0},
    }


# --- InvokeModelWithResponseStream (Anthropic native events in chunk frames) ------------


def _chunk(event: Mapping[str, Any]) -> bytes:
    # PayloadPart.bytes is a blob: base64 of the native event inside the JSON payload.
    return event_frame("chunk", b'{"bytes":"' + b64encode(orjson.dumps(event)) + b'"}')


def _anthropic_stream(message: Mapping[str, Any]) -> Iterator[bytes]:
    if message.get("type") != "message" or not isinstance(message.get("content"), list):
        raise TypeError("no Anthropic 'message' with a 'content' list")
    usage = message.get("usage") or {}
    input_tokens = int(usage.get("input_tokens", 0))
    output_tokens = int(usage.get("output_tokens", 0))
    start = {
        "id": message.get("id", _TEMPLATE_MESSAGE_ID),
        "type": "message",
        "role": "assistant",
        "model": message.get("model", TEMPLATE_MODEL),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # Output is counted in message_delta (cumulative), as Anthropic streams do.
        "usage": {**usage, "output_tokens": 0},
    }
    yield _chunk({"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        yield from _anthropic_block(index, block)
    delta = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    yield _chunk(
        {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}}
    )
    metrics = {**_ZERO_METRICS, "inputTokenCount": input_tokens, "outputTokenCount": output_tokens}
    yield _chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics})


def _anthropic_block(index: int, block: Mapping[str, Any]) -> Iterator[bytes]:
    kind = block["type"]
    if kind == "text":
        opening: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": block["text"]}]
    elif kind == "tool_use":
        opening = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        partial = orjson.dumps(block.get("input", {})).decode()
        deltas = [{"type": "input_json_delta", "partial_json": partial}]
    elif kind == "thinking":
        opening = {"type": "thinking", "thinking": ""}
        deltas = [{"type": "thinking_delta", "thinking": block["thinking"]}]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "redacted_thinking":
        opening, deltas = dict(block), []  # sent whole in its start event, as Anthropic does
    else:
        raise TemplateUnsupported(f"content block {index} of type {kind!r} has no streamed form")
    yield _chunk({"type": "content_block_start", "index": index, "content_block": opening})
    for delta in deltas:
        yield _chunk({"type": "content_block_delta", "index": index, "delta": delta})
    yield _chunk({"type": "content_block_stop", "index": index})


# --- ConverseStream ----------------------------------------------------------------------


def _event(event_type: str, payload: Mapping[str, Any]) -> bytes:
    return event_frame(event_type, orjson.dumps(payload))


def _converse_stream(doc: Mapping[str, Any]) -> Iterator[bytes]:
    message = doc["output"]["message"]
    yield _event("messageStart", {"role": message.get("role", "assistant")})
    for index, block in enumerate(message["content"]):
        yield from _converse_block(index, block)
    stop: dict[str, Any] = {"stopReason": doc["stopReason"]}
    if "additionalModelResponseFields" in doc:
        stop["additionalModelResponseFields"] = doc["additionalModelResponseFields"]
    yield _event("messageStop", stop)
    metadata: dict[str, Any] = {
        "usage": doc.get("usage") or {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0},
        "metrics": {"latencyMs": 0},
    }
    for name in ("trace", "performanceConfig", "serviceTier"):
        if name in doc:
            metadata[name] = doc[name]
    yield _event("metadata", metadata)


def _converse_block(index: int, block: Mapping[str, Any]) -> Iterator[bytes]:
    deltas: list[dict[str, Any]]
    if "text" in block:
        deltas = [{"text": block["text"]}]
    elif "toolUse" in block:
        tool = block["toolUse"]
        start = {"toolUse": {"toolUseId": tool["toolUseId"], "name": tool["name"]}}
        yield _event("contentBlockStart", {"start": start, "contentBlockIndex": index})
        deltas = [{"toolUse": {"input": orjson.dumps(tool.get("input", {})).decode()}}]
    elif "reasoningContent" in block:
        deltas = _reasoning_deltas(block["reasoningContent"])
    else:
        kinds = ", ".join(sorted(block)) or "empty"
        raise TemplateUnsupported(f"content block {index} ({kinds}) has no streamed form")
    for delta in deltas:
        yield _event("contentBlockDelta", {"delta": delta, "contentBlockIndex": index})
    yield _event("contentBlockStop", {"contentBlockIndex": index})


def _reasoning_deltas(reasoning: Mapping[str, Any]) -> list[dict[str, Any]]:
    if "redactedContent" in reasoning:
        # A blob: already base64 in the JSON body, and base64 in the stream's JSON too.
        return [{"reasoningContent": {"redactedContent": reasoning["redactedContent"]}}]
    text_block = reasoning["reasoningText"]
    deltas: list[dict[str, Any]] = [{"reasoningContent": {"text": text_block["text"]}}]
    if text_block.get("signature"):
        deltas.append({"reasoningContent": {"signature": text_block["signature"]}})
    return deltas


_STREAMERS: Final[Mapping[str, Callable[[Mapping[str, Any]], Iterator[bytes]]]] = {
    "ConverseStream": _converse_stream,
    "InvokeModelWithResponseStream": _anthropic_stream,
}
_SOURCE: Final[Mapping[str, str]] = {
    "ConverseStream": "a Converse response",
    "InvokeModelWithResponseStream": "an Anthropic Messages (InvokeModel) response",
}

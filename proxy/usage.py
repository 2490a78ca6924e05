"""Token usage of a finished call, read from whatever Bedrock sent back.

Token quotas settle against these numbers, so each source Bedrock offers is read:
the usage headers of InvokeModel, the ``usage`` member of a JSON body, and in
streams the model's own usage events or the final invocation-metrics / metadata
event. Streams are scanned frame by frame as they pass, without holding them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.eventstream import EventStreamDecoder, EventStreamError, Message


@dataclass(slots=True)
class Usage:
    """Tokens one call used; ``known`` is False when the answer carried no usage."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    known: bool = False
    #: The exception type of an error event inside a stream, if one arrived.
    stream_error: str | None = None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def from_headers(headers: Mapping[str, str], usage: Usage) -> bool:
    """Fill ``usage`` from InvokeModel's token-count headers; True if they were there."""
    raw_in = headers.get("x-amzn-bedrock-input-token-count")
    raw_out = headers.get("x-amzn-bedrock-output-token-count")
    if raw_in is None or raw_out is None or not raw_in.isdigit() or not raw_out.isdigit():
        return False
    usage.input_tokens = int(raw_in)
    usage.output_tokens = int(raw_out)
    cache_read = headers.get("x-amzn-bedrock-cache-read-input-token-count", "")
    cache_write = headers.get("x-amzn-bedrock-cache-write-input-token-count", "")
    usage.cache_read_tokens = int(cache_read) if cache_read.isdigit() else 0
    usage.cache_write_tokens = int(cache_write) if cache_write.isdigit() else 0
    usage.known = True
    return True


def _from_usage_member(u: Mapping[str, Any], usage: Usage) -> None:
    # Converse names (camelCase) and Anthropic Messages names (snake_case).
    if "inputTokens" in u or "outputTokens" in u:
        usage.input_tokens = _int(u.get("inputTokens"))
        usage.output_tokens = _int(u.get("outputTokens"))
        usage.cache_read_tokens = _int(u.get("cacheReadInputTokens"))
        usage.cache_write_tokens = _int(u.get("cacheWriteInputTokens"))
        usage.known = True
    elif "input_tokens" in u or "output_tokens" in u:
        usage.input_tokens = _int(u.get("input_tokens")) or usage.input_tokens
        usage.output_tokens = _int(u.get("output_tokens")) or usage.output_tokens
        usage.cache_read_tokens = _int(u.get("cache_read_input_tokens")) or usage.cache_read_tokens
        usage.cache_write_tokens = (
            _int(u.get("cache_creation_input_tokens")) or usage.cache_write_tokens
        )
        usage.known = True


def from_body(body: bytes, usage: Usage) -> None:
    """Fill ``usage`` from a JSON response body (Converse or a model-native body)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(doc, dict):
        u = doc.get("usage")
        if isinstance(u, dict):
            _from_usage_member(u, usage)


def _from_invocation_metrics(m: Mapping[str, Any], usage: Usage) -> None:
    usage.input_tokens = _int(m.get("inputTokenCount"))
    usage.output_tokens = _int(m.get("outputTokenCount"))
    usage.cache_read_tokens = _int(m.get("cacheReadInputTokenCount"))
    usage.cache_write_tokens = _int(m.get("cacheWriteInputTokenCount"))
    usage.known = True


class StreamUsage:
    """Watches an event stream pass by and keeps the latest usage it announced."""

    __slots__ = ("_decoder", "broken", "usage")

    def __init__(self) -> None:
        self._decoder = EventStreamDecoder()
        self.usage = Usage()
        #: Set when the stream could not be decoded; bytes still pass, usage stays estimated.
        self.broken = False

    def feed(self, data: bytes) -> None:
        """Scan a chunk of the stream; never raises (the relay must not fail on a parse)."""
        if self.broken:
            return
        try:
            for message in self._decoder.feed(data):
                self._on_message(message)
        except EventStreamError:
            self.broken = True

    def _on_message(self, message: Message) -> None:
        headers = message.headers
        kind = headers.get(":message-type")
        if kind == "exception":
            exc_type = headers.get(":exception-type")
            self.usage.stream_error = exc_type if isinstance(exc_type, str) else "exception"
            return
        event = headers.get(":event-type")
        if event == "chunk":
            self._on_chunk(message.payload)
        elif event == "metadata":
            doc = _loads(message.payload)
            u = doc.get("usage") if doc else None
            if isinstance(u, dict):
                _from_usage_member(u, self.usage)

    def _on_chunk(self, payload: bytes) -> None:
        # Most chunks are text deltas; only decode the few that can carry usage.
        doc = _loads(payload)
        raw = doc.get("bytes") if doc else None
        if not isinstance(raw, str):
            return
        try:
            inner = base64.b64decode(raw, validate=False)
        except (binascii.Error, ValueError):
            return
        if b"usage" not in inner and b"invocationMetrics" not in inner:
            return
        event = _loads(inner)
        if event is None:
            return
        metrics = event.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, dict):
            _from_invocation_metrics(metrics, self.usage)
            return
        message = event.get("message")
        u = message.get("usage") if isinstance(message, dict) else event.get("usage")
        if isinstance(u, dict):
            _from_usage_member(u, self.usage)


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None

"""Response bodies and event-stream frames in Bedrock's shapes (bedrock-wire.md §3-§4).

Renderers are pure: they turn a finished (or partial) reply into bytes. Pacing, faults and
I/O live in :mod:`proxy.simulator.calls`.
"""

from __future__ import annotations

import os
from base64 import b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from proxy.eventstream import event_frame
from proxy.simulator.tools import ToolUse, anthropic_tool_events, converse_tool_frames

__all__ = [
    "ConverseStream",
    "InvokeStream",
    "Reply",
    "StreamRenderer",
    "converse_body",
    "invoke_body",
    "new_message_id",
    "new_request_id",
]


def new_message_id() -> str:
    """An id shaped like Bedrock's Anthropic message ids (``msg_bdrk_01...``)."""
    return "msg_bdrk_01" + os.urandom(11).hex()


def new_request_id() -> str:
    """A random UUID string for ``x-amzn-RequestId`` (a third of ``str(uuid4())``'s cost)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class Reply:
    """A generated answer: the text pieces (one per output token) and its accounting."""

    message_id: str
    model_name: str
    tokens: tuple[str, ...]
    input_tokens: int
    stop_reason: str  # Anthropic's spelling: end_turn | max_tokens | tool_use
    #: A tool call after the text (stop_reason ``tool_use``).
    tool: ToolUse | None = None

    @property
    def tool_tokens(self) -> int:
        """Output tokens of the tool call (0 without one)."""
        return 0 if self.tool is None else self.tool.tokens

    @property
    def output_tokens(self) -> int:
        """Output tokens the reply carries: its text, then its tool call."""
        return len(self.tokens) + self.tool_tokens

    @property
    def text(self) -> str:
        """The whole reply text."""
        return "".join(self.tokens)


def invoke_body(reply: Reply) -> bytes:
    """InvokeModel's Anthropic Messages response body."""
    return orjson.dumps(
        {
            "id": reply.message_id,
            "type": "message",
            "role": "assistant",
            "model": reply.model_name,
            "content": _anthropic_content(reply),
            "stop_reason": reply.stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
        }
    )


def _anthropic_content(reply: Reply) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}]
    tool = reply.tool
    if tool is not None:
        use = {"type": "tool_use", "id": tool.tool_use_id, "name": tool.name, "input": tool.input}
        content.append(use)
    return content


def _converse_content(reply: Reply) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"text": reply.text}]
    tool = reply.tool
    if tool is not None:
        use = {"toolUseId": tool.tool_use_id, "name": tool.name, "input": tool.input}
        content.append({"toolUse": use})
    return content


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "inputTokens": input_tokens,
        "outputTokens": output_tokens,
        "totalTokens": input_tokens + output_tokens,
    }


def converse_body(reply: Reply, latency_ms: int, echo: Mapping[str, Any]) -> bytes:
    """Converse's response; ``echo`` carries ``performanceConfig`` / ``serviceTier`` if sent."""
    return orjson.dumps(
        {
            "output": {"message": {"role": "assistant", "content": _converse_content(reply)}},
            "stopReason": reply.stop_reason,
            "usage": _usage(reply.input_tokens, reply.output_tokens),
            "metrics": {"latencyMs": latency_ms},
            **echo,
        }
    )


class StreamRenderer(Protocol):
    """Frames of one streaming operation: an opening, one frame per delta, a closing."""

    def head(self) -> list[bytes]:
        """Frames sent at the first token (before any text)."""
        ...

    def delta(self, text: str) -> bytes:
        """One text delta."""
        ...

    def tail(self, output_tokens: int, latency_ms: int, first_byte_ms: int) -> list[bytes]:
        """Frames that end a completed stream, carrying the usage."""
        ...


def _chunk(event: Mapping[str, Any]) -> bytes:
    # PayloadPart.bytes is a blob, so it travels base64-encoded inside the JSON payload;
    # base64 needs no JSON escaping, so the payload is assembled without a second dumps().
    return event_frame("chunk", b'{"bytes":"' + b64encode(orjson.dumps(event)) + b'"}')


class InvokeStream:
    """InvokeModelWithResponseStream: Anthropic's native events wrapped in ``chunk`` frames."""

    __slots__ = ("_reply",)

    def __init__(self, reply: Reply) -> None:
        self._reply = reply

    def head(self) -> list[bytes]:
        """``message_start`` (with input tokens) and ``content_block_start``."""
        reply = self._reply
        message: dict[str, Any] = {
            "id": reply.message_id,
            "type": "message",
            "role": "assistant",
            "model": reply.model_name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1},
        }
        block = {"type": "text", "text": ""}
        return [
            _chunk({"type": "message_start", "message": message}),
            _chunk({"type": "content_block_start", "index": 0, "content_block": block}),
        ]

    def delta(self, text: str) -> bytes:
        """A ``content_block_delta`` with a ``text_delta``."""
        return _chunk(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            }
        )

    def tail(self, output_tokens: int, latency_ms: int, first_byte_ms: int) -> list[bytes]:
        """``content_block_stop``, a tool call, ``message_delta`` (usage), ``message_stop``."""
        reply = self._reply
        output_tokens += reply.tool_tokens
        tool = [] if reply.tool is None else anthropic_tool_events(reply.tool, 1)
        metrics = {
            "inputTokenCount": reply.input_tokens,
            "outputTokenCount": output_tokens,
            "invocationLatency": latency_ms,
            "firstByteLatency": first_byte_ms,
        }
        delta = {"stop_reason": reply.stop_reason, "stop_sequence": None}
        return [
            _chunk({"type": "content_block_stop", "index": 0}),
            *map(_chunk, tool),
            _chunk(
                {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}}
            ),
            _chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics}),
        ]


_MESSAGE_START = event_frame("messageStart", b'{"role":"assistant"}')
_BLOCK_STOP = event_frame("contentBlockStop", b'{"contentBlockIndex":0}')


class ConverseStream:
    """ConverseStream: ``messageStart``, ``contentBlockDelta``..., ``messageStop``, ``metadata``."""

    __slots__ = ("_echo", "_reply")

    def __init__(self, reply: Reply, echo: Mapping[str, Any]) -> None:
        self._reply = reply
        self._echo = echo

    def head(self) -> list[bytes]:
        """``messageStart``."""
        return [_MESSAGE_START]

    def delta(self, text: str) -> bytes:
        """A ``contentBlockDelta`` for block 0."""
        return event_frame(
            "contentBlockDelta", orjson.dumps({"delta": {"text": text}, "contentBlockIndex": 0})
        )

    def tail(self, output_tokens: int, latency_ms: int, first_byte_ms: int) -> list[bytes]:
        """``contentBlockStop``, a tool call, ``messageStop`` and ``metadata`` (usage, metrics)."""
        reply = self._reply
        output_tokens += reply.tool_tokens
        tool = [] if reply.tool is None else converse_tool_frames(reply.tool, 1)
        metadata = {
            "usage": _usage(reply.input_tokens, output_tokens),
            "metrics": {"latencyMs": latency_ms},
            **self._echo,
        }
        return [
            _BLOCK_STOP,
            *tool,
            event_frame("messageStop", orjson.dumps({"stopReason": reply.stop_reason})),
            event_frame("metadata", orjson.dumps(metadata)),
        ]

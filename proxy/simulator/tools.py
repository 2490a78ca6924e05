"""Tool use: deciding when the simulated model calls a tool, and the blocks that say so.

A request that offers tools gets a tool call when the prompt asks for one with
``[[sim:tool=NAME]]`` (``[[sim:tool=*]]``: the first tool offered) or when its tool choice
forces one (Converse ``toolChoice: {any|tool}``, Anthropic ``tool_choice: {type: any|tool}``).
A turn that answers a tool call (``toolResult`` / ``tool_result``) is answered in text, so a
client's tool loop ends. The tool's input is generated from its JSON schema, deterministically.

The reply then has two blocks, as Claude's usually do: a short text block, then the tool call,
with ``stopReason: tool_use``. Replies to forced tool choices carry the short text block too
(real Claude omits it); every client tested accepts both shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from proxy.errors import BedrockError
from proxy.eventstream import event_frame

__all__ = [
    "PREFACE_TOKENS",
    "ToolUse",
    "anthropic_tool_events",
    "converse_tool_frames",
    "plan_tool_use",
    "sample_input",
]

Dialect = Literal["converse", "anthropic"]
#: Text tokens before a tool call (Claude usually says what it is about to do).
PREFACE_TOKENS = 5
#: Characters of the input JSON per streamed fragment.
_FRAGMENT_CHARS = 16
_MAX_DEPTH = 6


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool call the reply makes."""

    tool_use_id: str
    name: str
    input: Any
    input_json: str

    @property
    def tokens(self) -> int:
        """Output tokens the call costs: its input JSON and its name, about 4 characters each."""
        return math.ceil((len(self.input_json) + len(self.name)) / 4) + 1


def _tool_error(message: str) -> BedrockError:
    return BedrockError("ValidationException", message)


def _offered(doc: Mapping[str, Any], dialect: Dialect) -> dict[str, Any]:
    """Tool name -> input JSON schema, in the order offered."""
    if dialect == "converse":
        config = doc.get("toolConfig")
        tools = config.get("tools") if isinstance(config, dict) else None
        specs = [t.get("toolSpec") for t in tools or () if isinstance(t, dict)]
        return {
            s["name"]: (s.get("inputSchema") or {}).get("json") or {}
            for s in specs
            if isinstance(s, dict) and isinstance(s.get("name"), str)
        }
    tools = doc.get("tools")
    return {
        t["name"]: t.get("input_schema") or {}
        for t in tools or ()
        if isinstance(t, dict) and isinstance(t.get("name"), str)
    }


def _forced(doc: Mapping[str, Any], dialect: Dialect) -> str | None:
    """The tool the tool choice forces: a name, ``*`` for any, None when not forced."""
    if dialect == "converse":
        config = doc.get("toolConfig")
        choice = config.get("toolChoice") if isinstance(config, dict) else None
        if not isinstance(choice, dict):
            return None
        if "any" in choice:
            return "*"
        tool = choice.get("tool")
        return tool.get("name") if isinstance(tool, dict) else None
    choice = doc.get("tool_choice")
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "any":
        return "*"
    return choice.get("name") if kind == "tool" else None


def _blocks(message: Any) -> list[Any]:
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, list) else []


def _use_ids(message: Any, dialect: Dialect) -> set[Any]:
    if dialect == "converse":
        uses = (b.get("toolUse") for b in _blocks(message) if isinstance(b, dict))
        return {u.get("toolUseId") for u in uses if isinstance(u, dict)}
    return {
        b.get("id") for b in _blocks(message) if isinstance(b, dict) and b.get("type") == "tool_use"
    }


def _result_ids(message: Any, dialect: Dialect) -> list[Any]:
    if dialect == "converse":
        results = (b.get("toolResult") for b in _blocks(message) if isinstance(b, dict))
        return [r.get("toolUseId") for r in results if isinstance(r, dict)]
    return [
        b.get("tool_use_id")
        for b in _blocks(message)
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]


def _check_results(messages: list[Any], dialect: Dialect, has_tools: bool) -> bool:
    """Check every tool result answers a call of the turn before; True if the last one does."""
    used = False
    answered_last = False
    for i, message in enumerate(messages):
        calls = _use_ids(message, dialect)
        results = _result_ids(message, dialect)
        used = used or bool(calls) or bool(results)
        if results:
            before = _use_ids(messages[i - 1], dialect) if i else set()
            stray = [r for r in results if r not in before]
            if stray:
                raise _tool_error(
                    f"messages.{i}.content: unexpected tool use id found in tool result blocks: "
                    f"{stray[0]}. Each tool result block must have a corresponding tool use "
                    "block in the previous message."
                )
        answered_last = bool(results)
    if used and not has_tools and dialect == "converse":
        raise _tool_error(
            "The toolConfig field must be defined when using toolUse and toolResult content blocks."
        )
    return answered_last


def plan_tool_use(doc: Mapping[str, Any], dialect: Dialect, asked: str | None) -> ToolUse | None:
    """The tool call a validated request gets (``asked``: the ``[[sim:tool=...]]`` value)."""
    offered = _offered(doc, dialect)
    messages = doc.get("messages")
    answered = _check_results(
        messages if isinstance(messages, list) else [], dialect, bool(offered)
    )
    if asked is not None and not offered:
        raise _tool_error(f"[[sim:tool={asked}]] asks for a tool but the request offers none")
    if answered:
        return None
    # A tool choice naming a tool wins over the prompt; "any" lets the prompt pick.
    forced = _forced(doc, dialect)
    name = forced if forced not in (None, "*") else (asked or forced)
    if name is None:
        return None
    if name == "*":
        name = next(iter(offered))
    if name not in offered:
        raise _tool_error(
            f"tool '{name}' is not among the tools offered ({', '.join(offered) or 'none'})"
        )
    value = sample_input(offered[name])
    prefix = "tooluse_" if dialect == "converse" else "toolu_bdrk_01"
    return ToolUse(prefix + os.urandom(11).hex(), name, value, orjson.dumps(value).decode())


def _resolve(schema: Any, root: Mapping[str, Any]) -> Any:
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def sample_input(schema: Any, root: Mapping[str, Any] | None = None, depth: int = 0) -> Any:
    """A deterministic value that satisfies a JSON schema's types, enums and required keys."""
    root = schema if root is None and isinstance(schema, dict) else (root or {})
    schema = _resolve(schema, root)
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    for key in ("enum", "examples"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema[key][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(key) or () if _resolve(o, root).get("type") != "null"]
        if options:
            return sample_input(options[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return _sample_of_type(kind, schema, root, depth)


def _sample_of_type(kind: Any, schema: dict[str, Any], root: Mapping[str, Any], depth: int) -> Any:
    if kind == "string":
        return "東京"
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = max(1, math.ceil(low) + (1 if "exclusiveMinimum" in schema else 0))
        return value if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "array":
        return [sample_input(schema.get("items") or {"type": "string"}, root, depth + 1)]
    if kind == "null":
        return None
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    # The required properties; with none required, every one (as a model fills what it knows).
    required = schema.get("required")
    names = [n for n in properties if not required or n in required]
    return {n: sample_input(properties[n], root, depth + 1) for n in names}


def _fragments(text: str) -> list[str]:
    return [text[i : i + _FRAGMENT_CHARS] for i in range(0, len(text), _FRAGMENT_CHARS)] or [""]


def converse_tool_frames(tool: ToolUse, index: int) -> list[bytes]:
    """ConverseStream events of a tool call: start (id, name), input fragments, stop."""
    start = {"start": {"toolUse": {"toolUseId": tool.tool_use_id, "name": tool.name}}}
    frames = [event_frame("contentBlockStart", orjson.dumps({**start, "contentBlockIndex": index}))]
    for piece in _fragments(tool.input_json):
        delta = {"delta": {"toolUse": {"input": piece}}, "contentBlockIndex": index}
        frames.append(event_frame("contentBlockDelta", orjson.dumps(delta)))
    frames.append(event_frame("contentBlockStop", orjson.dumps({"contentBlockIndex": index})))
    return frames


def anthropic_tool_events(tool: ToolUse, index: int) -> list[dict[str, Any]]:
    """Anthropic stream events of a tool call: block start, ``input_json_delta``s, block stop."""
    block = {"type": "tool_use", "id": tool.tool_use_id, "name": tool.name, "input": {}}
    events: list[dict[str, Any]] = [
        {"type": "content_block_start", "index": index, "content_block": block}
    ]
    for piece in _fragments(tool.input_json):
        delta = {"type": "input_json_delta", "partial_json": piece}
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
    events.append({"type": "content_block_stop", "index": index})
    return events

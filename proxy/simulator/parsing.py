"""Request bodies: validation with Bedrock-like messages, and the facts the simulator needs.

InvokeModel bodies are checked the way Bedrock checks Anthropic's schema (its messages read
``Malformed input request: #/path: reason, please reformat your input and try again.``);
Converse bodies the way Bedrock's Coral front end does (``1 validation error detected: ...``).
Every failure raises :class:`proxy.errors.BedrockError` (``ValidationException``).
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from dataclasses import dataclass, replace
from typing import Any

import orjson

from proxy.errors import BedrockError
from proxy.simulator.config import ModelConfig
from proxy.simulator.text import Directives, count_tokens, parse_directives, round_tokens
from proxy.simulator.tools import PREFACE_TOKENS, Dialect, ToolUse, plan_tool_use

__all__ = ["Call", "converse_call", "parse_anthropic", "parse_count_tokens", "parse_json"]

ANTHROPIC_VERSION = "bedrock-2023-05-31"
#: The Anthropic SDK (2.x) sends its own dated API version (e.g. ``2026-10-21``) to Bedrock too;
#: accepting that shape keeps the simulator usable with the current SDK.
_DATED_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
_ANTHROPIC_KEYS = frozenset(
    {
        "anthropic_version", "anthropic_beta", "max_tokens", "messages", "system",
        "stop_sequences", "temperature", "top_p", "top_k", "tools", "tool_choice", "metadata",
        "thinking",
    }
)  # fmt: skip
_ROLES = ("user", "assistant")


@dataclass(frozen=True, slots=True)
class Call:
    """What a model call asks for, once validated."""

    prompt: str  # all message text: seeds the reply, carries directives
    input_tokens: int
    max_tokens: int  # the request's cap on output, else the model's maximum (also reserved)
    output_tokens: int  # what the reply will contain
    stop_reason: str  # "end_turn", "max_tokens" when the cap cut the reply short, "tool_use"
    directives: Directives
    #: The tool the reply calls (after ``output_tokens`` of text), if any.
    tool: ToolUse | None = None


def _malformed(detail: str) -> BedrockError:
    return BedrockError(
        "ValidationException",
        f"Malformed input request: {detail}, please reformat your input and try again.",
    )


def _json_type(value: Any) -> str:
    return {
        dict: "JSONObject", list: "JSONArray", str: "String", bool: "Boolean", int: "Integer",
        float: "Number", type(None): "null",
    }.get(type(value), type(value).__name__)  # fmt: skip


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; invalid UTF-8 and bad JSON are ``ValidationException``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("request body is not valid UTF-8") from None
        raise _malformed(f"invalid JSON ({exc})") from None


def _expect(value: Any, kind: type, path: str, expected: str) -> None:
    # bool is an int subclass; Bedrock's schema rejects true where an Integer is wanted.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _malformed(f"{path}: expected type: {expected}, found: {_json_type(value)}")


def _text_of_blocks(content: Any, path: str, parts: list[str]) -> float:
    """Collect the text of Anthropic content (string or blocks); return non-text token weight."""
    if isinstance(content, str):
        parts.append(content)
        return 0.0
    _expect(content, list, path, "JSONArray")
    extra = 0.0
    for i, block in enumerate(content):
        _expect(block, dict, f"{path}/{i}", "JSONObject")
        if "type" not in block:
            raise _malformed(f"{path}/{i}: required key [type] not found")
        if block["type"] == "text":
            text = block.get("text")
            _expect(text, str, f"{path}/{i}/text", "String")
            parts.append(text)
        else:
            # Images, tool use and results: charged by their JSON size, roughly.
            extra += len(orjson.dumps(block)) / 4
    return extra


def _anthropic_messages(messages: Any, parts: list[str]) -> float:
    """Check ``messages``; collect their text into ``parts``; return non-text token weight."""
    _expect(messages, list, "#/messages", "JSONArray")
    if not messages:
        raise BedrockError("ValidationException", "messages: at least one message is required")
    extra = 0.0
    for i, message in enumerate(messages):
        path = f"#/messages/{i}"
        _expect(message, dict, path, "JSONObject")
        for key in ("role", "content"):
            if key not in message:
                raise _malformed(f"{path}: required key [{key}] not found")
        if message["role"] not in _ROLES:
            raise _malformed(f"{path}/role: {message['role']} is not a valid enum value")
        extra += _text_of_blocks(message["content"], f"{path}/content", parts)
    return extra


def parse_anthropic(body: bytes, model: ModelConfig, default_output: int) -> Call:
    """Validate an Anthropic Messages body for InvokeModel and describe the call."""
    doc = parse_json(body)
    _expect(doc, dict, "#", "JSONObject")
    for key in doc:
        if key not in _ANTHROPIC_KEYS:
            raise _malformed(f"#: extraneous key [{key}] is not permitted")
    for key in ("anthropic_version", "max_tokens", "messages"):
        if key not in doc:
            raise _malformed(f"#: required key [{key}] not found")
    version = doc["anthropic_version"]
    if version != ANTHROPIC_VERSION and not (
        isinstance(version, str) and _DATED_VERSION.fullmatch(version)
    ):
        raise _malformed(f"#/anthropic_version: {version} is not a valid enum value")
    max_tokens = doc["max_tokens"]
    _expect(max_tokens, int, "#/max_tokens", "Integer")
    if max_tokens < 1:
        raise _malformed(f"#/max_tokens: {max_tokens} is not greater or equal to 1")
    if max_tokens > model.max_output_tokens:
        raise BedrockError(
            "ValidationException",
            f"max_tokens: {max_tokens} > {model.max_output_tokens}, which is the maximum allowed "
            f"number of output tokens for {model.name}",
        )
    parts: list[str] = []
    extra = _anthropic_messages(doc["messages"], parts)
    prompt = "\n".join(parts)
    system: list[str] = []
    if "system" in doc:
        extra += _text_of_blocks(doc["system"], "#/system", system)
    return _with_tool(_call(prompt, system, extra, max_tokens, default_output), doc, "anthropic")


def _coral(message: str) -> BedrockError:
    return BedrockError("ValidationException", f"1 validation error detected: {message}")


def _converse_texts(blocks: Any, where: str, parts: list[str]) -> float:
    if not isinstance(blocks, list):
        raise _coral(f"Value at '{where}' failed to satisfy constraint: Member must be a list")
    extra = 0.0
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise _coral(
                f"Value at '{where}.{j + 1}.member' failed to satisfy constraint: "
                "Member must be a structure"
            )
        text = block.get("text")
        if isinstance(text, str):
            parts.append(text)
        else:
            extra += len(orjson.dumps(block)) / 4
    return extra


def converse_call(doc: Any, model: ModelConfig, default_output: int) -> Call:
    """Validate a Converse request document (already decoded) and describe the call."""
    if not isinstance(doc, dict):
        raise _malformed("#: expected type: JSONObject, found: " + _json_type(doc))
    messages = doc.get("messages")
    if messages is None:
        raise _coral(
            "Value null at 'messages' failed to satisfy constraint: Member must not be null"
        )
    if not isinstance(messages, list):
        raise _coral("Value at 'messages' failed to satisfy constraint: Member must be a list")
    if not messages:
        raise BedrockError(
            "ValidationException",
            "A conversation must start with a user message. Try again with a conversation that "
            "starts with a user message.",
        )
    parts: list[str] = []
    extra = 0.0
    for i, message in enumerate(messages):
        where = f"messages.{i + 1}.member"
        if not isinstance(message, dict):
            raise _coral(
                f"Value at '{where}' failed to satisfy constraint: Member must be a structure"
            )
        role = message.get("role")
        if role not in _ROLES:
            raise _coral(
                f"Value '{role}' at '{where}.role' failed to satisfy constraint: Member "
                "must satisfy enum value set: [assistant, user]"
            )
        if i == 0 and role != "user":
            raise BedrockError(
                "ValidationException",
                "A conversation must start with a user message. Try again with a conversation "
                "that starts with a user message.",
            )
        extra += _converse_texts(message.get("content"), f"{where}.content", parts)
    system: list[str] = []
    if doc.get("system") is not None:
        extra += _converse_texts(doc["system"], "system", system)
    if doc.get("toolConfig") is not None:
        extra += len(orjson.dumps(doc["toolConfig"])) / 4
    max_tokens = _converse_max_tokens(doc.get("inferenceConfig"), model)
    cap = model.max_output_tokens if max_tokens is None else max_tokens
    return _with_tool(_call("\n".join(parts), system, extra, cap, default_output), doc, "converse")


def _with_tool(call: Call, doc: dict[str, Any], dialect: Dialect) -> Call:
    """The call with its tool use decided: a short text preface, then the tool call."""
    tool = plan_tool_use(doc, dialect, call.directives.tool)
    if tool is None:
        return call
    preface = min(PREFACE_TOKENS, call.output_tokens)
    return replace(call, output_tokens=preface, stop_reason="tool_use", tool=tool)


def _converse_max_tokens(inference: Any, model: ModelConfig) -> int | None:
    if inference is None:
        return None
    if not isinstance(inference, dict):
        raise _coral(
            "Value at 'inferenceConfig' failed to satisfy constraint: Member must be a structure"
        )
    value = inference.get("maxTokens")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _coral(
            f"Value '{value}' at 'inferenceConfig.maxTokens' failed to satisfy "
            "constraint: Member must have value greater than or equal to 1"
        )
    if value > model.max_output_tokens:
        limit = model.max_output_tokens
        raise BedrockError(
            "ValidationException",
            f"The maximum tokens you requested exceeds the model limit of {limit}. Try again "
            f"with a maximum tokens value that is lower than {limit}.",
        )
    return int(value)


def parse_count_tokens(body: bytes, model: ModelConfig) -> int:
    """Input tokens of a CountTokens request (either the InvokeModel or the Converse form)."""
    doc = parse_json(body)
    payload = doc.get("input") if isinstance(doc, dict) else None
    if not isinstance(payload, dict) or len(payload) != 1:
        raise _coral(
            "Value at 'input' failed to satisfy constraint: Member must have exactly "
            "one of invokeModel, converse set"
        )
    if "invokeModel" in payload:
        invoke = payload["invokeModel"]
        raw = invoke.get("body") if isinstance(invoke, dict) else None
        if not isinstance(raw, str):
            raise _coral(
                "Value null at 'input.invokeModel.body' failed to satisfy constraint: "
                "Member must not be null"
            )
        try:
            inner = b64decode(raw, validate=True)
        except binascii.Error:
            raise _malformed("input.invokeModel.body is not valid base64") from None
        return parse_anthropic(inner, model, 1).input_tokens
    if "converse" in payload:
        return converse_call(payload["converse"], model, 1).input_tokens
    raise _coral(
        "Value at 'input' failed to satisfy constraint: Member must have exactly one "
        "of invokeModel, converse set"
    )


def _call(prompt: str, system: list[str], extra: float, max_tokens: int, default: int) -> Call:
    try:
        directives = parse_directives(prompt)
    except ValueError as exc:
        raise BedrockError("ValidationException", str(exc)) from None
    tokens = count_tokens(prompt) + extra + sum(count_tokens(s) for s in system)
    wanted = directives.output_tokens if directives.output_tokens is not None else default
    stop = "max_tokens" if wanted > max_tokens else "end_turn"
    return Call(
        prompt, max(1, round_tokens(tokens)), max_tokens, min(wanted, max_tokens), stop, directives
    )

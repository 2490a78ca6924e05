"""Token estimates before the call, and the reservation arithmetic.

Bedrock reserves ``input + max_tokens`` at admission and settles real usage after,
so Sluice must estimate input tokens from the body before any tokenizer has seen it.
The estimate is deliberately cheap (one JSON parse, two regex passes) and errs high.

Characters are counted as a reader sees them: an emoji ZWJ sequence, a flag (two
regional indicators) or a letter with combining marks is one character, whatever
its code-point or UTF-16 length. A CJK or emoji character costs about 1.5 tokens,
any other character about 0.3.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from proxy.errors import BedrockError

CJK_TOKENS_PER_CHAR: Final = 1.5
OTHER_TOKENS_PER_CHAR: Final = 0.3
#: A fixed charge per image/document block: their bytes are not text.
MEDIA_BLOCK_TOKENS: Final = 1600
#: Framing tokens each message costs on top of its text (role markers and the like).
PER_MESSAGE_TOKENS: Final = 4
#: Nesting the estimator walks for sure (Python's default stack allows ~900 levels).
MAX_DEPTH: Final = 512

# Wide characters: Hangul Jamo, CJK radicals..CJK unified (incl. kana), Hangul syllables,
# CJK compatibility, fullwidth forms, CJK extension planes, emoji and pictographs.
_WIDE = re.compile(
    "[\u1100-\u11ff\u2600-\u27bf\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f"
    "\uff00-\uffef\U0001f000-\U0001f1e5\U0001f200-\U0001f3fa\U0001f400-\U0001faff"
    "\U00020000-\U0003ffff]"
)
_REGIONAL = re.compile("[\U0001f1e6-\U0001f1ff]")
# Zero-width parts of a visible character: combining marks, variation selectors,
# skin-tone modifiers, keycap, emoji tag characters.
_MARKS = re.compile(
    "[\u0300-\u036f\u1ab0-\u1aff\u20d0-\u20ff\ufe00-\ufe0f\U0001f3fb-\U0001f3ff"
    "\U000e0020-\U000e007f]"
)
_ZWJ: Final = "\u200d"

# Keys whose string values are not prompt text (or are binary payloads charged flat).
_SKIP_KEYS: Final = frozenset(
    {
        "anthropic_version",
        "role",
        "type",
        "media_type",
        "format",
        "stop_sequences",
        "stopSequences",
        "toolUseId",
        "tool_use_id",
        "guardrailIdentifier",
        "guardrailVersion",
    }
)
_MEDIA_KEYS: Final = frozenset({"data", "bytes", "image", "document", "video"})
#: String fields holding encoded media (base64), charged flat instead of as text.
_RAW_KEYS: Final = frozenset({"data", "bytes"})


def _char_counts(text: str) -> tuple[int, int]:
    """(wide, other) characters as a reader sees them."""
    if text.isascii():
        return 0, len(text)
    wide = len(_WIDE.findall(text))
    regional = len(_REGIONAL.findall(text))
    marks = len(_MARKS.findall(text))
    zwj = text.count(_ZWJ)
    # Each ZWJ glues the next pictograph onto the previous one; two regional
    # indicators make one flag; marks and selectors have no width of their own.
    visible_wide = max(0, wide - zwj) + (regional + 1) // 2
    return visible_wide, max(0, len(text) - wide - regional - marks - zwj)


def text_tokens(text: str) -> float:
    """Estimated tokens for ``text`` (unrounded, so sums stay exact)."""
    wide, other = _char_counts(text)
    return wide * CJK_TOKENS_PER_CHAR + other * OTHER_TOKENS_PER_CHAR


def visible_length(text: str) -> int:
    """Characters as a reader sees them (not code points, not UTF-16 units)."""
    wide, other = _char_counts(text)
    return wide + other


def node_tokens(node: Any) -> float:
    """Estimated tokens of a parsed JSON value: its prompt text plus flat media charges."""
    # Runs on every admitted request: the common leaves (ASCII strings, numbers) are
    # handled inline instead of through another call.
    if isinstance(node, str):
        return len(node) * OTHER_TOKENS_PER_CHAR if node.isascii() else text_tokens(node)
    if isinstance(node, dict):
        return _object_tokens(node)
    total = 0.0
    if isinstance(node, list):
        for item in node:
            total += node_tokens(item)
    return total


def _object_tokens(node: dict[str, Any]) -> float:
    """A JSON object's tokens: its text fields, flat charges for media, nested values."""
    total = 0.0
    for key, value in node.items():
        if key in _SKIP_KEYS:
            continue
        if isinstance(value, str):
            total += (
                MEDIA_BLOCK_TOKENS
                if key in _RAW_KEYS
                else len(value) * OTHER_TOKENS_PER_CHAR
                if value.isascii()
                else text_tokens(value)
            )
        elif key in _MEDIA_KEYS and not isinstance(value, list):
            total += MEDIA_BLOCK_TOKENS
        elif isinstance(value, dict | list):
            total += node_tokens(value)
    return total


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What the body says about cost before the call."""

    input_tokens: int
    #: The request's own output cap, or None when it sets none.
    max_tokens: int | None
    #: The parsed body (dict), kept so later steps need not parse again.
    body: dict[str, Any]
    #: Where the output cap came from (e.g. ``inferenceConfig.maxTokens``), for messages.
    max_tokens_field: str | None = None


def parse_body(body: bytes) -> dict[str, Any]:
    """Parse a JSON request body or raise Bedrock's ValidationException saying why."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise BedrockError(
                "ValidationException",
                f"Malformed input request: body is not valid UTF-8 (byte {uexc.start})",
            ) from None
        raise BedrockError(
            "ValidationException", f"Malformed input request: body is not valid JSON ({exc.msg})"
        ) from None
    if not isinstance(doc, dict):
        raise BedrockError(
            "ValidationException", "Malformed input request: the body must be a JSON object"
        )
    return doc


def _positive_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BedrockError(
            "ValidationException",
            f"Malformed input request: {field} must be a positive integer, got {value!r}",
        )
    return value


def _output_cap(operation: str, doc: dict[str, Any]) -> tuple[int | None, str | None]:
    """The request's own output cap and the field that set it."""
    if operation.startswith("Converse"):
        inference = doc.get("inferenceConfig")
        field = "inferenceConfig.maxTokens"
        if not isinstance(inference, dict):
            return None, None
        value = _positive_int(inference.get("maxTokens"), field)
        return value, field if value is not None else None
    for field in ("max_tokens", "max_gen_len", "maxTokens"):
        if doc.get(field) is not None:
            return _positive_int(doc[field], field), field
    cfg = doc.get("textGenerationConfig")
    if isinstance(cfg, dict):
        field = "textGenerationConfig.maxTokenCount"
        value = _positive_int(cfg.get("maxTokenCount"), field)
        return value, field if value is not None else None
    return None, None


def estimate(operation: str, body: bytes) -> RequestEstimate:
    """Estimate input tokens and read the output cap of an InvokeModel/Converse body."""
    doc = parse_body(body)
    max_tokens, field = _output_cap(operation, doc)
    messages = doc.get("messages")
    framing = PER_MESSAGE_TOKENS * len(messages) if isinstance(messages, list) else 0
    try:
        tokens = node_tokens(doc)
    except RecursionError:
        # orjson accepts 1,024 levels; the walk above runs out of Python stack first.
        # No Bedrock body nests this deep, so it is the caller's error, not ours.
        raise BedrockError(
            "ValidationException",
            f"Malformed input request: the JSON body is nested more than {MAX_DEPTH} levels deep",
        ) from None
    return RequestEstimate(math.ceil(tokens + framing), max_tokens, doc, field)


def reservation(input_tokens: int, max_tokens: int, output_weight: float) -> int:
    """Weighted tokens to reserve at admission: input plus the output cap at its burndown."""
    return input_tokens + math.ceil(max_tokens * output_weight)


def settled_tokens(
    input_tokens: int, output_tokens: int, cache_write_tokens: int, output_weight: float
) -> int:
    """Weighted tokens a finished call really used, as Bedrock's quota counts them."""
    return input_tokens + cache_write_tokens + math.ceil(output_tokens * output_weight)

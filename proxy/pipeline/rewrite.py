"""Downgrade: send a refused call to a cheaper model pool instead (Sonnet → Haiku).

Only the path changes. The request bodies of InvokeModel (Anthropic Messages) and Converse
are the same for every Claude model, so a body written for Sonnet is valid for Haiku as it
stands — *unless* it uses a feature the target model lacks. :func:`downgrade_body_problem`
names those cases (the ones known when this was written, listed in ``_MAX_OUTPUT_TOKENS``
and ``_NO_*`` below), so the caller can skip the downgrade step rather than trade a
throttle for a ValidationException. An unrecognised target (an opaque ARN, a model newer
than this table) is assumed capable: a wrong guess costs one 400 from Bedrock, and the
table is cheap to extend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal
from urllib.parse import quote

import orjson

from proxy.routes import base_model_id

__all__ = [
    "DegradeKind",
    "downgrade_body_problem",
    "downgrade_path",
    "encode_model_id",
    "served_model_headers",
]

DegradeKind = Literal["downgrade", "cache", "template"]
_KINDS: Final = frozenset({"downgrade", "cache", "template"})

#: Operation → the path action that carries it (the routes table, inverted, model calls only).
_ACTIONS: Final[Mapping[str, str]] = {
    "InvokeModel": "invoke",
    "InvokeModelWithResponseStream": "invoke-with-response-stream",
    "Converse": "converse",
    "ConverseStream": "converse-stream",
}
_NATIVE: Final = frozenset({"InvokeModel", "InvokeModelWithResponseStream"})

# Output ceilings Bedrock enforces with a ValidationException (max_tokens > ceiling).
# Keyed by the foundation-model id without its version suffix.
_MAX_OUTPUT_TOKENS: Final[Mapping[str, int]] = {
    "anthropic.claude-3-haiku": 4096,
    "anthropic.claude-3-sonnet": 4096,
    "anthropic.claude-3-opus": 4096,
    "anthropic.claude-3-5-haiku": 8192,
    "anthropic.claude-3-5-sonnet": 8192,
}
# Extended thinking arrived with Claude 3.7 Sonnet; these predate it.
_NO_THINKING: Final = re.compile(r"^anthropic\.claude-(instant|v2|3-(haiku|sonnet|opus)|3-5-)")
# Claude 3.5 Haiku takes text only (Claude 3 Haiku does take images).
_NO_IMAGES: Final = re.compile(r"^anthropic\.claude-3-5-haiku")
_VERSION_SUFFIX: Final = re.compile(r"-\d{8}-v\d+(:\d+)?$|-v\d+(:\d+)?$")


def encode_model_id(model_id: str) -> str:
    """A model id as boto3 puts it in a path: every byte but ``A-Za-z0-9-._~`` percent-encoded.

    botocore renders the non-greedy ``{modelId}`` label with ``quote(id, safe='-._~')``
    (``botocore.utils.percent_encode``); those four are unreserved, so ``safe=""`` is the same.
    """
    return quote(model_id, safe="")


def downgrade_path(path: str, operation: str, target_model_id: str) -> str:
    """``/model/<id>/<action>`` with ``target_model_id`` (boto3-encoded) in place of ``<id>``.

    The action is kept. Raises ``ValueError`` if ``path`` is not a model path whose action
    is ``operation``'s (a caller bug: the route was matched from this very path).
    """
    action = _ACTIONS.get(operation)
    if action is None:
        raise ValueError(f"{operation} is not a model invocation and cannot be downgraded")
    # The id may hold a literal '/' (an ARN the Anthropic SDK left unencoded), so the
    # action is the last segment and everything before it is the id, as routes.py reads it.
    head, sep, tail = path.rpartition("/")
    if not path.startswith("/model/") or not sep or tail != action or len(head) <= 7:
        raise ValueError(f"path {path[:200]!r} is not a {operation} path")
    return f"/model/{encode_model_id(target_model_id)}/{action}"


def served_model_headers(model_id: str, kind: str) -> dict[str, str]:
    """Headers marking a degraded answer: the model (or stand-in) that served it, and how."""
    if kind not in _KINDS:
        raise ValueError(f"degrade kind must be one of {sorted(_KINDS)}, not {kind!r}")
    return {"x-sluice-served-model": model_id, "x-sluice-degraded": kind}


def downgrade_body_problem(operation: str, body: bytes, target_model_id: str) -> str | None:
    """Why ``body`` cannot be sent unchanged to ``target_model_id``, or ``None`` if it can.

    The message names the field at fault, e.g. "max_tokens 8192 exceeds the 4096 output
    tokens anthropic.claude-3-haiku allows". A body that is not a JSON object is not judged
    here (Bedrock's own validation answers it) and gives ``None``.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    target = _family(target_model_id)
    if operation in _NATIVE:
        return _native_problem(doc, target)
    return _converse_problem(doc, target)


def _family(model_id: str) -> str:
    return _VERSION_SUFFIX.sub("", base_model_id(model_id))


def _native_problem(doc: dict[str, Any], target: str) -> str | None:
    vendor, dot, _ = target.partition(".")
    if "anthropic_version" in doc and dot and vendor != "anthropic":
        return f"an Anthropic Messages body cannot be sent to {target} (a {vendor} model)"
    if doc.get("anthropic_beta"):
        # Beta flags are per model (output-128k, token-efficient-tools, computer-use...).
        return "anthropic_beta flags are model-specific; not sent to another model"
    return (
        _max_tokens_problem(doc.get("max_tokens"), "max_tokens", target)
        or _thinking_problem(doc.get("thinking"), "thinking", target)
        or _image_problem(doc.get("messages"), "image", target)
    )


def _converse_problem(doc: dict[str, Any], target: str) -> str | None:
    extra = doc.get("additionalModelRequestFields")
    extra = extra if isinstance(extra, dict) else {}
    if extra.get("anthropic_beta"):
        return (
            "additionalModelRequestFields.anthropic_beta flags are model-specific; "
            "not sent to another model"
        )
    config = doc.get("inferenceConfig")
    max_tokens = config.get("maxTokens") if isinstance(config, dict) else None
    return (
        _max_tokens_problem(max_tokens, "inferenceConfig.maxTokens", target)
        or _thinking_problem(extra.get("thinking"), "additionalModelRequestFields.thinking", target)
        # Some Claude 3.7 documentation spells it reasoning_config.
        or _thinking_problem(
            extra.get("reasoning_config"), "additionalModelRequestFields.reasoning_config", target
        )
        or _image_problem(doc.get("messages"), "image", target)
    )


def _max_tokens_problem(value: Any, field: str, target: str) -> str | None:
    ceiling = _MAX_OUTPUT_TOKENS.get(target)
    if ceiling is not None and isinstance(value, int) and value > ceiling:
        return f"{field} {value} exceeds the {ceiling} output tokens {target} allows"
    return None


def _thinking_problem(value: Any, field: str, target: str) -> str | None:
    enabled = isinstance(value, dict) and value.get("type") == "enabled"
    if enabled and _NO_THINKING.match(target):
        return f"{field}: {target} has no extended thinking"
    return None


def _image_problem(messages: Any, field: str, target: str) -> str | None:
    if not _NO_IMAGES.match(target) or not isinstance(messages, list):
        return None
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(_is_image(block) for block in content):
            return f"{field}: {target} takes text only"
    return None


def _is_image(block: Any) -> bool:
    # Anthropic native blocks say {"type": "image"|"document"}; Converse blocks are keyed
    # by kind ({"image": ...}, {"document": ...}, {"video": ...}).
    if not isinstance(block, dict):
        return False
    return block.get("type") in ("image", "document") or any(
        kind in block for kind in ("image", "document", "video")
    )

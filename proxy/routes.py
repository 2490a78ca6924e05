"""The bedrock-runtime operation table: which path is which operation.

Routing is done on ``request.raw_path`` rather than aiohttp's router because model
ids arrive percent-encoded (boto3 sends ``%3A`` and, in ARNs, ``%2F``) and the
encoded form is what must be forwarded and signed; aiohttp's ``match_info`` would
decode ``%2F`` into a path separator.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from proxy.errors import BedrockError

#: Model actions: path suffix → (operation, streams its response, takes part in quotas).
_MODEL_ACTIONS: Final[dict[str, tuple[str, bool, bool]]] = {
    "invoke": ("InvokeModel", False, True),
    "invoke-with-response-stream": ("InvokeModelWithResponseStream", True, True),
    "converse": ("Converse", False, True),
    "converse-stream": ("ConverseStream", True, True),
    "count-tokens": ("CountTokens", False, False),
    "invoke-with-bidirectional-stream": ("InvokeModelWithBidirectionalStream", True, True),
}

# Bedrock's own modelId pattern is a long alternation; this accepts the same alphabet
# (foundation ids, inference-profile ids, ARNs) and rejects anything else early.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,2047}$")
#: Path segments a model id may not have: URL normalisation would remove or collapse them.
_DOT_FREE: Final = frozenset({"", ".", ".."})
_GUARDRAIL = re.compile(r"^/guardrail/([^/]+)/version/([^/]+)/apply$")
#: InvokeGuardrailChecks (botocore 1.42+): inline guardrail checks, no guardrail or model named.
_GUARDRAIL_CHECKS: Final = "/guardrail-checks/invoke"
_GEO_PREFIXES: Final = frozenset({"us", "eu", "apac", "global", "us-gov", "jp", "au", "ca"})


@dataclass(frozen=True, slots=True)
class Route:
    """One matched bedrock-runtime call."""

    operation: str
    #: Decoded model id (``None`` for guardrail and async-invoke operations).
    model_id: str | None
    streaming: bool
    #: Whether quotas apply: model invocations do; CountTokens, guardrails (ApplyGuardrail,
    #: InvokeGuardrailChecks), async-invoke don't.
    metered: bool
    path: str
    query: str


@dataclass(frozen=True, slots=True)
class MeteredRoute(Route):
    """A model invocation quotas apply to (``metered`` is True): it always names its model."""

    model_id: str


def _unknown(method: str, path: str) -> BedrockError:
    return BedrockError(
        "UnknownOperationException",
        f"No bedrock-runtime operation matches {method} {path}",
        status=404,
    )


@functools.lru_cache(maxsize=4096)
def match(method: str, raw_path: str) -> Route:
    """Map a request line to its operation, or raise a Bedrock-shaped 404 / 400.

    Cached: a fleet calls a handful of model paths over and over, and a Route is
    immutable (refusals raise, so they are never cached).
    """
    path, _, query = raw_path.partition("?")
    if path.startswith("/model/"):
        return _match_model(method, path, query)
    if path == "/async-invoke":
        if method == "POST":
            return Route("StartAsyncInvoke", None, False, False, path, query)
        if method == "GET":
            return Route("ListAsyncInvokes", None, False, False, path, query)
    elif path.startswith("/async-invoke/") and method == "GET" and len(path) > 14:
        return Route("GetAsyncInvoke", None, False, False, path, query)
    elif method == "POST" and _GUARDRAIL.match(path):
        return Route("ApplyGuardrail", None, False, False, path, query)
    elif path == _GUARDRAIL_CHECKS and method == "POST":
        return Route("InvokeGuardrailChecks", None, False, False, path, query)
    raise _unknown(method, path)


def _match_model(method: str, path: str, query: str) -> Route:
    # The action is the last segment; everything between is the id, so an ARN whose
    # '/' was left unencoded by some client still routes.
    head, sep, action = path[7:].rpartition("/")
    entry = _MODEL_ACTIONS.get(action) if sep else None
    if entry is None or not head:
        raise _unknown(method, path)
    if method != "POST":
        # RFC 9110 15.5.6: a 405 lists the methods the resource takes.
        raise BedrockError(
            "UnknownOperationException",
            f"{entry[0]} takes POST, not {method}",
            status=405,
            headers={"Allow": "POST"},
        )
    model_id = unquote(head)
    check_model_id(model_id)
    operation, streaming, metered = entry
    if operation == "InvokeModelWithBidirectionalStream":
        raise BedrockError(
            "ValidationException",
            "InvokeModelWithBidirectionalStream needs HTTP/2, which Sluice does not proxy; "
            "call Bedrock directly for bidirectional streams",
        )
    if metered:
        return MeteredRoute(operation, model_id, streaming, True, path, query)
    return Route(operation, model_id, streaming, False, path, query)


def check_model_id(model_id: str) -> None:
    """Raise the 400 naming ``modelId`` Bedrock would send for a malformed id (a live call's
    path, a batch's or a replay's ``?modelId=`` alike)."""
    if not _MODEL_ID.match(model_id):
        raise _bad_model_id(
            model_id, "Member must be a foundation-model id, an inference-profile id or an ARN"
        )
    if "/" in model_id and not _DOT_FREE.isdisjoint(model_id.split("/")):
        # The signer removes dot segments (as botocore does) and Bedrock may resolve them:
        # 'x/../<sonnet>' would be metered as the unknown model 'x/../<sonnet>' and served
        # as sonnet. Checked decoded, so '%2E%2E' and '%2F' are caught as well.
        raise _bad_model_id(model_id, "Member must not contain empty, '.' or '..' path segments")


def _bad_model_id(model_id: str, constraint: str) -> BedrockError:
    shown = model_id if len(model_id) <= 120 else model_id[:117] + "..."
    return BedrockError(
        "ValidationException",
        f"1 validation error detected: Value '{shown}' at 'modelId' failed to satisfy "
        f"constraint: {constraint}",
    )


def base_model_id(model_id: str) -> str:
    """The foundation-model id an id or ARN names, as far as it can be read from the id.

    ``us.anthropic.claude-3-haiku-20240307-v1:0`` and
    ``arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic...`` both give
    ``anthropic.claude-3-haiku-20240307-v1:0``; opaque ids (application inference
    profiles, provisioned models) come back unchanged.
    """
    if model_id.startswith("arn:"):
        _, _, resource = model_id.partition("/")
        if not resource:
            return model_id
        model_id = resource
    geo, dot, rest = model_id.partition(".")
    if dot and geo in _GEO_PREFIXES and "." in rest:
        return rest
    return model_id

"""Per-workload input-token budgets, and an upstream timeout that grows with input (incident 6).

A long chat history makes the model slow: past ~8,000 input tokens Sonnet needs 25–30 s and
the 29 s API Gateway in front of the caller gives up first. The budget stops that before the
call, either by refusing with a message that says what to shorten or by dropping whole turns
from the middle of the conversation, which is where the least useful context lives: the first
turn states the task, the latest turns hold the question being asked.

Token counts come from :mod:`proxy.admission.estimate` so a trimmed body is measured by the
same rules the admission gate uses; nothing here knows how characters map to tokens.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from proxy.admission.estimate import PER_MESSAGE_TOKENS, estimate, node_tokens
from proxy.config import InputBudget, UpstreamTimeout
from proxy.errors import BedrockError

# Float sums of 0.3-token characters drift by a few ULPs with summation order; plans may
# overshoot by this much because every plan is re-measured with estimate() before it is used.
_PLAN_TOLERANCE: Final = 1e-6


@dataclass(frozen=True, slots=True)
class Trimmed:
    """A request rewritten to fit its workload's input budget."""

    #: The re-serialised JSON body to send instead of the caller's.
    body: bytes
    #: estimate() of ``body``; never above the budget.
    input_tokens: int
    dropped_messages: int
    #: Estimated tokens removed (the original estimate minus ``input_tokens``).
    dropped_tokens: int


def enforce_budget(
    operation: str,
    doc: dict[str, Any],
    input_tokens: int,
    budget: InputBudget,
    *,
    workload: str,
) -> Trimmed | None:
    """Hold a request to ``budget``: None if it fits, a trimmed body, or a ValidationException.

    ``doc`` is the parsed body of an InvokeModel (Anthropic Messages) or Converse call and
    ``input_tokens`` its estimate. ``doc`` is never mutated.
    """
    limit = budget.max_input_tokens
    if input_tokens <= limit:
        return None
    if budget.on_exceed == "refuse":
        raise BedrockError(
            "ValidationException",
            f"{_over(workload, input_tokens, limit)}. "
            "Shorten the conversation or ask for trimming.",
        )
    return _trim(operation, doc, input_tokens, limit, workload)


def upstream_timeout(input_tokens: int, cfg: UpstreamTimeout | None, default_s: float) -> float:
    """Read timeout for a call of ``input_tokens``: base + per 1K tokens, capped; else default."""
    if cfg is None:
        return default_s
    grown = cfg.base_seconds + cfg.per_1k_input_tokens_seconds * max(0, input_tokens) / 1000
    return min(cfg.max_seconds, grown)


def _over(workload: str, input_tokens: int, limit: int) -> str:
    return (
        f"Input is ~{input_tokens:,} tokens; workload '{workload}' allows {limit:,} "
        f"(workloads.{workload}.input_budget.max_input_tokens)"
    )


def _trim(
    operation: str, doc: dict[str, Any], input_tokens: int, limit: int, workload: str
) -> Trimmed:
    """Drop the middle of the conversation; keep the longest tail that fits."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or len(messages) < 3:
        raise _cannot_trim(workload, input_tokens, limit, "it has no middle turns to drop")
    costs = [node_tokens(m) + PER_MESSAGE_TOKENS for m in messages]
    prefix = [0.0, *itertools.accumulate(costs)]
    total = prefix[-1]
    # Everything outside `messages` (system prompt, tool definitions) stays as it is.
    fixed = node_tokens({k: v for k, v in doc.items() if k != "messages"})
    smallest: float | None = None
    for head, tail in _cuts(messages):
        planned = fixed + prefix[head] + total - prefix[tail]
        smallest = planned if smallest is None else min(smallest, planned)
        if planned > limit + _PLAN_TOLERANCE:
            continue
        body = orjson.dumps({**doc, "messages": messages[:head] + messages[tail:]})
        tokens = estimate(operation, body).input_tokens
        if tokens <= limit:  # the plan is re-measured, so float drift can never overrun
            return Trimmed(body, tokens, tail - head, input_tokens - tokens)
    if smallest is None:
        why = (
            "no turn in the middle can be dropped and leave a valid conversation (user first, "
            "roles alternating, each toolResult right after its toolUse)"
        )
    else:
        why = (
            "even the shortest valid conversation (system prompt, tools, first turn, latest "
            f"turn) comes to ~{math.ceil(smallest):,} tokens"
        )
    raise _cannot_trim(workload, input_tokens, limit, why)


def _cannot_trim(workload: str, input_tokens: int, limit: int, why: str) -> BedrockError:
    return BedrockError(
        "ValidationException",
        f"{_over(workload, input_tokens, limit)}, and trimming could not fit it: {why}. "
        "Shorten the system prompt or the latest turn.",
    )


def _cuts(messages: Sequence[Any]) -> Iterator[tuple[int, int]]:
    """Valid ``(head, tail)`` cuts, longest kept tail first: keep ``[:head] + [tail:]``.

    Valid means: the first and last messages stay (``1 <= head < tail < len``), roles
    alternate across the join, and no cut falls between a toolUse and the toolResult
    answering it (Bedrock answers such a conversation with a ValidationException).
    """
    n = len(messages)
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    uses = [_has_block(m, "toolUse", "tool_use") for m in messages]
    results = [_has_block(m, "toolResult", "tool_result") for m in messages]
    cuttable = [0 < i < n and not uses[i - 1] and not results[i] for i in range(n + 1)]
    heads = [h for h in range(1, n - 1) if cuttable[h]]
    if not heads:
        return
    # The shortest head is heads[0]; when its last role equals the tail's first role,
    # the shortest head that ends on the other role is the next one to differ.
    first = heads[0]
    other = next((h for h in heads if roles[h - 1] != roles[first - 1]), None)
    for tail in range(first + 1, n):
        if not cuttable[tail]:
            continue
        head = first if roles[first - 1] != roles[tail] else other
        if head is not None and head < tail:
            yield head, tail


def _has_block(message: Any, converse_key: str, anthropic_type: str) -> bool:
    """Whether a message holds a Converse ``{converse_key: ...}`` or Anthropic typed block."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return False
    return any(
        isinstance(block, dict) and (converse_key in block or block.get("type") == anthropic_type)
        for block in content
    )

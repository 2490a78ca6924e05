"""Input-token budgets: refusal wording, middle-of-conversation trimming, timeout arithmetic."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from proxy.admission.estimate import estimate
from proxy.config import InputBudget, UpstreamTimeout
from proxy.errors import BedrockError
from proxy.pipeline.budget import Trimmed, enforce_budget, upstream_timeout

SHAPES = ("anthropic", "converse")
OPERATION = {"anthropic": "InvokeModel", "converse": "Converse"}

# Graphemes as a reader sees them: kana, kanji, fullwidth, a ZWJ family, a flag, a skin-toned
# emoji, a combining accent, plus ASCII, so trimming is measured by the CJK-aware estimate.
PIECES = [
    "a",
    "Z",
    " ",
    "7",
    ".",
    "こ",
    "ん",
    "漫",
    "画",
    "！",
    "😀",
    "👨\u200d👩\u200d👧",
    "🇯🇵",
    "👍🏽",
    "e\u0301",
]
texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=60).map("".join)


# --- body builders -------------------------------------------------------------------------


def text_block(shape: str, text: str) -> dict[str, Any]:
    return {"type": "text", "text": text} if shape == "anthropic" else {"text": text}


def image_block(shape: str) -> dict[str, Any]:
    if shape == "anthropic":
        source = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
        return {"type": "image", "source": source}
    return {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}}


def tool_use(shape: str, tool_id: str) -> dict[str, Any]:
    call = {"name": "stock", "input": {"title": "ワンピース"}}
    if shape == "anthropic":
        return {"type": "tool_use", "id": tool_id, **call}
    return {"toolUse": {"toolUseId": tool_id, **call}}


def tool_result(shape: str, tool_id: str, text: str) -> dict[str, Any]:
    if shape == "anthropic":
        content = [{"type": "text", "text": text}]
        return {"type": "tool_result", "tool_use_id": tool_id, "content": content}
    return {"toolResult": {"toolUseId": tool_id, "content": [{"text": text}]}}


def message(shape: str, role: str, text: str, *, as_string: bool = False) -> dict[str, Any]:
    if shape == "anthropic" and as_string:
        return {"role": role, "content": text}
    return {"role": role, "content": [text_block(shape, text)]}


def document(shape: str, system: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    if shape == "anthropic":
        return {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 512,
            "system": system,
            "messages": messages,
        }
    return {
        "system": [{"text": system}],
        "messages": messages,
        "inferenceConfig": {"maxTokens": 512},
    }


def tokens_of(shape: str, doc: dict[str, Any]) -> int:
    return estimate(OPERATION[shape], orjson.dumps(doc)).input_tokens


@st.composite
def conversations(draw: st.DrawFn, shape: str) -> dict[str, Any]:
    """A valid conversation: user first, roles alternating, every toolUse answered next."""
    ids = (f"tooluse_{i}" for i in itertools.count())
    as_string = shape == "anthropic" and draw(st.booleans())
    first = message(shape, "user", draw(texts), as_string=as_string)
    if draw(st.integers(0, 5)) == 0:
        first["content"] = [image_block(shape), text_block(shape, draw(texts))]
    messages = [first]
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            tool_id = next(ids)
            reply = [text_block(shape, draw(texts)), tool_use(shape, tool_id)]
            messages.append({"role": "assistant", "content": reply})
            answer = [tool_result(shape, tool_id, draw(texts))]
            messages.append({"role": "user", "content": answer})
        else:
            messages.append(message(shape, "assistant", draw(texts), as_string=as_string))
            messages.append(message(shape, "user", draw(texts), as_string=as_string))
    if draw(st.booleans()):  # an assistant prefill as the last message
        messages.append(message(shape, "assistant", draw(texts), as_string=as_string))
    return document(shape, draw(texts), messages)


# --- an independent judge of a conversation ----------------------------------------------


def _ids(msg: dict[str, Any], converse_key: str, anthropic_type: str, id_key: str) -> set[str]:
    content = msg["content"]
    if not isinstance(content, list):
        return set()
    found = set()
    for block in content:
        if converse_key in block:
            found.add(block[converse_key]["toolUseId"])
        elif block.get("type") == anthropic_type:
            found.add(block[id_key])
    return found


def use_ids(msg: dict[str, Any]) -> set[str]:
    return _ids(msg, "toolUse", "tool_use", "id")


def result_ids(msg: dict[str, Any]) -> set[str]:
    return _ids(msg, "toolResult", "tool_result", "tool_use_id")


def is_valid(messages: list[dict[str, Any]]) -> bool:
    """What Bedrock demands: user first, alternation, every toolUse answered in the next turn."""
    if not messages or messages[0]["role"] != "user":
        return False
    if any(a["role"] == b["role"] for a, b in itertools.pairwise(messages)):
        return False
    for i, msg in enumerate(messages):
        answered = result_ids(msg)
        if answered and (i == 0 or use_ids(messages[i - 1]) != answered):
            return False
        asked = use_ids(msg)
        if asked and i + 1 < len(messages) and result_ids(messages[i + 1]) != asked:
            return False
    return True


def best_cut(shape: str, doc: dict[str, Any], limit: int) -> tuple[int, int] | None:
    """Brute force: the (head, tail) keeping the most latest turns, then the fewest early ones."""
    messages = doc["messages"]
    for tail in range(2, len(messages)):
        for head in range(1, tail):
            kept = messages[:head] + messages[tail:]
            if is_valid(kept) and tokens_of(shape, {**doc, "messages": kept}) <= limit:
                return head, tail
    return None


# --- properties --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.data(), shape=st.sampled_from(SHAPES))
def test_trimming_keeps_the_best_valid_conversation_that_fits(
    data: st.DataObject, shape: str
) -> None:
    doc = data.draw(conversations(shape))
    original = copy.deepcopy(doc)
    tokens = tokens_of(shape, doc)
    # Half the draws land where trimming usually succeeds, the rest anywhere.
    limit = data.draw(
        st.integers(min_value=max(1, tokens // 2), max_value=tokens)
        | st.integers(min_value=1, max_value=tokens + 50)
    )
    budget = InputBudget(max_input_tokens=limit, on_exceed="trim")
    expected = best_cut(shape, doc, limit) if tokens > limit else None
    try:
        result = enforce_budget(OPERATION[shape], doc, tokens, budget, workload="chat")
    except BedrockError as exc:
        event("refused")
        assert tokens > limit and expected is None
        assert exc.status == 400 and exc.error_type == "ValidationException"
        assert "trimming could not fit it" in exc.message
        return
    finally:
        assert doc == original  # the caller's parsed body is never mutated
    if tokens <= limit:
        event("within budget")
        assert result is None
        return
    event("trimmed")
    assert isinstance(result, Trimmed) and expected is not None
    head, tail = expected
    trimmed = orjson.loads(result.body)
    messages = doc["messages"]
    assert trimmed["messages"] == messages[:head] + messages[tail:]
    assert {k: v for k, v in trimmed.items() if k != "messages"} == {
        k: v for k, v in doc.items() if k != "messages"
    }
    assert is_valid(trimmed["messages"])
    assert trimmed["messages"][0] == messages[0] and trimmed["messages"][-1] == messages[-1]
    assert result.input_tokens == tokens_of(shape, trimmed) <= limit
    assert result.dropped_messages == tail - head
    assert result.dropped_tokens == tokens - result.input_tokens > 0
    # Idempotent: the trimmed body is within budget, so trimming it again changes nothing.
    again = enforce_budget(OPERATION[shape], trimmed, result.input_tokens, budget, workload="chat")
    assert again is None


@settings(max_examples=100, deadline=None)
@given(data=st.data(), shape=st.sampled_from(SHAPES), trim=st.booleans())
def test_request_within_budget_passes_untouched(
    data: st.DataObject, shape: str, trim: bool
) -> None:
    doc = data.draw(conversations(shape))
    tokens = tokens_of(shape, doc)
    budget = InputBudget(max_input_tokens=tokens, on_exceed="trim" if trim else "refuse")
    assert enforce_budget(OPERATION[shape], doc, tokens, budget, workload="chat") is None


# --- refusals ----------------------------------------------------------------------------


def test_refusal_names_workload_estimate_budget_and_policy_field() -> None:
    doc = document("converse", "You are a shop assistant.", [message("converse", "user", "hi")])
    with pytest.raises(BedrockError) as info:
        enforce_budget("Converse", doc, 8214, InputBudget(max_input_tokens=6000), workload="chat")
    assert info.value.status == 400
    assert info.value.error_type == "ValidationException"
    assert info.value.message == (
        "Input is ~8,214 tokens; workload 'chat' allows 6,000 "
        "(workloads.chat.input_budget.max_input_tokens). "
        "Shorten the conversation or ask for trimming."
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_trim_refuses_when_first_and_latest_turns_alone_exceed_budget(shape: str) -> None:
    big = "漫画" * 500
    turns = [
        message(shape, "user", big),
        message(shape, "assistant", "ok"),
        message(shape, "user", "and?"),
        message(shape, "assistant", "sure"),
        message(shape, "user", big),
    ]
    doc = document(shape, "sys", turns)
    tokens = tokens_of(shape, doc)
    smallest = min(
        tokens_of(shape, {**doc, "messages": [turns[0], turns[3], turns[4]]}),
        tokens_of(shape, {**doc, "messages": [turns[0], turns[1], turns[4]]}),
    )
    budget = InputBudget(max_input_tokens=2000, on_exceed="trim")
    with pytest.raises(BedrockError) as info:
        enforce_budget(OPERATION[shape], doc, tokens, budget, workload="chat")
    assert info.value.status == 400
    assert info.value.message == (
        f"Input is ~{tokens:,} tokens; workload 'chat' allows 2,000 "
        "(workloads.chat.input_budget.max_input_tokens), and trimming could not fit it: "
        "even the shortest valid conversation (system prompt, tools, first turn, latest turn) "
        f"comes to ~{smallest:,} tokens. Shorten the system prompt or the latest turn."
    )


def test_trim_refuses_a_body_without_a_conversation() -> None:
    doc = {"inputText": "漫画" * 100, "textGenerationConfig": {"maxTokenCount": 100}}
    budget = InputBudget(max_input_tokens=10, on_exceed="trim")
    with pytest.raises(BedrockError, match="trimming could not fit it: it has no middle turns"):
        enforce_budget("InvokeModel", doc, 300, budget, workload="titan-batch")


@pytest.mark.parametrize("shape", SHAPES)
def test_trim_refuses_when_no_middle_turn_can_go(shape: str) -> None:
    # Dropping the only middle turn would leave two user turns in a row (or an orphaned
    # toolResult); nothing shorter is a valid conversation.
    turns = [
        message(shape, "user", "is One Piece 107 in stock?"),
        {"role": "assistant", "content": [tool_use(shape, "t1")]},
        {"role": "user", "content": [tool_result(shape, "t1", "在庫あり" * 300)]},
    ]
    doc = document(shape, "sys", turns)
    tokens = tokens_of(shape, doc)
    budget = InputBudget(max_input_tokens=100, on_exceed="trim")
    with pytest.raises(BedrockError, match="no turn in the middle can be dropped and leave a"):
        enforce_budget(OPERATION[shape], doc, tokens, budget, workload="chat")


# --- trimming, by example ----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_trim_drops_tool_use_and_result_together(shape: str) -> None:
    turns = [
        message(shape, "user", "おすすめの漫画は？"),
        {"role": "assistant", "content": [tool_use(shape, "t1")]},
        {"role": "user", "content": [tool_result(shape, "t1", "在庫あり" * 300)]},
        message(shape, "assistant", "ワンピースがあります。"),
        message(shape, "user", "他には？😀"),
    ]
    doc = document(shape, "You are a manga shop assistant.", turns)
    tokens = tokens_of(shape, doc)
    budget = InputBudget(max_input_tokens=200, on_exceed="trim")
    result = enforce_budget(OPERATION[shape], doc, tokens, budget, workload="chat")
    assert result is not None
    kept = orjson.loads(result.body)["messages"]
    # Keeping the reply at index 3 would leave the toolResult or the toolUse orphaned.
    assert kept == [turns[0], turns[3], turns[4]]
    assert result.dropped_messages == 2
    assert result.input_tokens <= 200


def test_trim_keeps_first_reply_when_alternation_needs_it() -> None:
    shape = "anthropic"
    turns = [message(shape, "user", "最初の質問", as_string=True)]
    for i in range(6):
        answer = "あ" * (1000 if i == 5 else 10)
        turns.append(message(shape, "assistant", f"answer {i} {answer}", as_string=True))
        turns.append(message(shape, "user", f"question {i}", as_string=True))
    doc = document(shape, "sys", turns)
    tokens = tokens_of(shape, doc)
    # The last answer is too long to keep, so the tail starts at the last question and the
    # first reply has to stay to keep user/assistant alternating.
    fits = tokens_of(shape, {**doc, "messages": [turns[0], turns[1], turns[-1]]})
    budget = InputBudget(max_input_tokens=fits, on_exceed="trim")
    result = enforce_budget(OPERATION[shape], doc, tokens, budget, workload="chat")
    assert result is not None
    assert orjson.loads(result.body)["messages"] == [turns[0], turns[1], turns[-1]]
    assert result.dropped_messages == 10


# --- upstream timeout --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "seconds"),
    [(0, 10.0), (1_000, 11.0), (6_000, 16.0), (8_214, 18.214), (15_000, 25.0), (120_000, 25.0)],
)
def test_upstream_timeout_grows_with_input_up_to_the_cap(tokens: int, seconds: float) -> None:
    assert upstream_timeout(tokens, UpstreamTimeout(), 300.0) == pytest.approx(seconds)


def test_upstream_timeout_uses_the_configured_figures() -> None:
    cfg = UpstreamTimeout(base_seconds=2.0, per_1k_input_tokens_seconds=0.5, max_seconds=4.0)
    assert upstream_timeout(2_000, cfg, 300.0) == pytest.approx(3.0)
    assert upstream_timeout(10_000, cfg, 300.0) == 4.0


def test_upstream_timeout_without_policy_is_the_server_default() -> None:
    assert upstream_timeout(50_000, None, 300.0) == 300.0

"""Sluice's input estimate against the simulator's count of the same Converse bodies.

They model one thing (the input tokens Bedrock will charge) with different rules on purpose:
the estimator errs high (0.3 tokens per ASCII character, 4 per message) so reservations are
rarely short; the simulator stands for the model (0.25 per ASCII character, nothing per
message, 2 per emoji code point). Measured on the corpus below: the estimate is 0.96-1.38x
the simulator's count; this test keeps it inside 0.9-1.5x.
"""

from __future__ import annotations

import json

import pytest

from proxy.admission.estimate import estimate
from proxy.simulator.config import ModelConfig
from proxy.simulator.parsing import converse_call

SYSTEM = [{"text": "You are a helpful manga shop assistant."}]
CORPUS = {
    "english": "Could you recommend a few manga series like One Piece for a teenager? " * 5,
    "japanese": "ワンピースに似た冒険ものの漫画を、十代の読者向けにいくつか教えてください。" * 5,
    "mixed-emoji": "おすすめの漫画は？📚 I like action and 冒険 stories 🏴‍☠️ " * 5,
}
TURNS = [
    {"role": "user", "content": [{"text": "Hello, I want a manga."}]},
    {"role": "assistant", "content": [{"text": "Sure, which genre do you like?"}]},
    {"role": "user", "content": [{"text": "冒険もの、お願いします。"}]},
]


def _ratio(messages: list[dict[str, object]]) -> float:
    doc = {"messages": messages, "system": SYSTEM}
    body = json.dumps(doc, ensure_ascii=False).encode()
    simulated = converse_call(doc, ModelConfig(), 40).input_tokens
    return estimate("Converse", body).input_tokens / simulated


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_estimate_stays_close_to_the_simulators_count(text: str) -> None:
    assert 0.9 <= _ratio([{"role": "user", "content": [{"text": text}]}]) <= 1.5


def test_per_message_framing_is_where_they_differ_most() -> None:
    assert 1.2 <= _ratio(TURNS) <= 1.5

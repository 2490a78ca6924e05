"""Incident 6: long chat histories push Sonnet past the 29 s gateway timeout.

Replayed against the simulator's latency model (time to first token grows with input):
Sluice enforces a per-workload input budget before the call — trimming the middle of
the conversation or refusing with a precise error — and bounds the upstream wait in
proportion to the input it lets through.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.processes import Simulator, Sluice, bedrock_client, metric_value

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
TURN = "この漫画の続きはいつ発売されますか？在庫も知りたいです。📚 " * 12  # ~36 chars × 12


def history(turns: int) -> list[dict[str, Any]]:
    messages = []
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": [{"text": f"{i}: {TURN}"}]})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": [{"text": "最後の質問です"}]})
    return messages


POLICY: dict[str, Any] = {
    "identity": {"header_mode": True},
    "server": {
        "upstream_timeout": {
            "base_seconds": 0.4,
            "per_1k_input_tokens_seconds": 0.1,
            "max_seconds": 0.9,
        },
        "retry": {"max_retries": 0},
    },
    "models": {"sonnet": {"ids": [SONNET]}},
    "workloads": {
        "chat": {"input_budget": {"max_input_tokens": 6000, "on_exceed": "trim"}},
        "strict": {"input_budget": {"max_input_tokens": 6000, "on_exceed": "refuse"}},
        "open": {},
    },
}


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory: pytest.TempPathFactory) -> Any:
    sim = Simulator(tmp_path_factory.mktemp("sim6"), {"latency_scale": 0.1})
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def proxy(slow_sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = Sluice(tmp_path_factory.mktemp("p6"), upstream=slow_sim.url, policy=POLICY)
    yield p
    p.stop()


def client_as(url: str, workload: str) -> Any:
    client = bedrock_client(url, read_timeout=30)
    client.meta.events.register(
        "before-sign.bedrock-runtime.*",
        lambda request, **_: request.headers.__setitem__("x-sluice-workload", workload),
    )
    return client


def test_oversized_history_is_trimmed_keeping_first_and_latest_turns(
    proxy: Sluice, slow_sim: Simulator
) -> None:
    messages = history(41)
    resp = client_as(proxy.url, "chat").converse(
        modelId=SONNET, system=[{"text": "You are the manga store assistant."}], messages=messages
    )
    headers = resp["ResponseMetadata"]["HTTPHeaders"]
    dropped = int(headers["x-sluice-trimmed"].removeprefix("messages="))
    assert dropped > 0
    # The simulator saw the trimmed conversation: far fewer input tokens than the original.
    assert resp["usage"]["inputTokens"] < 6000
    record = proxy.log_record(headers["x-sluice-request-id"])
    assert record["trimmed_messages"] == dropped and record["input_tokens"] <= 6000
    assert metric_value(proxy.metrics(), "sluice_trimmed_total", workload="chat") >= 1


def test_oversized_history_is_refused_with_a_precise_error(proxy: Sluice) -> None:
    with pytest.raises(ClientError) as err:
        client_as(proxy.url, "strict").converse(modelId=SONNET, messages=history(41))
    error = err.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert "workload 'strict' allows 6,000" in error["Message"]
    assert "workloads.strict.input_budget.max_input_tokens" in error["Message"]


def test_upstream_timeout_grows_with_input_and_is_capped(
    proxy: Sluice, slow_sim: Simulator
) -> None:
    client = client_as(proxy.url, "open")
    # A short prompt: TTFT ~0.1 s, timeout 0.4 s + 0.1 s per 1K tokens: it answers.
    client.converse(modelId=SONNET, messages=history(1))
    # A ~10K-token prompt: TTFT ~1.3 s at this latency scale; the timeout is capped at
    # 0.9 s, so Sluice gives up at the cap instead of holding the caller to the gateway's.
    started = time.monotonic()
    with pytest.raises(ClientError) as err:
        client.converse(modelId=SONNET, messages=history(41))
    elapsed = time.monotonic() - started
    assert err.value.response["Error"]["Code"] == "ModelTimeoutException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 408
    assert 0.8 <= elapsed < 2.0

"""The degradation chain over real sockets: downgrade, cached answer, template, coalescing."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.processes import ROOT, Simulator, Sluice, metric_value, workload_client

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
TEMPLATE = "Our assistant is busy right now; please try again in a minute."


def policy(tag: str) -> dict[str, Any]:
    # Sonnet admits one request per minute: the second one must degrade (or be refused).
    return {
        "identity": {"header_mode": True},
        "server": {"retry": {"max_retries": 0}},
        "models": {
            f"sonnet{tag}": {
                "ids": [SONNET],
                "requests_per_minute": 1,
                "burst_requests": 1,
                "downgrade_to": f"haiku{tag}",
            },
            f"haiku{tag}": {"ids": [HAIKU], "requests_per_minute": 600},
        },
        "workloads": {
            "chat": {"degrade": [f"haiku{tag}"]},
            "faq": {
                "cache": {"ttl_seconds": 60},
                "degrade": ["cached", "template"],
                "template": {"text": TEMPLATE},
            },
            "strict": {},
        },
    }


@pytest.fixture
def stack(redis_server: Any, sim: Simulator, make_sluice: Any) -> tuple[Sluice, str]:
    tag = uuid.uuid4().hex[:8]
    return make_sluice(upstream=sim.url, policy=policy(tag), redis_url=redis_server.url), tag


def msgs(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"text": text}]}]


def test_refused_sonnet_call_is_served_by_haiku_when_allowed(
    stack: tuple[Sluice, str], sim: Simulator
) -> None:
    proxy, tag = stack
    client = workload_client(proxy.url, "chat")
    first = client.converse(modelId="us." + SONNET, messages=msgs("hi"))
    assert "x-sluice-degraded" not in first["ResponseMetadata"]["HTTPHeaders"]
    second = client.converse(modelId="us." + SONNET, messages=msgs("hi again"))
    h = second["ResponseMetadata"]["HTTPHeaders"]
    assert h["x-sluice-degraded"] == "downgrade"
    assert h["x-sluice-served-model"] == "us." + HAIKU  # the caller's profile prefix is kept
    assert h["x-sluice-pool"] == f"haiku{tag}"
    paths = [r["path"] for r in sim.stats()["requests"]]
    assert paths[-1] == "/model/us.anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    # Streams degrade too, and stay parseable.
    events = list(client.converse_stream(modelId=SONNET, messages=msgs("go"))["stream"])
    assert any("contentBlockDelta" in e for e in events)
    assert metric_value(proxy.metrics(), "sluice_degraded_total", kind="downgrade") == 2


def test_workload_without_a_chain_is_refused_not_downgraded(
    stack: tuple[Sluice, str], sim: Simulator
) -> None:
    proxy, _ = stack
    client = workload_client(proxy.url, "strict")
    client.converse(modelId=SONNET, messages=msgs("hi"))
    with pytest.raises(ClientError) as err:
        client.converse(modelId=SONNET, messages=msgs("hi"))
    assert err.value.response["Error"]["Code"] == "ThrottlingException"
    assert all("haiku" not in r["path"] for r in sim.stats()["requests"])


def test_cached_answer_then_template_when_the_pool_refuses(stack: tuple[Sluice, str]) -> None:
    proxy, _ = stack
    client = workload_client(proxy.url, "faq")
    fresh = client.converse(modelId=SONNET, messages=msgs("store hours?"))
    text = fresh["output"]["message"]["content"][0]["text"]
    cached = client.converse(modelId=SONNET, messages=msgs("store hours?"))
    assert cached["ResponseMetadata"]["HTTPHeaders"]["x-sluice-degraded"] == "cache"
    assert cached["output"]["message"]["content"][0]["text"] == text
    # The same question, streamed, comes back from the cache as an event stream.
    streamed = client.converse_stream(modelId=SONNET, messages=msgs("store hours?"))
    deltas = [
        e["contentBlockDelta"]["delta"]["text"]
        for e in streamed["stream"]
        if "contentBlockDelta" in e
    ]
    assert "".join(deltas) == text
    other = client.converse(modelId=SONNET, messages=msgs("something never asked"))
    h = other["ResponseMetadata"]["HTTPHeaders"]
    assert h["x-sluice-degraded"] == "template"
    assert other["output"]["message"]["content"][0]["text"] == TEMPLATE
    body = json.dumps(
        {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "new"}],
        }
    ).encode()
    native = json.loads(client.invoke_model(modelId=SONNET, body=body)["body"].read())
    assert native["content"][0]["text"] == TEMPLATE and native["model"] == "sluice-template"
    text_m = proxy.metrics()
    assert metric_value(text_m, "sluice_degraded_total", kind="cache") == 2
    assert metric_value(text_m, "sluice_degraded_total", kind="template") == 2


def test_identical_cacheable_requests_in_flight_make_one_upstream_call(
    redis_server: Any, make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"latency_scale": 1.0})
    tag = uuid.uuid4().hex[:8]
    proxy = make_sluice(upstream=sim.url, policy=policy(tag), redis_url=redis_server.url)
    client = workload_client(proxy.url, "faq")
    with ThreadPoolExecutor(12) as pool:
        results = list(
            pool.map(
                lambda _: client.converse(modelId=HAIKU, messages=msgs("opening hours today?")),
                range(12),
            )
        )
    texts = {r["output"]["message"]["content"][0]["text"] for r in results}
    assert len(texts) == 1
    assert sim.stats()["models"][HAIKU]["requests"] == 1
    shared = [r for r in results if r["ResponseMetadata"]["HTTPHeaders"].get("x-sluice-coalesced")]
    assert len(shared) == 11
    assert metric_value(proxy.metrics(), "sluice_coalesced_total", workload="faq") == 11


def test_cache_warm_prefills_answers_served_under_pressure(
    redis_server: Any, sim: Simulator, make_sluice: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    pol = policy(tag)
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(json.dumps(pol))
    request = {"messages": msgs("is the sale on?")}
    answer = {
        "output": {"message": {"role": "assistant", "content": [{"text": "Yes, 30% off!"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 5, "outputTokens": 4, "totalTokens": 9},
        "metrics": {"latencyMs": 1},
    }
    lines = [
        json.dumps(
            {
                "workload": "faq",
                "model_pool": f"sonnet{tag}",
                "operation": "Converse",
                "request": request,
                "response": answer,
            }
        ),
        json.dumps(
            {
                "workload": "nobody",
                "model_pool": f"sonnet{tag}",
                "operation": "Converse",
                "request": request,
                "response": answer,
            }
        ),
        "{not json",
    ]
    warm_file = tmp_path / "warm.jsonl"
    warm_file.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "cache",
            "warm",
            str(warm_file),
            "--redis-url",
            redis_server.url,
            "--config",
            str(policy_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 1  # two bad lines, reported by number
    assert "1 of 3 lines stored" in out.stdout
    assert f"{warm_file}:2:" in out.stderr and f"{warm_file}:3:" in out.stderr
    proxy = make_sluice(upstream=sim.url, policy=pol, redis_url=redis_server.url)
    client = workload_client(proxy.url, "faq")
    client.converse(modelId=SONNET, messages=msgs("use up the quota"))
    served = client.converse(modelId=SONNET, messages=msgs("is the sale on?"))
    assert served["ResponseMetadata"]["HTTPHeaders"]["x-sluice-degraded"] == "cache"
    assert served["output"]["message"]["content"][0]["text"] == "Yes, 30% off!"

"""Bedrock clients other than boto3, pointed at Sluice: the Anthropic SDK's ``AnthropicBedrock``.

It signs with SigV4 itself, leaves ``:`` unencoded in the model id, parses the event stream
with its own decoder and retries 429s using ``retry-after-ms``: each of those must work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.processes import Simulator, Sluice, metric_value

anthropic = pytest.importorskip("anthropic")

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"


def _client(url: str, **kwargs: Any) -> Any:
    return anthropic.AnthropicBedrock(
        base_url=url,
        aws_access_key="AKIDCLIENTDEMO",
        aws_secret_key="client-secret",
        aws_region="us-east-1",
        **kwargs,
    )


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sluice]:
    p = Sluice(tmp_path_factory.mktemp("sdk"), upstream=simulator.url)
    yield p
    p.stop()


def test_messages_create(proxy: Sluice, sim: Simulator) -> None:
    msg = _client(proxy.url).messages.create(
        model=HAIKU, max_tokens=40, messages=[{"role": "user", "content": "こんにちは 👋"}]
    )
    assert msg.type == "message" and msg.content[0].text
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    assert sim.stats()["models"][HAIKU]["requests"] == 1


def test_messages_stream(proxy: Sluice) -> None:
    with _client(proxy.url).messages.stream(
        model=HAIKU, max_tokens=40, messages=[{"role": "user", "content": "stream please"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == final.content[0].text
    assert final.usage.output_tokens > 0


def test_refusal_is_a_rate_limit_error_the_sdk_waits_out(
    sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    policy = {
        "version": 1,
        "identity": {"default_workload": "w"},
        "models": {"haiku": {"ids": [HAIKU], "requests_per_minute": 60, "burst_requests": 1}},
        "priorities": {"p": {"share": 1.0}},
        "workloads": {"w": {"priority": "p"}},
    }
    proxy = make_sluice(upstream=sim.url, policy=policy)
    ask = [{"role": "user", "content": "a"}]
    _client(proxy.url).messages.create(model=HAIKU, max_tokens=5, messages=ask)

    with pytest.raises(anthropic.RateLimitError) as err:
        _client(proxy.url, max_retries=0).messages.create(model=HAIKU, max_tokens=5, messages=ask)
    assert err.value.status_code == 429
    assert "requests/min" in str(err.value)
    wait_ms = int(err.value.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000

    # With retries on, the SDK sleeps for retry-after-ms and its retry is admitted.
    msg = _client(proxy.url, max_retries=2).messages.create(model=HAIKU, max_tokens=5, messages=ask)
    assert msg.content[0].text
    assert sim.stats()["models"][HAIKU]["requests"] == 2
    refused = metric_value(
        proxy.metrics(), "sluice_refused_total", limit="pool.requests_per_minute"
    )
    assert 1 <= refused <= 2

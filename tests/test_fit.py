"""What one request may reserve (issue 10, item 1), and the policy fields behind it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.admission.estimate import estimate
from proxy.admission.fit import refill_ms, reserve
from proxy.admission.gate import cap_retry_hint
from proxy.admission.model import Decision
from proxy.backend.store import open_store
from proxy.config import PolicyError, load_policy, parse_policy
from proxy.errors import BedrockError
from proxy.guard_errors import ProtocolLog
from proxy.policy import CompiledPolicy
from tests.support.admission_helpers import Backend

BAD = Path(__file__).resolve().parent / "policies"
SONNET4 = "anthropic.claude-sonnet-4-20250514-v1:0"


def compiled(**pool: object) -> CompiledPolicy:
    doc = {
        "models": {"sonnet4": {"ids": [SONNET4], "tokens_per_minute": 60_000, **pool}},
        "workloads": {"chat": {"limits": {"*": {"tokens_per_minute": 600_000}}}},
    }
    return CompiledPolicy(parse_policy(doc))


def converse(max_tokens: int) -> bytes:
    return (
        b'{"messages":[{"role":"user","content":[{"text":"hi"}]}],'
        b'"inferenceConfig":{"maxTokens":%d}}' % max_tokens
    )


def test_output_cap_is_reserved_up_to_the_models_ceiling_only() -> None:
    policy = compiled(max_output_tokens=2048)
    pool = policy.resolve_pool(SONNET4)
    plan = policy.plan(policy.workloads["chat"], pool, "default")
    est = estimate("Converse", converse(2**62))
    assert reserve(plan, pool, est.input_tokens, est) == est.input_tokens + 2048


def test_reservation_no_bucket_can_hold_is_a_400_naming_limit_and_field() -> None:
    policy = compiled()  # 60,000 tokens/min: a 10,000-token bucket, no declared ceiling
    pool = policy.resolve_pool(SONNET4)
    plan = policy.plan(policy.workloads["chat"], pool, "default")
    est = estimate("Converse", converse(2**62))
    with pytest.raises(BedrockError) as info:
        reserve(plan, pool, est.input_tokens, est)
    assert info.value.status == 400 and info.value.error_type == "ValidationException"
    assert "pool.tokens_per_minute" in info.value.message
    assert "inferenceConfig.maxTokens" in info.value.message
    assert "(10000 tokens)" in info.value.message


def test_reservation_over_the_burst_is_clipped_when_each_part_fits() -> None:
    # Input and output cap each fit the 10,000-token bucket, their sum does not: the call
    # is admitted on a full bucket (no debt beyond it) and settled to real usage.
    policy = compiled()
    pool = policy.resolve_pool(SONNET4)
    plan = policy.plan(policy.workloads["chat"], pool, "default")
    text = "word " * 4_000  # ~6,000 tokens
    body = b'{"messages":[{"role":"user","content":[{"text":"%s"}]}],' % text.encode()
    est = estimate("Converse", body + b'"inferenceConfig":{"maxTokens":9000}}')
    assert est.input_tokens > 5000
    assert reserve(plan, pool, est.input_tokens, est) == 10_000
    # A long input alone is clipped too: Bedrock bounds it (context window), and real usage
    # is settled afterwards.
    est = estimate("Converse", body.replace(b"word", b"words words") + b'"system":[]}')
    assert est.input_tokens > 10_000
    assert reserve(plan, pool, est.input_tokens, est) == 10_000


def classes(share: float) -> CompiledPolicy:
    """sonnet4 with a token limit, a P0 class and a lower one."""
    doc = {
        "models": {"sonnet4": {"ids": [SONNET4], "tokens_per_minute": 6_000}},
        "priorities": {"P0": {"share": 1.0}, "low": {"share": share}},
        "workloads": {"chat": {"priority": "P0"}, "bulk": {"priority": "low"}},
    }
    return CompiledPolicy(parse_policy(doc))


@given(share=st.floats(0.05, 1.0), fraction=st.floats(0.0, 1.0))
def test_a_class_never_reserves_more_than_its_allowance(share: float, fraction: float) -> None:
    policy = classes(share)
    pool = policy.resolve_pool(SONNET4)
    plan = policy.plan(policy.workloads["bulk"], pool, "low")
    assert plan.pool_tokens is not None
    burst = plan.pool_tokens.burst
    max_tokens = max(1, int(fraction * (burst - 20)))  # any cap the bucket could hold
    est = estimate("Converse", converse(max_tokens))
    tokens = reserve(plan, pool, est.input_tokens, est)
    assert 1 <= tokens <= max(1, int(share * burst))
    if est.input_tokens + max_tokens * pool.output_weight <= share * burst:
        assert tokens == est.input_tokens + max_tokens * pool.output_weight  # nothing clipped


@pytest.mark.parametrize("backend", ["embedded", "redis"], indirect=True)
async def test_a_big_lower_class_call_leaves_p0_its_headroom(backend: Backend) -> None:
    """A "low" (share 0.4) call asking for 90% of the bucket reserved all of it on a full
    bucket, and P0 was then refused half the bucket, inside the 60% kept back for it.
    Clipped to its allowance, it leaves P0 its part."""
    policy = classes(0.4)
    pool = policy.resolve_pool(SONNET4)
    low = policy.plan(policy.workloads["bulk"], pool, "low")
    p0 = policy.plan(policy.workloads["chat"], pool, "P0")
    store = open_store(backend.url)
    await store.start()
    try:
        assert low.pool_tokens is not None
        burst = low.pool_tokens.burst
        est = estimate("Converse", converse(int(0.9 * burst)))
        big = reserve(low, pool, est.input_tokens, est)
        assert big <= 0.4 * burst
        assert (await store.admit(low, big)).admitted
        est = estimate("Converse", converse(int(0.5 * burst)))
        assert (await store.admit(p0, reserve(p0, pool, est.input_tokens, est))).admitted
    finally:
        await store.close()


def test_invoke_body_names_its_own_field() -> None:
    policy = compiled()
    pool = policy.resolve_pool(SONNET4)
    plan = policy.plan(policy.workloads["chat"], pool, "default")
    body = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":99999999,"messages":[]}'
    est = estimate("InvokeModel", body)
    with pytest.raises(BedrockError, match="lower max_tokens"):
        reserve(plan, pool, est.input_tokens, est)


def test_a_declared_ceiling_makes_the_default_burst_hold_one_whole_call() -> None:
    policy = compiled(max_output_tokens=64_000, output_token_weight=5)
    pool = policy.resolve_pool(SONNET4)
    plan = policy.plan(policy.workloads["chat"], pool, "default")
    assert plan.pool_tokens is not None and plan.pool_tokens.burst == 64_000 * 5
    est = estimate("Converse", converse(64_000))
    assert reserve(plan, pool, est.input_tokens, est) == 320_000  # clipped, not refused


@given(wait=st.integers(min_value=1, max_value=86_400_000))
def test_retry_hint_never_exceeds_the_refill_time_of_the_refusing_bucket(wait: int) -> None:
    policy = compiled()
    pool = policy.resolve_pool(SONNET4)
    plan = policy.plan(policy.workloads["chat"], pool, "default")
    full = refill_ms(plan, "pool.tokens_per_minute")
    assert full == pytest.approx(10_000.0)
    decision = Decision(False, None, "pool.tokens_per_minute", wait, None, 0, 0, 0, None, None)
    cap_retry_hint(plan, decision)
    assert decision.retry_after_ms == min(wait, 10_000)


def test_burst_that_cannot_hold_one_call_at_the_ceiling_is_a_policy_error() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(BAD / "bad-burst-below-max-output.yaml")
    text = str(info.value)
    assert "bad-burst-below-max-output.yaml: models.sonnet4" in text
    assert "max_output_tokens (64000)" in text


@pytest.mark.parametrize(
    ("connections", "message"),
    [
        ({"max_conections": 10}, "server.connections.max_conections: Extra inputs"),
        ({"header_timeout_seconds": 0}, "server.connections.header_timeout_seconds"),
        ({"max_header_line_bytes": 100}, "server.connections.max_header_line_bytes"),
    ],
)
def test_connection_limits_are_validated(connections: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace(".", r"\.")):
        parse_policy({"server": {"connections": connections}}, "p.yaml")


def test_protocol_warnings_are_rate_limited_and_report_what_they_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plog = ProtocolLog(burst=3, per_second=0.0)
    with caplog.at_level(logging.WARNING, logger="sluice.protocol"):
        for _ in range(10):
            plog.warn("bad_method", "10.0.0.1")
    assert len(caplog.records) == 3
    assert plog.suppressed == 7
    plog._level = 1.0  # the bucket refilled
    with caplog.at_level(logging.WARNING, logger="sluice.protocol"):
        plog.warn("bad_method", "10.0.0.1")
    assert caplog.records[-1].fields["suppressed"] == 7  # type: ignore[attr-defined]

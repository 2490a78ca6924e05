"""Real clients through Sluice and straight to the simulator, in the same run: what the
client gets back must not depend on whether Sluice is in between."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.processes import (
    UPSTREAM_KEY_ID,
    UPSTREAM_SECRET,
    Simulator,
    Sluice,
    bedrock_client,
)


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sluice]:
    p = Sluice(tmp_path_factory.mktemp("clients"), upstream=simulator.url)
    yield p
    p.stop()


def _both(sim: Simulator, proxy: Sluice) -> dict[str, Any]:
    """boto3 clients: straight to the simulator (its own key) and through Sluice."""
    return {
        "direct": bedrock_client(sim.url, key_id=UPSTREAM_KEY_ID, secret=UPSTREAM_SECRET),
        "sluice": bedrock_client(proxy.url),
    }


def test_invoke_guardrail_checks_passes_through(sim: Simulator, proxy: Sluice) -> None:
    # botocore's bedrock-runtime model has InvokeGuardrailChecks (POST /guardrail-checks/invoke);
    # Sluice answered it with its own 404 UnknownOperationException.
    sim.configure({"guardrail_blocked_words": ["forbidden"]})
    answers = {}
    for via, client in _both(sim, proxy).items():
        result = client.invoke_guardrail_checks(
            messages=[{"role": "user", "content": [{"text": "a forbidden question"}]}],
            checks={
                "promptAttack": {"categories": [{"category": "JAILBREAK"}]},
                "sensitiveInformation": {"entities": [{"type": "EMAIL"}]},
            },
        )
        assert result["ResponseMetadata"]["HTTPStatusCode"] == 200, via
        answers[via] = {k: v for k, v in result.items() if k != "ResponseMetadata"}
    assert answers["sluice"] == answers["direct"]
    attack = answers["sluice"]["results"]["promptAttack"]["results"]
    assert attack == [{"category": "JAILBREAK", "severityScore": 1.0}]

"""How Sluice runs: several workers on one port, Bedrock API keys upstream, async invoke."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tests.support.processes import ROOT, Sluice, _env, bedrock_client, free_port

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]


def test_workers_share_one_port_and_one_set_of_limits(
    redis_server: Any, simulator: Any, make_sluice: Any
) -> None:
    policy = {
        "identity": {"default_workload": "w"},
        "models": {"haiku": {"ids": [HAIKU], "requests_per_minute": 6, "burst_requests": 4}},
        "workloads": {"w": {}},
    }
    proxy: Sluice = make_sluice(
        upstream=simulator.url, policy=policy, redis_url=redis_server.url, workers=2
    )
    out = subprocess.run(
        ["pgrep", "-f", "--", f"--port {proxy.port} --workers 1 --reuse-port"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert len(out.stdout.split()) == 2  # two worker processes behind the one port
    codes = []
    for _ in range(8):  # new connections each time: the kernel spreads them over workers
        client = bedrock_client(proxy.url)
        try:
            client.converse(modelId=HAIKU, messages=MESSAGES)
            codes.append("ok")
        except Exception as exc:
            codes.append(type(exc).__name__)
    assert codes.count("ok") == 4  # the burst, once, across both workers


def test_workers_without_redis_refuse_to_start() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--workers",
            "2",
            "--port",
            str(free_port()),
            "--upstream",
            "simulator",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--workers > 1 needs --redis-url" in out.stderr


def test_bedrock_api_key_is_used_upstream_when_configured(
    make_simulator: Any, make_sluice: Any
) -> None:
    sim = make_simulator({"auth": {"bearer_token": "bedrock-api-key-123"}})
    proxy = make_sluice(upstream=sim.url, env={"AWS_BEARER_TOKEN_BEDROCK": "bedrock-api-key-123"})
    reply = bedrock_client(proxy.url).converse(modelId=HAIKU, messages=MESSAGES)
    assert reply["usage"]["outputTokens"] > 0
    seen = sim.stats()["requests"][-1]["headers"]
    assert seen["authorization"] == "Bearer bedrock-api-key-123"


def test_async_invoke_operations_pass_through(proxy_for_async: Sluice) -> None:
    client = bedrock_client(proxy_for_async.url)
    started = client.start_async_invoke(
        modelId=HAIKU,
        modelInput={"taskType": "TEXT_VIDEO", "textToVideoParams": {"text": "a manga panel"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://bucket/out/"}},
    )
    arn = started["invocationArn"]
    got = client.get_async_invoke(invocationArn=arn)
    assert got["invocationArn"] == arn
    listed = client.list_async_invokes()
    assert any(s["invocationArn"] == arn for s in listed["asyncInvokeSummaries"])


@pytest.fixture
def proxy_for_async(simulator: Any, make_sluice: Any) -> Sluice:
    return make_sluice(upstream=simulator.url)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("args", "env", "code", "said"),
    [
        (
            ["--upstream", "simulator", "--redis-url", "redis://127.0.0.1:1/0"],
            {},
            1,
            "sluice: cannot start: the quota store did not answer: cannot load scripts",
        ),
        (
            ["--upstream", "http://127.0.0.1:9"],
            {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
             "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"},
            2,
            "sluice: cannot start: no AWS credentials found for upstream Bedrock calls",
        ),
    ],
    ids=["redis-unreachable", "no-credentials"],
)  # fmt: skip
def test_a_start_that_cannot_work_says_why_in_one_line(
    args: list[str], env: dict[str, str], code: int, said: str
) -> None:
    cmd = [sys.executable, "-m", "proxy", "serve", "--port", str(free_port()), *args]
    done = subprocess.run(cmd, env=_env(env), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert said in done.stderr
    assert "Traceback" not in done.stderr

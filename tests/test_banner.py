"""The newcomer path: the example ``sluice serve`` prints works against the policy it serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.banner import banner
from proxy.config import load_policy, parse_policy
from tests.support.processes import ROOT, Sluice, metric_value

POLICIES = sorted((ROOT / "policies").glob("*.yaml"))


def _secret_env(path: Path) -> dict[str, str]:
    """A value for every environment variable the policy reads its secrets from."""
    policy = load_policy(path)
    refs = [k.secret for wl in policy.workloads.values() for k in wl.access_keys]
    refs += [ref for wl in policy.workloads.values() for ref in wl.api_keys]
    return {ref.env: f"secret-for-{ref.env.lower()}" for ref in refs if ref.env}


def _printed_example(proxy: Sluice, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while "Stop it with Ctrl-C." not in (text := proxy.stderr()):
        assert time.monotonic() < deadline, f"no banner in:\n{text}"
        time.sleep(0.05)
    lines = text[text.index("Sluice is listening") :].splitlines()
    return "\n".join(line[4:] for line in lines if line.startswith("    "))


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_the_banner_example_runs_against_each_shipped_policy(
    path: Path, make_sluice: Callable[..., Sluice]
) -> None:
    secrets = _secret_env(path)
    proxy = make_sluice(upstream="simulator", policy=str(path), env=secrets)
    code = _printed_example(proxy)
    assert f'endpoint_url="{proxy.url}"' in code
    assert not any(value in code for value in secrets.values())  # secrets are never printed
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **secrets},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_a_policy_nobody_can_call_says_what_to_configure() -> None:
    policy = parse_policy({"workloads": {"w": {}}})
    text = banner(policy, "p.yaml", "http://127.0.0.1:9000", "simulator", "embedded")
    assert "issues no SigV4 key" in text and "import boto3" not in text


def test_first_five_minutes_refusal_carries_retry_after_and_shows_in_metrics(
    make_sluice: Callable[..., Sluice],
) -> None:
    # The README's step 3: 8 calls at once as the demo's batch workload (4 concurrent allowed).
    proxy = make_sluice(upstream="simulator")  # the embedded demo policy, realistic latency
    url = f"{proxy.url}/model/anthropic.claude-3-haiku-20240307-v1:0/converse"
    body = json.dumps({"messages": [{"role": "user", "content": [{"text": "Hello!"}]}]}).encode()

    def call(_: int) -> tuple[int, str | None, str]:
        request = urllib.request.Request(url, data=body, method="POST")
        request.add_header("content-type", "application/json")
        request.add_header("x-sluice-workload", "batch")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, None, ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Retry-After"), exc.read().decode()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(8)))
    refused = [a for a in answers if a[0] == 429]
    assert refused and len(refused) <= 4
    assert all(retry == "1" and "concurrent requests" in msg for _, retry, msg in refused)
    assert metric_value(proxy.metrics(), "sluice_refused_total", workload="batch") == len(refused)

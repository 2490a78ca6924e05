"""The newcomer path: the example ``sluice serve`` prints works against the policy it serves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.banner import banner
from proxy.config import load_policy, parse_policy
from tests.support.processes import ROOT, Sluice

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

"""Single-instance hot reload: the --config file is watched, and SIGHUP re-reads it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from botocore.exceptions import ClientError

from tests.support.fleet_ops import HAIKU, call, policy_of, rate_policy
from tests.support.load import invoke_body
from tests.support.processes import Simulator, Sluice, bedrock_client, metric_value


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


async def statuses(proxy: Sluice, workload: str, n: int) -> list[int]:
    async with aiohttp.ClientSession() as session:
        return [(await call(session, proxy.url, workload))[0] for _ in range(n)]


def test_file_change_and_sighup_switch_a_single_instance(
    tmp_path: Path, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(rate_policy("haiku", 60000, 1000, gone={})))
    proxy = make_sluice(upstream=sim.url, policy=str(path))
    assert policy_of(proxy)["version"] == 1
    assert asyncio.run(statuses(proxy, "gone", 2)) == [200, 200]

    # Edited in place: lowered limit, one workload removed.
    path.write_text(yaml.safe_dump(rate_policy("haiku", 60, 1)))
    wait_for(lambda: policy_of(proxy)["version"] == 2)
    assert "policy v1 -> v2 (sha" in proxy.stderr()
    assert asyncio.run(statuses(proxy, "gone", 1)) != [200]
    assert asyncio.run(statuses(proxy, "w", 3)).count(429) >= 2

    # Same size, mtime put back: the watch cannot see it, SIGHUP makes it look.
    before = path.stat()
    path.write_text(path.read_text().replace("requests_per_minute: 60", "requests_per_minute: 70"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.5)
    assert policy_of(proxy)["version"] == 2
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for(lambda: policy_of(proxy)["version"] == 3)

    # An invalid edit is refused, counted, and the instance keeps v3.
    path.write_text("models: {haiku: {concurrency: -1}}\n")
    wait_for(lambda: metric_value(proxy.metrics(), "sluice_policy_errors_total") == 1)
    assert policy_of(proxy)["version"] == 3
    assert "greater than 0" in proxy.stderr()
    assert metric_value(proxy.metrics(), "sluice_policy_version") == 3


def test_sighup_rereads_secret_files_and_new_keys_apply_at_once(
    tmp_path: Path, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    secret = tmp_path / "chat.secret"
    secret.write_text("first-secret\n")
    policy = {
        "models": {"haiku": {"ids": [HAIKU]}},
        "workloads": {
            "chat": {
                "access_keys": [{"access_key_id": "AKIDCHAT", "secret": {"file": str(secret)}}]
            }
        },
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    proxy = make_sluice(upstream=sim.url, policy=str(path))

    def invoke(key_id: str, secret_value: str) -> str:
        client = bedrock_client(proxy.url, key_id=key_id, secret=secret_value)
        try:
            client.invoke_model(modelId=HAIKU, body=invoke_body())
        except ClientError as exc:
            return str(exc.response["Error"]["Code"])
        return "ok"

    assert invoke("AKIDCHAT", "first-secret") == "ok"
    # The secret file is rotated: the policy text is the same, SIGHUP makes it count.
    secret.write_text("second-secret\n")
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for(lambda: policy_of(proxy)["version"] == 2)
    assert invoke("AKIDCHAT", "first-secret") == "InvalidSignatureException"
    assert invoke("AKIDCHAT", "second-secret") == "ok"
    # A key added to the policy works from the switch on.
    policy["workloads"]["chat"]["access_keys"].append(
        {"access_key_id": "AKIDCHATTWO", "secret": {"file": str(secret)}}
    )
    assert invoke("AKIDCHATTWO", "second-secret") == "UnrecognizedClientException"
    path.write_text(yaml.safe_dump(policy))
    wait_for(lambda: policy_of(proxy)["version"] == 3)
    assert invoke("AKIDCHATTWO", "second-secret") == "ok"


def test_switch_rebuilds_breaker_and_adaptive_controllers(
    tmp_path: Path, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    def policy(threshold: float, ceiling: int) -> dict[str, Any]:
        doc = rate_policy("haiku", 60000, 1000)
        doc["models"]["haiku"].update(
            concurrency=ceiling,
            breaker={"threshold": threshold, "min_requests": 5},
            adaptive={"ceiling": ceiling, "interval_seconds": 1},
        )
        return doc

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy(0.5, 20)))
    proxy = make_sluice(upstream=sim.url, policy=str(path))
    assert asyncio.run(statuses(proxy, "w", 2)) == [200, 200]
    path.write_text(yaml.safe_dump(policy(0.2, 30)))
    wait_for(lambda: policy_of(proxy)["version"] == 2)
    assert asyncio.run(statuses(proxy, "w", 2)) == [200, 200]
    text = proxy.metrics()
    assert "sluice_breaker_state" in text and "sluice_adaptive_limit" in text
    # The controllers' metrics were handed over to the new ones (same registry, no clash).
    assert metric_value(text, "sluice_pool_concurrency_limit", pool="haiku") >= 1
    assert "hook failed" not in proxy.stderr() and "not rebuilt" not in proxy.stderr()


# Bounded: a worker's shutdown once hung on a swallowed cancel (see proxy/tasks.py).
@pytest.mark.timeout(90)
def test_sighup_to_the_supervisor_reaches_every_worker(
    tmp_path: Path, sim: Simulator, make_sluice: Callable[..., Sluice], redis_server: Any
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(rate_policy(f"h{os.getpid()}", 600, 10)))
    proxy = make_sluice(
        upstream=sim.url,
        policy=str(path),
        redis_url=redis_server.url,
        workers=2,
        extra_args=["--no-fleet"],  # file mode: the supervisor's SIGHUP re-reads the file
    )
    before = path.stat()
    path.write_text(
        path.read_text().replace("requests_per_minute: 600", "requests_per_minute: 700")
    )
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # invisible to the watch
    os.kill(proxy.pid, signal.SIGHUP)
    # SO_REUSEPORT spreads fresh connections over both workers: every answer must be v2.
    wait_for(lambda: all(policy_of(proxy)["version"] == 2 for _ in range(20)), timeout=10)
    assert proxy.popen.poll() is None  # the supervisor forwarded it and lives on


def test_a_watched_file_rewritten_as_non_utf8_is_refused_and_counted(
    tmp_path: Path, sim: Simulator, make_sluice: Callable[..., Sluice]
) -> None:
    # Refused like an invalid policy (message, counter, the instance keeps v1), not a
    # traceback logged as a bug with no counter for the alert to see.
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(rate_policy("haiku", 60000, 1000)))
    proxy = make_sluice(upstream=sim.url, policy=str(path))
    path.write_bytes(b"\xff\xfe" + path.read_bytes())
    wait_for(
        lambda: metric_value(proxy.metrics(), "sluice_policy_errors_total", reason="invalid") == 1
    )
    assert f"{path}: not UTF-8 text (byte 0)" in proxy.stderr()
    assert "Traceback" not in proxy.stderr()
    assert policy_of(proxy)["version"] == 1
    assert asyncio.run(statuses(proxy, "w", 1)) == [200]

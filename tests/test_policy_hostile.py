"""Policies nobody should be able to apply, and a fleet that follows the right one.

Found by an adversarial run against a live fleet: numbers that passed validation and then
failed every call (``.inf`` rates, a lease TTL of 1e300 s or 0.1 ms, counts past 64 bits that
stopped the fleet view), duplicate YAML keys silently dropping a pool, one model in two pools
through its ARN, tracebacks for non-UTF-8 or deeply nested files; and, after Redis lost its
data, a new policy numbered v1 again that no instance switched to while ``apply --wait``
reported success.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.config import PolicyError, load_policy
from proxy.policy import CompiledPolicy
from tests.support.fleet_ops import policy_of, rate_policy, sluice_cli, write_policy
from tests.support.processes import Simulator, Sluice, http_json
from tests.support.redis_fixtures import RedisServerProcess

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"

BASE = """\
identity: {header_mode: true, default_workload: default}
priorities: {default: {share: 1.0}}
workloads: {default: {priority: default}}
"""


def _pool(extra: str) -> str:
    return BASE + f"models:\n  haiku:\n    ids: [{HAIKU}]\n{extra}"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (_pool("    requests_per_minute: .inf\n"), "models.haiku.requests_per_minute"),
        (_pool("    tokens_per_minute: .nan\n"), "models.haiku.tokens_per_minute"),
        (_pool("    concurrency: 100000000000000000000000000000\n"), "models.haiku.concurrency"),
        (_pool("    concurrency: true\n"), "models.haiku.concurrency"),
        (_pool("") + "server: {lease_ttl_seconds: 1.0e300}\n", "server.lease_ttl_seconds"),
        (_pool("") + "server: {lease_ttl_seconds: 0.0001}\n", "server.lease_ttl_seconds"),
        (_pool("") + "server: {upstream_read_timeout_seconds: .inf}\n", "upstream_read_timeout"),
        (_pool("    concurrency: 5\n  haiku:\n    ids: [x]\n"), "duplicate key 'haiku'"),
        (BASE + 'models:\n  p:\n    ids: [""]\n', "models.p.ids.0"),
    ],
)
def test_a_policy_that_would_fail_every_call_is_refused_naming_its_field(
    tmp_path: Path, text: str, named: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=named.replace(".", r"\.")):
        CompiledPolicy(load_policy(path), env={})
    check = sluice_cli("policy", "check", str(path))
    assert check.returncode != 0 and named in check.stderr + check.stdout, check
    assert "Traceback" not in check.stderr


def test_what_policies_always_accepted_still_loads(tmp_path: Path) -> None:
    # Read as before (a fleet mid-upgrade must not refuse its stored policy): numeric
    # strings and integral floats for counts, YAML merge keys with an override.
    path = tmp_path / "policy.yaml"
    path.write_text(
        BASE
        + f"models:\n  haiku: &pool\n    ids: [{HAIKU}]\n    concurrency: '10'\n"
        + "    requests_per_minute: 600\n"
        + "  sonnet:\n    <<: *pool\n    ids: [anthropic.claude-3-sonnet-20240229-v1:0]\n"
        + "    concurrency: 7.0\n"
    )
    policy = load_policy(path)
    assert policy.models["haiku"].concurrency == 10
    assert policy.models["sonnet"].concurrency == 7
    assert policy.models["sonnet"].requests_per_minute == 600  # merged from haiku


def test_one_model_in_two_pools_through_its_arn_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    arn = f"arn:aws:bedrock:us-east-1::foundation-model/{HAIKU}"
    path.write_text(_pool(f"  other:\n    ids: ['{arn}']\n"))
    check = sluice_cli("policy", "check", str(path))
    assert check.returncode == 0, check
    assert f"models.other.ids: '{arn}' names the same model as '{HAIKU}'" in check.stderr
    assert sluice_cli("policy", "check", "--strict", str(path)).returncode == 1


def test_a_cross_region_profile_may_have_a_pool_of_its_own(tmp_path: Path) -> None:
    # us.X has a quota of its own at Bedrock: not the same model as X for the duplicate check.
    path = tmp_path / "policy.yaml"
    path.write_text(_pool(f"  cross:\n    ids: [us.{HAIKU}]\n"))
    policy = CompiledPolicy(load_policy(path), env={})
    assert policy.resolve_pool(f"us.{HAIKU}").name == "cross"
    assert policy.resolve_pool(HAIKU).name == "haiku"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\xff\xfe" + _pool("").encode(), "not UTF-8 text"),
        (("a:\n" + "".join("  " * i + "- \n" for i in range(1, 600))).encode(), "nested"),
        (("x: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested too deeply"),
    ],
)
def test_unreadable_files_get_a_message_not_a_traceback(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(content)
    check = sluice_cli("policy", "check", str(path))
    apply = sluice_cli("policy", "apply", str(path), "--redis-url", "redis://127.0.0.1:1")
    for out, code in ((check, 1), (apply, 2)):  # (apply: refused before Redis is asked)
        assert out.returncode == code, out
        assert "Traceback" not in out.stderr and f"{path}: " in out.stderr, out.stderr
        assert says in out.stderr, out.stderr


def test_rollback_and_history_refuse_zero_and_negative_numbers(
    redis_server: RedisServerProcess,
) -> None:
    fleet = ["--redis-url", redis_server.url, "--fleet", f"f-{uuid.uuid4().hex[:8]}"]
    for args in (["rollback", "0"], ["history", "--limit", "0"], ["history", "--limit", "-3"]):
        out = sluice_cli("policy", *args, *fleet)
        assert out.returncode == 2 and "must be 1 or more" in out.stderr, out


# --- a fleet after Redis lost its data ------------------------------------------------------


@pytest.fixture
def lost(
    tmp_path: Path, simulator: Simulator, redis_factory: Any
) -> Iterator[tuple[list[Sluice], RedisServerProcess, str]]:
    server = redis_factory()
    name, pool = f"lost-{uuid.uuid4().hex[:8]}", f"p{uuid.uuid4().hex[:8]}"
    first = write_policy(tmp_path, rate_policy(pool, 60000, 1000))
    instances = [
        Sluice(
            tmp_path,
            upstream=simulator.url,
            policy=str(first),
            redis_url=server.url,
            extra_args=["--fleet", name],
        )
        for _ in range(2)
    ]
    yield instances, server, name
    for p in instances:
        p.stop()


def test_a_new_policy_after_redis_lost_its_data_is_applied_and_confirmed(
    tmp_path: Path, lost: tuple[list[Sluice], RedisServerProcess, str]
) -> None:
    instances, server, name = lost
    fleet = ["--redis-url", server.url, "--fleet", name]
    old = {policy_of(p)["sha"] for p in instances}
    assert len(old) == 1 and {policy_of(p)["version"] for p in instances} == {1}
    client = redis.Redis.from_url(server.url)
    client.flushall()  # what a restart without persistence leaves
    client.close()
    time.sleep(1.5)  # every instance publishes its snapshot again within a second
    second = rate_policy(f"q{uuid.uuid4().hex[:8]}", 1200, 20)
    out = sluice_cli("policy", "apply", str(write_policy(tmp_path, second)), "--wait", "8", *fleet)
    # Numbered v1 again; every instance must run the new one, not keep the old v1.
    assert out.returncode == 0, out
    assert "policy v1 applied" in out.stdout and "2/2 instances on v1" in out.stdout, out.stdout
    views = [policy_of(p) for p in instances]
    assert {v["version"] for v in views} == {1} and not {v["sha"] for v in views} & old, views


def test_apply_wait_fails_when_no_instance_reports(
    tmp_path: Path, redis_server: RedisServerProcess
) -> None:
    fleet = ["--redis-url", redis_server.url, "--fleet", f"empty-{uuid.uuid4().hex[:8]}"]
    policy = write_policy(tmp_path, rate_policy("p", 600, 10))
    out = sluice_cli("policy", "apply", str(policy), "--wait", "1", *fleet)
    assert out.returncode == 1 and "no instance of fleet" in out.stderr, out


def test_an_instance_that_stops_leaves_the_fleet_view_at_once(
    tmp_path: Path, simulator: Simulator, redis_server: RedisServerProcess
) -> None:
    name = f"leave-{uuid.uuid4().hex[:8]}"
    policy = str(write_policy(tmp_path, rate_policy("p", 600, 10)))
    make = lambda: Sluice(  # noqa: E731
        tmp_path, upstream=simulator.url, policy=policy, redis_url=redis_server.url,
        extra_args=["--fleet", name],
    )  # fmt: skip
    staying, leaving = make(), make()
    try:
        view = lambda: http_json("GET", staying.url + "/sluice/v1/fleet")  # noqa: E731
        deadline = time.monotonic() + 5
        while len(view()["instances"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        leaving.stop()  # SIGTERM: a graceful stop
        stopped = time.monotonic()
        while len(view()["instances"]) != 1:
            assert time.monotonic() - stopped < 3, "still a member (its snapshot's TTL is 10 s)"
            time.sleep(0.1)
    finally:
        staying.stop()
        leaving.stop()

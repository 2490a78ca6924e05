"""Policy files: the shipped ones validate; each bad one fails naming file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import _parser
from proxy.config import PolicyError, load_policy
from proxy.policy import CompiledPolicy
from proxy.routes import base_model_id

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "policies"


@pytest.mark.parametrize("name", ["default.yaml", "mangaassist.yaml"])
def test_shipped_policies_pass_policy_check(name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "policy", "check", str(ROOT / "policies" / name)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert ": OK:" in out.stdout


@pytest.mark.parametrize(
    ("name", "field", "words"),
    [
        ("bad-unknown-key.yaml", "models.sonnet.concurency", "Extra inputs are not permitted"),
        ("bad-negative-rate.yaml", "models.sonnet.requests_per_minute", "greater than 0"),
        ("bad-tiny-rate.yaml", "models.sonnet.requests_per_minute", "(one a day) to 1e+12"),
        ("bad-unknown-priority.yaml", "workloads.chat.priority", "unknown priority class 'P9'"),
        ("bad-share.yaml", "priorities.batch.share", "less than or equal to 1"),
        ("bad-unknown-pool.yaml", "workloads.default.limits.opus", "unknown model pool 'opus'"),
        ("bad-secret-inline.yaml", "secret", "exactly one of 'env' or 'file'"),
        ("bad-not-yaml.yaml", "", "not valid YAML"),
        ("bad-duplicate-key.yaml", "workloads.b.access_keys", "already given to workload 'a'"),
        ("bad-downgrade.yaml", "models.sonnet.downgrade_to", "unknown model pool 'haiku'"),
    ],
)
def test_bad_policy_names_file_and_field(name: str, field: str, words: str) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(BAD / name)
    message = str(err.value)
    assert message.startswith(str(BAD / name))
    assert field in message and words in message, message
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "policy", "check", str(BAD / name)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 1 and words in out.stderr


def test_missing_policy_file_is_named() -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read"):
        load_policy(BAD / "nope.yaml")


def test_model_ids_resolve_to_their_pool() -> None:
    policy = CompiledPolicy(load_policy(ROOT / "policies" / "default.yaml"))
    for model_id in (
        "anthropic.claude-3-haiku-20240307-v1:0",
        "us.anthropic.claude-3-haiku-20240307-v1:0",
        "global.anthropic.claude-3-haiku-20240307-v1:0",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
        "apac.anthropic.claude-3-haiku-20240307-v1:0",
        "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0",
    ):
        assert policy.resolve_pool(model_id).name == "haiku", model_id
    assert policy.resolve_pool("meta.llama3-70b-instruct-v1:0").name == "_other"
    assert base_model_id("arn:aws:bedrock:us-east-1:1:application-inference-profile/abc") == "abc"


def test_compose_file_matches_the_cli() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "simulator", "sluice-a", "sluice-b"} <= set(services)
    parser = _parser()
    sim_args = parser.parse_args(services["simulator"]["command"])
    assert sim_args.command == "simulate"
    sim_port = sim_args.port
    assert f"{sim_port}:{sim_port}" in services["simulator"]["ports"]
    serve_flags = {
        a.dest.upper()
        for a in parser._subparsers._group_actions[0]  # type: ignore[union-attr]
        .choices["serve"]
        ._actions
    }
    host_ports = set()
    for name in ("sluice-a", "sluice-b"):
        svc = services[name]
        assert parser.parse_args(svc["command"]).command == "serve"
        env = svc["environment"]
        for key in env:
            if key.startswith("SLUICE_"):
                assert key.removeprefix("SLUICE_") in serve_flags, key
        assert env["SLUICE_UPSTREAM"] == f"http://simulator:{sim_port}"
        assert env["SLUICE_REDIS_URL"].startswith("redis://redis:6379")
        assert (ROOT / env["SLUICE_CONFIG"].removeprefix("/app/")).exists()
        host, container = svc["ports"][0].split(":")
        assert container == env["SLUICE_PORT"]
        host_ports.add(host)
    assert len(host_ports) == 2  # the replicas do not collide on the host


MANGA_SECRETS = {
    "MANGA_CHAT_P0_SECRET": "p0-secret",
    "MANGA_CHAT_P1_SECRET": "p1-secret",
    "MANGA_CHAT_P2_API_KEY": "p2-api-key",
    "MANGA_CATALOG_SECRET": "catalog-secret",
    "MANGA_RECO_BATCH_SECRET": "reco-secret",
    "MANGA_ANALYTICS_SECRET": "analytics-secret",
}


def test_reference_policy_serves_its_workloads(simulator: Any, make_sluice: Any) -> None:
    from botocore.exceptions import ClientError

    from tests.support.processes import bedrock_client

    proxy = make_sluice(
        upstream=simulator.url,
        policy=str(ROOT / "policies" / "mangaassist.yaml"),
        env=MANGA_SECRETS,
    )
    orders = bedrock_client(proxy.url, key_id="AKIASLUICECHATP0", secret="p0-secret")
    reply = orders.converse(
        modelId="anthropic.claude-3-sonnet-20240229-v1:0",
        messages=[{"role": "user", "content": [{"text": "注文の状況は？"}]}],
    )
    headers = reply["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-sluice-workload"] == "chat-orders" and headers["x-sluice-pool"] == "sonnet"
    catalog = bedrock_client(proxy.url, key_id="AKIASLUICECATALOG", secret="catalog-secret")
    with pytest.raises(ClientError) as err:  # catalog enrichment may only use Haiku
        catalog.converse(
            modelId="anthropic.claude-3-sonnet-20240229-v1:0",
            messages=[{"role": "user", "content": [{"text": "synopsis"}]}],
        )
    assert err.value.response["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(ClientError) as err:  # unknown_models: refuse
        orders.converse(
            modelId="meta.llama3-70b-instruct-v1:0",
            messages=[{"role": "user", "content": [{"text": "hi"}]}],
        )
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert "not in any model pool" in err.value.response["Error"]["Message"]

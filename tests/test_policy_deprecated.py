"""``models.<pool>.downgrade_to`` is accepted (old files stay valid) but deprecated and ignored."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import Policy, load_policy
from proxy.policy import CompiledPolicy, deprecations

ROOT = Path(__file__).resolve().parents[1]
_OLD = {
    "models": {
        "sonnet": {"ids": ["anthropic.claude-3-sonnet-20240229-v1:0"], "downgrade_to": "haiku"},
        "haiku": {"ids": ["anthropic.claude-3-haiku-20240307-v1:0"]},
    },
    "identity": {"default_workload": "app"},
    "workloads": {"app": {"priority": "P0"}},
    "priorities": {"P0": {"share": 1.0}},
}


def _old_policy(tmp_path: Path) -> Path:
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(_OLD))
    return path


def test_start_up_warns_that_downgrade_to_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = load_policy(str(_old_policy(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="proxy.policy"):
        compiled = CompiledPolicy(policy)
    warned = [r.getMessage() for r in caplog.records if r.name == "proxy.policy"]
    assert warned == [
        "models.sonnet.downgrade_to is deprecated and ignored: "
        "use workloads.<name>.degrade (e.g. degrade: [haiku])"
    ]
    # Nothing on the request path reads it any more.
    assert not hasattr(compiled.pools["sonnet"], "downgrade_to")


def test_policy_check_warns_and_still_passes(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "policy", "check", str(_old_policy(tmp_path))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert ": OK:" in out.stdout
    assert "models.sonnet.downgrade_to is deprecated and ignored" in out.stderr
    assert "workloads.<name>.degrade" in out.stderr


@pytest.mark.parametrize("name", ["default.yaml", "mangaassist.yaml"])
def test_shipped_policies_set_no_deprecated_field(name: str) -> None:
    policy: Policy = load_policy(str(ROOT / "policies" / name))
    assert deprecations(policy) == []

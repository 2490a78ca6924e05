"""``sluice policy check`` warns about fleet-loop settings that can never take effect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import main
from proxy.config import parse_policy
from proxy.control.checks import policy_warnings


def _policy(pool: dict[str, Any], **top: Any) -> Any:
    doc = {"models": {"sonnet": {"ids": ["anthropic.sonnet"], **pool}}, **top}
    return parse_policy(doc)


def test_a_ceiling_above_the_concurrency_can_never_be_reached() -> None:
    """Incident 3's policy: concurrency 15, ceiling 80 -- accepted silently before."""
    warnings = policy_warnings(_policy({"concurrency": 15, "adaptive": {"ceiling": 80}}))
    assert warnings == [
        "models.sonnet.adaptive.ceiling: 80 is above the pool's concurrency 15; the adaptive "
        "limit can never exceed 15 (raise concurrency or lower the ceiling)"
    ]


def test_a_breaker_window_shorter_than_its_interval_and_a_breaker_without_a_limit() -> None:
    pool = {
        "concurrency": 40,
        "adaptive": {"ceiling": 40, "interval_seconds": 5},
        "breaker": {"window_seconds": 2},
    }
    (warning,) = policy_warnings(_policy(pool))
    assert warning.startswith("models.sonnet.breaker.window_seconds: 2 s is shorter than the 5 s")
    (alone,) = policy_warnings(_policy({"breaker": {}}))
    assert "without adaptive, an open breaker refuses every class, P0 included" in alone


def test_a_share_that_rounds_to_the_whole_pool_reserves_nothing() -> None:
    pool = {"concurrency": 40, "adaptive": {"ceiling": 40, "floor": 2}}
    priorities = {"P0": {"share": 1.0}, "P1": {"share": 0.6}, "P2": {"share": 0.4}}
    warnings = policy_warnings(_policy(pool, priorities=priorities))
    assert warnings == [
        "priorities.P1.share: 0.6 of models.sonnet's smallest limit 2 rounds up to all 2 slots; "
        "no headroom is kept for higher classes there"
    ]  # P2: ceil(0.8) = 1 of 2, which does keep one slot


def test_a_sound_policy_has_no_warnings() -> None:
    pool = {"concurrency": 40, "adaptive": {"ceiling": 40, "floor": 4, "interval_seconds": 2}}
    pool["breaker"] = {"window_seconds": 10}
    assert policy_warnings(_policy(pool)) == []


def test_policy_check_prints_the_warnings_and_strict_fails_on_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    doc = {"models": {"sonnet": {"ids": ["a.s"], "concurrency": 15, "adaptive": {"ceiling": 80}}}}
    path.write_text(yaml.safe_dump(doc))
    assert main(["policy", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"{path}: warning: models.sonnet.adaptive.ceiling: 80 is above" in err
    assert main(["policy", "check", "--strict", str(path)]) == 1

"""``bench/sweep.py --vary-policy``: the drawn policies are ones Sluice accepts, and drawing
them leaves the seed's incident as it was (a seed's numbers do not depend on the flag)."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import pytest

from proxy.config import parse_policy
from proxy.control.checks import policy_warnings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from sweep_draw import draw


@pytest.mark.parametrize("seed", range(1, 201))
def test_a_drawn_policy_is_accepted_and_leaves_the_incident_alone(seed: int) -> None:
    plain, varied = draw(seed, 45.0), draw(seed, 45.0, vary_policy=True)
    policy = parse_policy(varied.policy)  # raises on anything malformed
    assert varied.variant and not plain.variant
    for f in fields(plain):
        if f.name not in ("policy", "variant", "scenario"):
            assert getattr(plain, f.name) == getattr(varied, f.name), f.name
    assert plain.scenario == varied.scenario
    sonnet = policy.models["sonnet"]
    assert sonnet.adaptive is not None and sonnet.breaker is not None
    # Nothing the fleet loops could never act on (a share rounding to a whole small pool
    # is a warning a user may get, and the sweep keeps it).
    bad = [w for w in policy_warnings(policy) if ".share:" not in w]
    assert bad == []
    assert varied.policy != plain.policy


def test_the_template_uses_no_deprecated_field() -> None:
    assert "downgrade_to" not in draw(1, 45.0).policy["models"]["sonnet"]

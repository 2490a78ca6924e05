"""``bench/sweep.py`` end to end on one seed, shortened: the machinery and its invariants.

One seed of the randomized incident sweep (issue 9) with 20 s of load per system and two
Sluice instances: the run must complete, produce a row per seed with every invariant, and
the invariants that hold at any duration must pass (P0 never below direct, no bare error
for a class with a chain, every refusal with Retry-After, no fewer served calls than
direct). The throttle and convergence invariants need the full 45 s (the first 10 s after
each event are excluded) and are reported by the bench run, not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_one_seed_of_the_sweep_holds_the_duration_free_invariants(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    argv = [sys.executable, "bench/sweep.py", "--seeds", "1", "--first-seed", "3"]
    argv += ["--duration", "20", "--instances", "2", "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.exists(), done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["seeds"]
    print(done.stdout)
    assert set(row["invariants"]) == {"p0", "thr", "conv", "ok", "shape"}
    assert row["served_sluice"] > 0 and row["served_direct"] > 0  # both runs really ran
    for name in ("p0", "ok", "shape"):
        assert row["invariants"][name], (name, row)

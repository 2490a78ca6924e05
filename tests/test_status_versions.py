"""Which policy `sluice status`, the fleet view and `policy apply --wait` say a fleet runs.

The header is the fleet's current version in Redis, never the highest number an instance
reports: a ``--no-fleet`` instance on the same Redis counts its own file's reloads from v1,
and a member can refuse the stored version (a secret missing on its host). Both are named
with what they run, and neither passes for a member on the current version.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fleet_ops import (
    policy_of,
    rate_policy,
    secret_policy,
    sluice_cli,
    write_policy,
)
from tests.support.processes import Simulator, Sluice, http_json
from tests.support.redis_fixtures import RedisServerProcess

SECRET_ENV = "SLUICE_STATUS_TEST_SECRET"


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_text().encode()).hexdigest()


def instance_of(view: dict[str, Any], proc: Sluice) -> dict[str, Any]:
    """The fleet view's row for ``proc`` (instance ids are host-pid-random)."""
    return next(i for i in view["instances"] if f"-{proc.pid}-" in i["id"])


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return got


@pytest.mark.slow
@pytest.mark.long  # 6-14 s: runs in `make test-all`, not in CI's `make test`
def test_status_shows_the_stored_version_and_names_every_instance_off_it(
    tmp_path: Path,
    simulator: Simulator,
    redis_factory: Callable[..., RedisServerProcess],
    make_sluice: Callable[..., Sluice],
) -> None:
    # A Redis of its own: --no-fleet instances show on the default fleet's board.
    redis = redis_factory()
    pool = "status"
    fleet_file = write_policy(tmp_path, rate_policy(pool, 600, 10))
    member = make_sluice(
        upstream=simulator.url, policy=str(fleet_file), redis_url=redis.url,
        extra_args=["--fleet", "default"], env={SECRET_ENV: "s3cret"},
    )  # fmt: skip
    assert policy_of(member)["version"] == 1  # published its file as v1
    # The repro: a --no-fleet instance whose file is edited three times (local v4).
    own_file = tmp_path / "nofleet.yaml"
    own_file.write_text(yaml.safe_dump(rate_policy(pool, 100, 10)))
    loner = make_sluice(
        upstream=simulator.url, policy=str(own_file), redis_url=redis.url,
        extra_args=["--no-fleet"],
    )  # fmt: skip
    for version in (2, 3, 4):
        own_file.write_text(yaml.safe_dump(rate_policy(pool, 200 + version, 10)))
        deadline = time.monotonic() + 10
        while policy_of(loner)["version"] != version:  # reloaded within a second
            assert time.monotonic() < deadline, f"loner never reached local v{version}"
            time.sleep(0.1)
    # v2 needs a secret only the first member has: a member started now refuses it.
    v2_file = write_policy(tmp_path, secret_policy(pool, 900, SECRET_ENV))
    out = sluice_cli("policy", "apply", str(v2_file), "--redis-url", redis.url)
    assert out.returncode == 0, (out.stdout, out.stderr)
    wait_for(lambda: policy_of(member)["version"] == 2, "the member on v2")
    refuser = make_sluice(
        upstream=simulator.url, policy=str(fleet_file), redis_url=redis.url,
        extra_args=["--fleet", "default"],
    )  # fmt: skip
    assert policy_of(refuser)["version"] == 0  # kept its own file: the secret is missing
    assert policy_of(refuser)["source"] == str(fleet_file)

    def board() -> dict[str, Any]:
        out = sluice_cli("status", "--json", "--redis-url", redis.url)
        assert out.returncode == 0, out.stderr
        view: dict[str, Any] = json.loads(out.stdout)
        return view if len(view["instances"]) == 3 else {}

    view = wait_for(board, "all three instances on the board")
    assert view["fleet"] == "default"
    assert view["policy"]["version"] == 2 and view["policy"]["sha"] == sha_of(v2_file)
    assert view["members"] == 2  # the loner shares the Redis, not the fleet's policy
    row = instance_of(view, member)
    assert (row["policy_version"], row["own_file"], row["on_policy"]) == (2, False, True)
    row = instance_of(view, refuser)
    assert (row["policy_version"], row["own_file"], row["on_policy"]) == (0, False, False)
    assert row["policy_source"] == str(fleet_file) and row["policy_sha"] == sha_of(fleet_file)
    row = instance_of(view, loner)
    assert (row["policy_version"], row["own_file"], row["on_policy"]) == (4, True, False)
    assert row["policy_sha"] == sha_of(own_file)

    text = sluice_cli("status", "--redis-url", redis.url).stdout
    header = text.split("POOLS")[0]
    assert f"fleet default: 2 instances, policy v2 (sha {sha_of(v2_file)[:12]}" in header
    assert "policy v4" not in header and sha_of(own_file)[:12] not in header.splitlines()[0]
    assert "not on v2: 1\n" in header
    assert f"-{refuser.pid}-" in header.split("not on v2")[1].splitlines()[1]
    assert f"file {fleet_file} (local v0, sha {sha_of(fleet_file)[:12]})" in header
    assert "own file, not members (--no-fleet): 1\n" in header
    assert f"file {own_file} (local v4, sha {sha_of(own_file)[:12]})" in header

    # The dashboard's data says the same, whichever instance serves it.
    for proc in (member, loner):
        served = http_json("GET", proc.url + "/sluice/v1/fleet")
        assert served["policy"]["version"] == 2 and served["members"] == 2
        assert not instance_of(served, refuser)["on_policy"]
        assert instance_of(served, loner)["own_file"]

    # --wait counts the member that refused at start-up as behind: it never reaches v3.
    v3_file = write_policy(tmp_path, secret_policy(pool, 800, SECRET_ENV))
    out = sluice_cli("policy", "apply", str(v3_file), "--redis-url", redis.url, "--wait", "3")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "1/2 instances on v3 after" in out.stdout
    assert "1 more on their own file" in out.stdout  # the loner: named, not waited for
    lagging = [line for line in out.stderr.splitlines() if "still on" in line]
    assert len(lagging) == 1 and f"-{refuser.pid}-" in lagging[0], out.stderr
    assert f"still on file {fleet_file} (local v0" in lagging[0]
    assert policy_of(member)["version"] == 3


def test_merge_takes_the_header_from_the_stored_version_not_the_highest_number() -> None:
    from proxy.ops.fleetview import merge
    from proxy.ops.status import render

    def snap(i: str, version: int, sha: str, source: str, own: bool | None) -> dict[str, Any]:
        policy: dict[str, Any] = {"version": version, "sha": sha, "author": "a", "source": source}
        if own is not None:
            policy["own_file"] = own
        return {"id": i, "at": 1000.0, "window_s": 10.0, "policy": policy}

    snaps = [
        snap("on", 5, "aaa", "redis", False),
        snap("stale", 4, "bbb", "redis", False),
        snap("refused", 0, "ccc", "/etc/sluice.yaml", False),
        snap("loner", 9, "ddd", "/etc/own.yaml", True),
        snap("old-loner", 7, "eee", "/etc/old.yaml", None),  # an older instance's snapshot
    ]
    current = {"version": 5, "sha": "aaa", "author": "ops"}
    view = json.loads(json.dumps(merge(snaps, "f", 1001.0, current).as_json()))
    assert view["policy"] == {**current, "source": "redis"}
    assert view["members"] == 3
    assert {i["id"]: (i["own_file"], i["on_policy"]) for i in view["instances"]} == {
        "on": (False, True), "stale": (False, False), "refused": (False, False),
        "loner": (True, False), "old-loner": (True, False),
    }  # fmt: skip
    header = render(view).split("POOLS")[0]
    assert header.startswith("fleet f: 3 instances, policy v5 (sha aaa, by ops)\n")
    assert "not on v5: 2\n  stale  v4 (sha bbb)\n  refused  file /etc/sluice.yaml" in header
    assert "(--no-fleet): 2\n  loner  file /etc/own.yaml (local v9, sha ddd)" in header
    # Without a stored version (no Redis): the members' newest, never an own file's count.
    alone = merge(snaps, "f", 1001.0).as_json()
    assert alone["policy"]["version"] == 5

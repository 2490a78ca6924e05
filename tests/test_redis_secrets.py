"""Redis's password, given in ``--redis-url`` / ``SLUICE_REDIS_URL``, never leaves the process:
not in the start-up banner (container logs), not on the workers' command lines (``ps``), not
in the messages of the commands that read Redis."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable

from proxy.backend.client import redact
from tests.support.processes import ROOT, Simulator, Sluice, _env, bedrock_client
from tests.support.redis_fixtures import RedisServerProcess

HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SECRET = "Sup3r-S3cret-redis-pw"


def test_redact_hides_every_form_of_the_password_and_keeps_the_rest() -> None:
    assert redact(f"redis://:{SECRET}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact(f"rediss://app:{SECRET}@h:6380/2") == "rediss://app:***@h:6380/2"
    assert redact(f"redis+cluster://app:{SECRET}@10.0.0.5:7000") == (
        "redis+cluster://app:***@10.0.0.5:7000"
    )
    assert redact(f"unix:///run/r.sock?db=1&password={SECRET}") == (
        "unix:///run/r.sock?db=1&password=***"
    )
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_redis_password_is_in_no_banner_command_line_or_error(
    redis_factory: Callable[..., RedisServerProcess],
    sim: Simulator,
    make_sluice: Callable[..., Sluice],
) -> None:
    server = redis_factory()
    server.cli("config", "set", "requirepass", SECRET)
    url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
    policy = {
        "identity": {"default_workload": "w"},
        "models": {"h": {"ids": [HAIKU]}},
        "workloads": {"w": {}},
    }
    proxy = make_sluice(
        upstream=sim.url,
        policy=policy,
        workers=2,
        env={"SLUICE_REDIS_URL": url},  # as a container passes it: not on any command line
        extra_args=["--fleet", f"test-{uuid.uuid4().hex}"],
    )
    # The workers reached Redis with the password (the policy was published there).
    bedrock_client(proxy.url).converse(
        modelId=HAIKU, messages=[{"role": "user", "content": [{"text": "hi"}]}]
    )
    assert int(server.cli("-a", SECRET, "--no-auth-warning", "dbsize").strip()) > 0
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True)
    workers = [line for line in ps.stdout.splitlines() if f"--port {proxy.port}" in line]
    assert len(workers) == 3, workers  # the supervisor and its two workers
    assert not [line for line in workers if SECRET in line], workers
    assert SECRET not in proxy.stderr()
    assert "store: redis://:***@127.0.0.1" in proxy.stderr()  # the banner still says where
    assert not [line for line in proxy.stdout_lines() if SECRET in line]

    bad = f"redis://:{SECRET}-wrong@127.0.0.1:{server.port}/0"
    for command in (["status", "--redis-url", bad], ["policy", "history", "--redis-url", bad]):
        out = subprocess.run(
            [sys.executable, "-m", "proxy", *command],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=_env(None),
            timeout=60,
            check=False,
        )
        assert out.returncode == 1, (command, out.stderr)
        assert "invalid username-password pair" in out.stderr, out.stderr
        assert SECRET not in out.stderr + out.stdout, (command, out.stderr)

"""proxy/backend is the one Redis boundary: one importer, one exception, one script runner."""

from __future__ import annotations

import ast
import asyncio
import logging
from importlib import resources
from pathlib import Path

import pytest
import redis

from proxy.admission import StoreUnavailable
from proxy.backend import BackendUnavailable
from proxy.backend.client import redis_client
from proxy.backend.lua import load_script
from proxy.backend.runner import ScriptRunner
from proxy.jobs.queue import QueueUnavailable
from proxy.pipeline.cache import CacheUnavailable
from tests.support.redis_fixtures import RedisServerProcess

PROXY = Path(__file__).resolve().parents[1] / "proxy"


def _imports_redis(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(
            a.name == "redis" or a.name.startswith("redis.") for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "redis":
            return True
    return False


def test_only_the_backend_package_imports_redis() -> None:
    importers = {str(p.relative_to(PROXY).parent) for p in PROXY.rglob("*.py") if _imports_redis(p)}
    assert importers == {"backend"}


def test_every_failure_is_one_exception() -> None:
    assert StoreUnavailable is CacheUnavailable is QueueUnavailable is BackendUnavailable


@pytest.mark.parametrize(
    "name", [p.name[:-4] for p in (resources.files("proxy.backend") / "scripts").iterdir()]
)
def test_every_backend_script_loads_with_its_includes(name: str) -> None:
    text = load_script(name)
    assert "--! include" not in text
    assert "redis.call" in text


async def test_the_runner_reloads_scripts_after_a_flush_and_bounds_each_call(
    redis_server: RedisServerProcess,
) -> None:
    client = redis_client(redis_server.url, 1.0)
    runner = ScriptRunner(client, ["job_has_work"], 1.0, logging.getLogger("test"))
    try:
        # Not started: loaded on first use; after SCRIPT FLUSH (NOSCRIPT) loaded again.
        assert await runner.run("job_has_work", ["no-such-stream"], ["g", 1000]) == 0
        redis.Redis.from_url(redis_server.url).script_flush()
        assert await runner.run("job_has_work", ["no-such-stream"], ["g", 1000]) == 0
        assert await runner.ping()
    finally:
        await client.aclose()
    dead = redis_client("redis://127.0.0.1:1/0", 0.2)
    runner = ScriptRunner(dead, ["job_has_work"], 0.2, logging.getLogger("test"))
    try:
        with pytest.raises(BackendUnavailable, match="job_has_work"):
            await asyncio.wait_for(runner.run("job_has_work", ["s"], ["g", 1]), 5)
        assert not await runner.ping()
    finally:
        await dead.aclose()

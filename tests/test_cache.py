"""The response cache: keys, each backend (memory, Redis, Redis Cluster), failures, warming.

Backend tests run against every backend (the ``cache`` fixture is parametrized, as in
alisaifee/limits), on real redis-server processes.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot

from proxy.backend.cache import RedisResponseCache, open_cache
from proxy.config import parse_policy
from proxy.metrics import Metrics
from proxy.pipeline.cache import (
    CachedResponse,
    CacheUnavailable,
    MemoryResponseCache,
    ResponseCache,
    cache_key,
    cache_operation,
    cacheable,
)
from proxy.pipeline.warm import warm
from tests.support.redis_fixtures import RedisClusterProcesses, RedisServerProcess

KEY_RE = re.compile(r"^sluice:\{cache:(?P<workload>[A-Za-z0-9_.-]+)\}:[0-9a-f]{64}$")
BODY = b'{"messages":[{"role":"user","content":[{"text":"store hours?"}]}]}'


def _answer(text: str = "10:00-20:00", stored_at: float = 1.0) -> CachedResponse:
    body = json.dumps({"output": {"message": {"content": [{"text": text}]}}}).encode()
    headers = (("Content-Type", "application/json"), ("x-amzn-bedrock-output-token-count", "7"))
    return CachedResponse(200, headers, body, stored_at)


def _errors(metrics: Metrics, operation: str) -> float:
    value = metrics.registry.get_sample_value("sluice_store_errors_total", {"operation": operation})
    return value or 0.0


@pytest.fixture(params=["memory", "redis", pytest.param("cluster", marks=pytest.mark.cluster)])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[ResponseCache]:
    """A fresh cache on each backend (Redis ones share the session's servers)."""
    if request.param == "memory":
        backend: ResponseCache = MemoryResponseCache()
    elif request.param == "redis":
        server: RedisServerProcess = request.getfixturevalue("redis_server")
        backend = open_cache(server.url)
    else:
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        backend = open_cache(cluster.url)
    try:
        yield backend
    finally:
        await backend.close()


def _workload() -> str:
    return "wl-" + uuid.uuid4().hex[:12]


# --- keys ----------------------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(st.characters(exclude_categories=("Cs",)), max_size=8), inner, max_size=4
        )
    ),
    max_leaves=20,
)


def _shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@settings(max_examples=200)
@given(
    doc=st.dictionaries(
        st.text(st.characters(exclude_categories=("Cs",)), max_size=8), json_values, max_size=5
    ),
    seed=st.integers(),
    indent=st.sampled_from([None, 0, 2]),
    ensure_ascii=st.booleans(),
)
def test_cache_key_ignores_key_order_and_layout(
    doc: dict[str, Any], seed: int, indent: int | None, ensure_ascii: bool
) -> None:
    compact = json.dumps(doc, separators=(",", ":")).encode()
    relaid = json.dumps(
        _shuffled(doc, random.Random(seed)), indent=indent, ensure_ascii=ensure_ascii
    ).encode()
    assert cache_key("chat", "sonnet", "Converse", compact) == cache_key(
        "chat", "sonnet", "Converse", b"  \n" + relaid + b"\n"
    )


@given(
    text=st.text(st.characters(exclude_categories=("Cs",)), min_size=1),
    other=st.text(st.characters(exclude_categories=("Cs",)), min_size=1),
)
def test_cache_key_differs_when_the_prompt_differs_and_never_shows_it(
    text: str, other: str
) -> None:
    def key(prompt: str) -> str:
        return cache_key("chat", "sonnet", "Converse", json.dumps({"prompt": prompt}).encode())

    assert KEY_RE.match(key(text))
    assert (key(text) == key(other)) == (text == other)


def test_cache_key_separates_workload_pool_and_operation_but_not_streaming() -> None:
    base = cache_key("chat", "sonnet", "Converse", BODY)
    assert KEY_RE.match(base) and KEY_RE.match(base)["workload"] == "chat"  # type: ignore[index]
    assert cache_key("faq", "sonnet", "Converse", BODY) != base
    assert cache_key("chat", "haiku", "Converse", BODY) != base
    assert cache_key("chat", "sonnet", "InvokeModel", BODY) != base
    assert cache_key("chat", "sonnet", "ConverseStream", BODY) == base
    invoke = cache_key("chat", "sonnet", "InvokeModel", BODY)
    assert cache_key("chat", "sonnet", "InvokeModelWithResponseStream", BODY) == invoke


def test_cache_key_varies_only_on_headers_that_change_the_answer() -> None:
    base = cache_key("chat", "sonnet", "InvokeModel", BODY)
    noise = {"X-Amz-Date": "20250101T000000Z", "Authorization": "AWS4 ...", "Accept": "*/*"}
    assert cache_key("chat", "sonnet", "InvokeModel", BODY, headers=noise) == base
    guarded = cache_key(
        "chat", "sonnet", "InvokeModel", BODY, headers={"X-Amzn-Bedrock-GuardrailIdentifier": "g1"}
    )
    assert guarded != base
    lower = {"x-amzn-bedrock-guardrailidentifier": "g1"}
    assert cache_key("chat", "sonnet", "InvokeModel", BODY, headers=lower) == guarded


def test_cache_key_hashes_a_non_json_body_as_it_is() -> None:
    assert KEY_RE.match(cache_key("chat", "sonnet", "Converse", b"\xff not json"))
    assert cache_key("chat", "sonnet", "Converse", b"a") != cache_key(
        "chat", "sonnet", "Converse", b"b"
    )


def test_only_invocations_are_cacheable() -> None:
    assert cache_operation("ConverseStream") == "Converse"
    assert cache_operation("CountTokens") is None
    with pytest.raises(ValueError, match="never cached"):
        cache_key("chat", "sonnet", "CountTokens", BODY)


def test_keys_of_one_workload_share_one_cluster_slot() -> None:
    slots = {
        key_slot(cache_key("chat", "sonnet", "Converse", b'{"n":%d}' % i).encode())
        for i in range(50)
    }
    assert len(slots) == 1
    workloads = {
        key_slot(cache_key(f"w{i}", "sonnet", "Converse", BODY).encode()) for i in range(50)
    }
    assert len(workloads) > 1


def test_cacheable_keeps_200s_and_only_replayable_headers() -> None:
    headers = {
        "Content-Type": "application/json",
        "x-amzn-RequestId": "abc",
        "Date": "Mon",
        "Content-Length": "12",
        "X-Amzn-Bedrock-Input-Token-Count": "5",
    }
    stored = cacheable(200, headers, b"{}", now=3.0)
    assert stored == CachedResponse(
        200,
        (("Content-Type", "application/json"), ("X-Amzn-Bedrock-Input-Token-Count", "5")),
        b"{}",
        3.0,
    )
    assert cacheable(429, headers, b"{}") is None
    assert cacheable(200, list(headers.items()), b"{}", now=3.0) == stored


# --- every backend -------------------------------------------------------------------------


async def test_get_returns_exactly_what_put_stored(cache: ResponseCache) -> None:
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    assert await cache.get(key) is None
    value = _answer("営業時間は10時〜20時です🙇", stored_at=1234.5)
    await cache.put(key, value, 30)
    assert await cache.get(key) == value


async def test_put_replaces_an_existing_entry(cache: ResponseCache) -> None:
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    await cache.put(key, _answer("old"), 30)
    await cache.put(key, _answer("new"), 30)
    assert await cache.get(key) == _answer("new")


async def test_entry_expires_after_its_ttl(cache: ResponseCache) -> None:
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    await cache.put(key, _answer(), 0.2)
    assert await cache.get(key) is not None
    await asyncio.sleep(0.35)
    assert await cache.get(key) is None


async def test_put_refuses_errors_and_non_positive_ttls(cache: ResponseCache) -> None:
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    with pytest.raises(ValueError, match="only 200"):
        await cache.put(key, CachedResponse(429, (), b"{}", 0.0), 30)
    with pytest.raises(ValueError, match="positive"):
        await cache.put(key, _answer(), 0)
    assert await cache.get(key) is None


async def test_a_burst_beyond_the_connection_pool_is_served(cache: ResponseCache) -> None:
    # 300 concurrent lookups: more than redis-py's default pool of 100 connections.
    workload = _workload()
    keys = [cache_key(workload, "sonnet", "Converse", b'{"n":%d}' % i) for i in range(300)]
    await asyncio.gather(*(cache.put(k, _answer(str(i)), 30) for i, k in enumerate(keys)))
    got = await asyncio.gather(*(cache.get(k) for k in keys))
    assert got == [_answer(str(i)) for i in range(len(keys))]


# --- memory bounds -------------------------------------------------------------------------


async def test_memory_cache_evicts_least_recently_used_beyond_max_entries() -> None:
    cache = MemoryResponseCache(max_entries=3)
    for key in "abc":
        await cache.put(key, _answer(key), 30)
    assert await cache.get("a") is not None  # a is now the most recently used
    await cache.put("d", _answer("d"), 30)
    assert [await cache.get(k) is not None for k in "abcd"] == [True, False, True, True]
    assert len(cache) == 3


async def test_memory_cache_is_bounded_in_bytes() -> None:
    size = _answer("x").size
    cache = MemoryResponseCache(max_bytes=size * 2)
    for key in "abc":
        await cache.put(key, _answer("x"), 30)
    assert len(cache) == 2 and cache.bytes == size * 2
    await cache.put("huge", CachedResponse(200, (), b"x" * (size * 3), 0.0), 30)
    assert await cache.get("huge") is None and len(cache) == 2


async def test_memory_cache_ttl_follows_its_clock() -> None:
    now = [100.0]
    cache = MemoryResponseCache(clock=lambda: now[0])
    await cache.put("k", _answer(), 10)
    now[0] = 109.9
    assert await cache.get("k") is not None
    now[0] = 110.0
    assert await cache.get("k") is None
    assert len(cache) == 0 and cache.bytes == 0


# --- Redis failures ------------------------------------------------------------------------


async def test_redis_down_makes_get_a_counted_miss_and_put_raise(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    server = redis_factory()
    metrics = Metrics()
    cache = open_cache(server.url, metrics=metrics, timeout_s=0.2)
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    try:
        await cache.put(key, _answer(), 30)
        assert await cache.get(key) == _answer()
        server.kill()
        started = time.monotonic()
        assert await cache.get(key) is None
        assert time.monotonic() - started < 1.0
        assert _errors(metrics, "cache_get") == 1
        with pytest.raises(CacheUnavailable, match="cache put failed"):
            await cache.put(key, _answer(), 30)
        assert _errors(metrics, "cache_put") == 1
    finally:
        await cache.close()


async def test_a_hung_redis_costs_a_get_no_more_than_its_timeout(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    server = redis_factory()
    metrics = Metrics()
    cache = open_cache(server.url, metrics=metrics, timeout_s=0.2)
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    try:
        await cache.put(key, _answer(), 30)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(cache.get(key) for _ in range(20)))
            assert results == [None] * 20
            assert time.monotonic() - started < 1.0
            assert _errors(metrics, "cache_get") == 20
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.05)
        assert await cache.get(key) == _answer()  # the pool recovered with the server
    finally:
        await cache.close()


async def test_an_unreadable_entry_is_a_counted_miss(redis_server: RedisServerProcess) -> None:
    metrics = Metrics()
    cache = RedisResponseCache(Redis.from_url(redis_server.url), metrics=metrics)
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    raw = Redis.from_url(redis_server.url)
    try:
        await raw.set(key, b"\xc1 not msgpack")
        assert await cache.get(key) is None
        await raw.set(key, msgpack.packb([99, 200, [], b"{}", 0.0]))  # a future format
        assert await cache.get(key) is None
        assert _errors(metrics, "cache_get") == 2
    finally:
        await raw.aclose()
        await cache.close()


def test_open_cache_picks_the_backend_from_the_url() -> None:
    assert isinstance(open_cache(None), MemoryResponseCache)
    assert isinstance(open_cache(""), MemoryResponseCache)
    assert isinstance(open_cache("redis://127.0.0.1:1/0"), RedisResponseCache)


# --- warming -------------------------------------------------------------------------------


def _line(workload: str, **overrides: Any) -> str:
    doc: dict[str, Any] = {
        "workload": workload,
        "model_pool": "sonnet",
        "operation": "Converse",
        "request": {"messages": [{"role": "user", "content": [{"text": "hours?"}]}]},
        "response": {
            "output": {"message": {"role": "assistant", "content": [{"text": "10-20"}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": 3, "outputTokens": 2, "totalTokens": 5},
        },
    }
    doc.update(overrides)
    return json.dumps(doc)


async def test_warm_stores_good_lines_and_reports_bad_ones_by_number(
    cache: ResponseCache, tmp_path: Path
) -> None:
    wl = _workload()
    invoke_request = {"max_tokens": 10, "anthropic_version": "bedrock-2023-05-31", "messages": []}
    lines = [
        _line(wl),  # 1
        "{not json",  # 2
        "",  # 3: blank, skipped
        _line(wl, operation="ConverseStream"),  # 4
        _line(wl, response={"output": {}}),  # 5
        _line(wl, colour="red"),  # 6
        _line(
            wl, operation="InvokeModel", request=invoke_request, response={"type": "message"}
        ),  # 7
        _line("bad{name}"),  # 8
        _line(wl, ttl_seconds=-1),  # 9
    ]
    path = tmp_path / "warm.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = await warm(cache, path, now=lambda: 42.0)
    assert (report.lines, report.stored, report.store_error) == (9, 2, None)
    reasons = {bad.line: bad.reason for bad in report.bad}
    assert sorted(reasons) == [2, 4, 5, 6, 8, 9]
    assert "Invalid JSON" in reasons[2]
    assert reasons[4].startswith("operation:")
    assert "output.message.content" in reasons[5]
    assert reasons[6].startswith("colour:")
    assert reasons[8].startswith("workload:")
    assert reasons[9].startswith("ttl_seconds:")
    assert not report.ok

    # Stored under the key a live request with the same JSON (any key order) computes.
    live = b'{"messages":[{"content":[{"text":"hours?"}],"role":"user"}]}'
    hit = await cache.get(cache_key(wl, "sonnet", "ConverseStream", live))
    assert hit is not None and hit.stored_at == 42.0 and hit.status == 200
    assert json.loads(hit.body)["output"]["message"]["content"] == [{"text": "10-20"}]
    invoke_key = cache_key(wl, "sonnet", "InvokeModel", json.dumps(invoke_request).encode())
    assert await cache.get(invoke_key) is not None


async def test_warm_checks_lines_against_the_policy_and_uses_its_ttl(tmp_path: Path) -> None:
    policy = parse_policy(
        {
            "models": {"sonnet": {"ids": ["anthropic.claude-3-sonnet-20240229-v1:0"]}},
            "workloads": {"chat": {"cache": {"ttl_seconds": 0.2}}, "batch": {}},
        }
    )
    path = tmp_path / "warm.jsonl"
    lines = [
        _line("chat"),
        _line("nobody"),
        _line("batch"),
        _line("chat", model_pool="opus"),
        _line("chat", request={"other": 1}, ttl_seconds=60),
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    cache = MemoryResponseCache()
    report = await warm(cache, path, policy=policy)
    assert report.stored == 2
    assert [(b.line, b.reason.split(":")[0]) for b in report.bad] == [
        (2, "workload"),
        (3, "workload"),
        (4, "model_pool"),
    ]
    assert "no cache rule" in report.bad[1].reason
    request = json.loads(lines[0])["request"]
    key = cache_key("chat", "sonnet", "Converse", json.dumps(request).encode())
    long_key = cache_key("chat", "sonnet", "Converse", b'{"other":1}')
    await asyncio.sleep(0.3)
    assert await cache.get(key) is None  # the workload's 0.2 s TTL
    assert await cache.get(long_key) is not None  # the line's own 60 s TTL


async def test_warm_stops_at_a_store_failure_and_says_where(
    redis_factory: Callable[..., RedisServerProcess], tmp_path: Path
) -> None:
    server = redis_factory()
    cache = open_cache(server.url, timeout_s=0.2)
    path = tmp_path / "warm.jsonl"
    path.write_text("\n".join([_line("chat"), _line("chat", request={"n": 2})]), encoding="utf-8")
    server.kill()
    try:
        report = await warm(cache, path)
    finally:
        await cache.close()
    assert report.stored == 0 and report.lines == 1
    assert report.store_error is not None and report.store_error.startswith("line 1:")


async def test_warm_reports_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "warm.jsonl"
    path.write_bytes(_line("chat").encode() + b"\n\xff\xfe\n")
    report = await warm(MemoryResponseCache(), path)
    assert report.stored == 1
    assert [b.line for b in report.bad] == [2]


async def test_a_cancelled_lookup_leaves_the_others_alone(cache: ResponseCache) -> None:
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    await cache.put(key, _answer(), 30)
    tasks = [asyncio.create_task(cache.get(key)) for _ in range(40)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    # The memory cache answers before the cancel lands; Redis lookups are still queued.
    assert all(r == _answer() or isinstance(r, asyncio.CancelledError) for r in results[::2])
    assert results[1::2] == [_answer()] * 20
    assert await cache.get(key) == _answer()


async def test_closing_answers_queued_lookups_as_misses(redis_server: RedisServerProcess) -> None:
    cache = open_cache(redis_server.url)
    key = cache_key(_workload(), "sonnet", "Converse", BODY)
    await cache.put(key, _answer(), 30)
    tasks = [asyncio.create_task(cache.get(key)) for _ in range(5)]
    await asyncio.sleep(0)  # queued; the MGET task has started but not finished
    await cache.close()
    assert await asyncio.gather(*tasks) == [None] * 5

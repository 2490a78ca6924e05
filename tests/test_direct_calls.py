"""EVALSHA without redis-py's per-command machinery (``proxy/backend/direct.py``), on a real
redis-server: the same bytes on the wire as redis-py, a restarted server and a cancelled
call handled as redis-py's client handles them, no reply read as another call's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from proxy.backend.direct import MAX_IDLE, DirectCalls
from tests.support.redis_fixtures import RedisServerProcess

ECHO = "return {KEYS[1], ARGV[1], ARGV[2]}"
# Busy for a while (no sleep in Lua): the reply comes well after the caller gave up.
SLOW = "local i = 0 while i < tonumber(ARGV[1]) do i = i + 1 end return 'slow'"
FAIL = "return redis.error_reply('boom')"

Arg = bytes | str | int | float
ARGS = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)


@pytest.fixture
async def client(redis_server: RedisServerProcess) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


def _clients(c: Redis) -> Callable[[], Any]:
    async def count() -> int:
        return len(await c.client_list())

    return count


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.text(max_size=20), max_size=4), args=st.lists(ARGS, max_size=8))
def test_arguments_are_packed_as_redis_py_packs_them(keys: list[str], args: list[Arg]) -> None:
    from hiredis import pack_command

    redis_py = Redis().connection_pool.make_connection()  # type: ignore[no-untyped-call]
    theirs = b"".join(redis_py.pack_command("EVALSHA", "f" * 40, len(keys), *keys, *args))
    assert pack_command(("EVALSHA", "f" * 40, len(keys), *keys, *args)) == theirs


async def test_replies_round_trip_and_connections_are_reused(client: Redis) -> None:
    sha = await client.script_load(ECHO)
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    for value in ("é", 2**62, 0.1, b"\x00\xff"):
        reply = await direct.evalsha(sha, ["k"], [value, "x"])
        expected = value if isinstance(value, bytes) else str(value).encode()
        assert reply == [b"k", expected, b"x"]
    assert await count() == before + 1  # one connection of its own, reused
    await direct.aclose()
    assert await count() == before


async def test_a_script_error_is_raised_and_keeps_the_connection(client: Redis) -> None:
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    with pytest.raises(ResponseError, match="boom"):
        await direct.evalsha(await client.script_load(FAIL), [], [])
    with pytest.raises(NoScriptError):
        await direct.evalsha("0" * 40, [], [])
    assert await direct.evalsha(await client.script_load(ECHO), ["k"], [1, 2]) == [b"k", b"1", b"2"]
    assert await count() == before + 1
    await direct.aclose()


async def test_a_call_cancelled_before_its_reply_leaves_no_reply_for_the_next(
    client: Redis,
) -> None:
    """The cancelled call's connection is dropped: its late reply ('slow') must never be read
    as the answer to the next call."""
    slow, echo = await client.script_load(SLOW), await client.script_load(ECHO)
    direct = DirectCalls(client)
    task = asyncio.create_task(direct.evalsha(slow, [], [3_000_000]))
    await asyncio.sleep(0.01)  # written; Redis is busy running it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await direct.evalsha(echo, ["k"], ["a", "b"]) == [b"k", b"a", b"b"]
    await direct.aclose()


async def test_a_restarted_server_is_reached_on_a_new_connection(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """An idle connection to a server that restarted since is dropped and the call sent
    again on a new one (what redis-py's one retry did): the restarted server answers, here
    NOSCRIPT (its scripts are gone), which the script runner reloads on."""
    server = redis_factory()
    client = Redis.from_url(server.url)
    try:
        direct = DirectCalls(client)
        sha = await client.script_load(ECHO)
        assert await direct.evalsha(sha, ["k"], [1, 2]) == [b"k", b"1", b"2"]
        await asyncio.to_thread(server.restart)
        with pytest.raises(NoScriptError):
            await direct.evalsha(sha, ["k"], [1, 2])
        assert await client.script_load(ECHO) == sha
        assert await direct.evalsha(sha, ["k"], [3, 4]) == [b"k", b"3", b"4"]
        await direct.aclose()
    finally:
        await client.aclose()


async def test_idle_connections_are_capped(client: Redis) -> None:
    sha = await client.script_load(SLOW)
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    await asyncio.gather(*(direct.evalsha(sha, [], [1]) for _ in range(MAX_IDLE + 4)))
    assert await count() == before + MAX_IDLE  # the extra ones were closed after their call
    await direct.aclose()
    assert await count() == before

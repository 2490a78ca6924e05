"""EVALSHA without redis-py's per-command machinery (``proxy/backend/direct.py``), on a real
redis-server: the same bytes on the wire as redis-py, a restarted server and a cancelled
call handled as redis-py's client handles them, no reply read as another call's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


@contextlib.asynccontextmanager
async def _direct_on(url: str) -> AsyncIterator[tuple[Redis, DirectCalls]]:
    """A client of ``url`` and direct calls on it; both closed afterwards."""
    client = Redis.from_url(url)
    direct = DirectCalls(client)
    try:
        yield client, direct
    finally:
        await direct.aclose()
        await client.aclose()


async def _idle_connections(direct: DirectCalls, client: Redis, n: int) -> str:
    """Leave ``n`` idle connections in ``direct`` (``n`` calls at once); the echo's sha."""
    sha: str = await client.script_load(ECHO)
    await asyncio.gather(*(direct.evalsha(sha, ["k"], [i, 0]) for i in range(n)))
    return sha


async def test_a_restarted_server_is_reached_on_a_new_connection(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """Idle connections to a server that restarted since are dropped, all of them, and the
    call sent again on a new one (what redis-py's pool and one retry did): the restarted
    server answers, here NOSCRIPT (its scripts are gone; the runner reloads on it), and no
    call fails on a dead connection."""
    server = redis_factory()
    async with _direct_on(server.url) as (client, direct):
        sha = await _idle_connections(direct, client, 4)
        await asyncio.to_thread(server.restart)
        with pytest.raises(NoScriptError):
            await direct.evalsha(sha, ["k"], [1, 2])
        assert await client.script_load(ECHO) == sha
        for i in range(4):
            assert await direct.evalsha(sha, ["k"], [i, 4]) == [b"k", str(i).encode(), b"4"]


async def test_connections_the_server_closed_when_idle_are_replaced(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    server = redis_factory("--timeout", "1")  # Redis closes connections idle for 1 s
    async with _direct_on(server.url) as (client, direct):
        sha = await _idle_connections(direct, client, 4)
        await asyncio.sleep(2.5)
        for i in range(4):
            assert await direct.evalsha(sha, ["k"], [i, 5]) == [b"k", str(i).encode(), b"5"]


async def test_a_reply_that_times_out_is_never_sent_again_nor_read_by_the_next_call(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """No reply within the socket timeout: the call raises and its connection is dropped,
    so the late reply cannot shift every later reply by one (it did when the read was
    given an explicit timeout: redis-py then returns None and keeps the connection)."""
    server = redis_factory()
    admin = Redis.from_url(server.url)
    try:
        async with _direct_on(server.url + "?socket_timeout=0.3") as (client, direct):
            # Busy for ARGV[1] ms by Redis's own clock, however fast this machine is (a loop
            # of fixed length finished inside the timeout on a fast one).
            busy = (
                "local function ms() local t = redis.call('TIME')"
                " return t[1] * 1000 + t[2] / 1000 end"
                " local stop = ms() + tonumber(ARGV[1]) while ms() < stop do end"
            )
            incr = await client.script_load(busy + " return redis.call('INCR', KEYS[1])")
            echo = await client.script_load(ECHO)
            with pytest.raises(RedisTimeoutError):
                await direct.evalsha(incr, ["n"], [700])  # 0.7 s of work: no reply in time
            await asyncio.sleep(1.5)  # it has run (once) and its reply arrived, for nobody
            assert await direct.evalsha(echo, ["k"], ["b", "c"]) == [b"k", b"b", b"c"]
            assert await admin.get("n") == b"1"
    finally:
        await admin.aclose()


async def test_an_argument_redis_cannot_take_is_a_redis_error(client: Redis) -> None:
    direct = DirectCalls(client)
    with pytest.raises(DataError):
        await direct.evalsha("0" * 40, [], [True])
    await direct.aclose()


async def test_idle_connections_are_capped(client: Redis) -> None:
    sha = await client.script_load(SLOW)
    direct = DirectCalls(client)
    count = _clients(client)
    before = await count()
    await asyncio.gather(*(direct.evalsha(sha, [], [1]) for _ in range(MAX_IDLE + 4)))
    await asyncio.sleep(0.1)  # the extra ones were closed after their call
    assert await count() == before + MAX_IDLE
    await direct.aclose()
    # Redis drops a client when it reads the close: under load that can take a moment.
    for _ in range(100):
        if await count() == before:
            break
        await asyncio.sleep(0.02)
    assert await count() == before


async def test_a_call_whose_write_went_out_is_never_sent_again(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """A connection lost after Redis ran the script but before its reply came back (a
    proxy in between cuts it): the call fails, it is not resent -- the counter the
    script increments is 1, not 2 (redis-py's one retry made it 2)."""
    server = redis_factory()

    async def relay_then_cut(
        client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            while data := await client_r.read(65536):
                redis_w.write(data)
                await redis_w.drain()
                reply = await redis_r.read(65536)
                if b"EVALSHA" in data:
                    break  # ran at Redis; the reply is dropped with the connection
                client_w.write(reply)
                await client_w.drain()
        finally:
            client_w.transport.abort()
            redis_w.close()

    proxy = await asyncio.start_server(relay_then_cut, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    admin = Redis.from_url(server.url)
    try:
        async with _direct_on(f"redis://127.0.0.1:{port}/0?protocol=2") as (_, direct):
            sha = await admin.script_load("return redis.call('INCR', KEYS[1])")
            with pytest.raises(RedisConnectionError):
                await direct.evalsha(sha, ["n"], [])
            assert await admin.get("n") == b"1"
    finally:
        proxy.close()
        await admin.aclose()


async def test_a_close_the_loop_has_not_read_yet_is_seen_before_the_write(
    redis_factory: Callable[..., RedisServerProcess],
) -> None:
    """A call writes right after the previous reply, with no turn of the loop between: a
    server that closed meanwhile (here restarted without the loop running) is noticed on
    the socket itself, and the call goes to a new connection instead of failing."""
    server = redis_factory()
    async with _direct_on(server.url) as (client, direct):
        sha = await _idle_connections(direct, client, 1)
        server.restart()  # blocking: the loop does not run until the call below
        with pytest.raises(NoScriptError):  # answered by the restarted server
            await direct.evalsha(sha, ["k"], [1, 2])


async def test_idle_connections_on_high_descriptors_are_reused(client: Redis) -> None:
    """The idle check polls the socket: a descriptor above select()'s 1,024 must work too
    (an instance holding thousands of streams)."""
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        if hard != resource.RLIM_INFINITY and hard < 1300:
            pytest.skip(f"needs 1,300 descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    padding = [socket.socket() for _ in range(1100)]
    try:
        sha = await client.script_load(ECHO)
        direct = DirectCalls(client)
        before = (await client.info("stats"))["total_connections_received"]
        for i in range(5):
            assert await direct.evalsha(sha, ["k"], [i, 0]) == [b"k", str(i).encode(), b"0"]
        made = (await client.info("stats"))["total_connections_received"] - before
        assert made == 1  # one connection, reused: never judged closed
        await direct.aclose()
    finally:
        for s in padding:
            s.close()
        if soft < 1300:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
